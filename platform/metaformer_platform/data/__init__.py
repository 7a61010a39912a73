"""The data read path: `manifest` (what the shards are) -> `shardset` (who reads what in an epoch) -> `reader`
(tar -> samples) -> `stream` (a rank's epoch: decode, augment, stand-ins for `faults`) -> `loader` (the
DataLoader, resumable position); `transforms`/`augment` are the paper's augmentation. Bytes come through
`metaformer_platform.storage`; building shards is `data.build`. No Ray, MLflow or config imports here.
"""

from metaformer_platform.data.augment import BatchTransform, build_split_transforms
from metaformer_platform.data.faults import IGNORE_LABEL, DataFaultError
from metaformer_platform.data.loader import ShardLoader, build_loader
from metaformer_platform.data.manifest import INFO_NAME, Manifest, load_manifest, verify_checksums
from metaformer_platform.data.shardset import batch_schedule
from metaformer_platform.data.transforms import build_mixup, build_transforms

__all__ = [
    "BatchTransform",
    "DataFaultError",
    "IGNORE_LABEL",
    "INFO_NAME",
    "Manifest",
    "ShardLoader",
    "batch_schedule",
    "build_loader",
    "build_mixup",
    "build_split_transforms",
    "build_transforms",
    "load_manifest",
    "verify_checksums",
]

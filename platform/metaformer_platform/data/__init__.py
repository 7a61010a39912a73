"""The data path: webdataset shards + `_info.json` manifest -> ShardSet plan -> batches.

Layers, bottom up: `storage` (where bytes live; `s3` adds s3:// through boto3), `manifest` (what the shards are), `writer` (making
shards), `shardset` (who reads what in an epoch), `reader` (tar -> samples -> images), `faults` (bad shards and samples: skipped, counted), `loader` (batches,
resumable position), `transforms` (the paper's augmentation via timm), `augment` (its worker/batch split: uint8 workers, batched normalize and erasing, crop-aware JPEG decode), `synthetic` (a built-in dataset).
No Ray, MLflow or config imports here: callers pass plain arguments.
"""

from metaformer_platform.data.augment import BatchTransform, build_split_transforms
from metaformer_platform.data.faults import IGNORE_LABEL, DataFaultError
from metaformer_platform.data.loader import ShardLoader, build_loader
from metaformer_platform.data.manifest import (
    INFO_NAME,
    Manifest,
    ShardInfo,
    SplitInfo,
    load_manifest,
    verify_checksums,
    write_manifest,
)
from metaformer_platform.data.shardset import RankPlan, ShardSet, WorkerPlan, batch_schedule
from metaformer_platform.data.storage import (
    LocalStorage,
    Storage,
    WritableStorage,
    open_storage,
    register_scheme,
)
from metaformer_platform.data.transforms import build_mixup, build_transforms

from .s3 import S3AccessError, S3Storage, register_webdataset_s3

__all__ = [
    "BatchTransform",
    "IGNORE_LABEL",
    "INFO_NAME",
    "DataFaultError",
    "LocalStorage",
    "Manifest",
    "RankPlan",
    "S3AccessError",
    "S3Storage",
    "ShardInfo",
    "ShardLoader",
    "ShardSet",
    "SplitInfo",
    "Storage",
    "WritableStorage",
    "WorkerPlan",
    "batch_schedule",
    "build_loader",
    "build_mixup",
    "build_split_transforms",
    "build_transforms",
    "load_manifest",
    "open_storage",
    "register_scheme",
    "register_webdataset_s3",
    "verify_checksums",
    "write_manifest",
]

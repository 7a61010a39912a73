"""The data path: webdataset shards + `_info.json` manifest -> ShardSet plan -> batches.

Layers, bottom up: `storage` (where bytes live; `s3` adds s3:// through boto3), `manifest` (what the shards are), `writer` (making
shards), `shardset` (who reads what in an epoch), `reader` (tar -> samples -> images), `faults` (bad shards and samples: skipped, counted), `loader` (batches,
resumable position), `transforms` (the paper's augmentation via timm), `augment` (its worker/batch split: uint8 workers, batched normalize and erasing, crop-aware JPEG decode), `synthetic` (a built-in dataset).
No Ray, MLflow or config imports here: callers pass plain arguments.
"""

from .augment import BatchTransform, build_split_transforms
from .faults import IGNORE_LABEL, DataFaultError
from .loader import ShardLoader, build_loader
from .manifest import (
    INFO_NAME,
    Manifest,
    ShardInfo,
    SplitInfo,
    load_manifest,
    verify_checksums,
    write_manifest,
)
from .s3 import S3AccessError, S3Storage, register_webdataset_s3
from .shardset import RankPlan, ShardSet, WorkerPlan, batch_schedule
from .storage import LocalStorage, Storage, WritableStorage, open_storage, register_scheme
from .synthetic import ensure_synthetic_shards
from .transforms import build_mixup, build_transforms
from .writer import Sample, ShardWriter, shard_name, write_dataset, write_shard

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
    "Sample",
    "ShardInfo",
    "ShardLoader",
    "ShardSet",
    "ShardWriter",
    "SplitInfo",
    "Storage",
    "WritableStorage",
    "WorkerPlan",
    "batch_schedule",
    "build_loader",
    "build_mixup",
    "build_split_transforms",
    "build_transforms",
    "ensure_synthetic_shards",
    "load_manifest",
    "open_storage",
    "register_scheme",
    "register_webdataset_s3",
    "shard_name",
    "verify_checksums",
    "write_dataset",
    "write_manifest",
    "write_shard",
]

"""The storage core: locations, S3 settings, the one storage API (local and S3 stores), checkpoint format, weights.

Every layer above (data, training, evaluation, registry, launch, pipelines) reaches local folders and object
storage through this package; it imports nothing of the platform above it (the weights resolver's
``models:/`` lookup talks to MLflow directly, lazily).
"""

from metaformer_platform.storage import weights  # the resolver: storage.weights.resolve
from metaformer_platform.storage.files import (
    Store,
    atomic_write,
    check_access,
    check_writable,
    delete,
    download,
    exists,
    is_temporary,
    list_files,
    local_folder,
    open_store,
    read_bytes,
    safe_member,
    write_bytes,
)
from metaformer_platform.storage.location import Location, LocationLike
from metaformer_platform.storage.s3 import S3AccessError, register_webdataset_s3, s3_refusal
from metaformer_platform.storage.settings import AWS_ENV_VARS, S3Settings, aws_env

__all__ = [
    "AWS_ENV_VARS",
    "Location",
    "LocationLike",
    "S3AccessError",
    "S3Settings",
    "Store",
    "atomic_write",
    "aws_env",
    "check_access",
    "check_writable",
    "delete",
    "download",
    "exists",
    "is_temporary",
    "list_files",
    "local_folder",
    "open_store",
    "read_bytes",
    "register_webdataset_s3",
    "s3_refusal",
    "weights",
    "safe_member",
    "write_bytes",
]

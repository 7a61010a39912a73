"""metaformer-platform: distributed training of the MetaFormer family on Ray Train.

Importing the package is cheap on purpose: torch, Ray, MLflow, DeepSpeed and boto3 are imported by the
modules that use them (``metaformer_platform.models`` registers the model family with timm).
"""

__version__ = "0.1.0"

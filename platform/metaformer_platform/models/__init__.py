"""Model registry over timm for the MetaFormer family.

Importing this package registers with timm what it lacks (IdentityFormer, RandFormer, the PoolFormer-S12
Table 5 ablations, a tiny ``poolformer_debug``), so every family member is available by name through
``timm.create_model`` or `create_model`. Models hold architecture only: no Ray, MLflow or config imports here.
"""

from . import zoo as _zoo  # noqa: F401  (registration with timm happens on import)
from .builder import (
    ACTIVATIONS,
    HEADS,
    NORMS,
    POOLFORMER_V2_STYLE,
    TOKEN_MIXERS,
    MetaFormerSpec,
    build_metaformer,
    needs_fixed_input,
    stage_grids,
)
from .catalog import (
    ABLATIONS,
    FAMILIES,
    PAPER_FROZEN_PARAMS_M,
    PAPER_MACS_G,
    PAPER_PARAMS_M,
    PAPER_TOP1,
    SIZES,
    UNSUPPORTED_ABLATIONS,
    paper_recipe,
)
from .factory import check_model_name, create_model, model_complexity
from .mixers import Attention2d, DepthwiseConv, RandomMixing, SpatialMlp
from .zoo import MODEL_SPECS, REGISTERED_MODELS

__all__ = [
    "ABLATIONS",
    "ACTIVATIONS",
    "FAMILIES",
    "HEADS",
    "MODEL_SPECS",
    "NORMS",
    "PAPER_FROZEN_PARAMS_M",
    "PAPER_MACS_G",
    "PAPER_PARAMS_M",
    "PAPER_TOP1",
    "POOLFORMER_V2_STYLE",
    "REGISTERED_MODELS",
    "SIZES",
    "TOKEN_MIXERS",
    "UNSUPPORTED_ABLATIONS",
    "Attention2d",
    "DepthwiseConv",
    "MetaFormerSpec",
    "RandomMixing",
    "SpatialMlp",
    "build_metaformer",
    "check_model_name",
    "create_model",
    "model_complexity",
    "needs_fixed_input",
    "paper_recipe",
    "stage_grids",
]

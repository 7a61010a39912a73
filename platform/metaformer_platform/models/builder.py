"""Build timm `MetaFormer` models from plain names, so every PoolFormer Table 5 ablation is a config, not code.

`build_metaformer` maps string choices (token mixer per stage, norm, activation, ...) through the small registries
below to timm's own classes and builds the model with timm's `build_model_with_cfg`, exactly as timm builds its
poolformer/poolformerv2 variants (so `pretrained_cfg`, `features_only` and checkpoint filtering behave the same).
Its defaults are PoolFormer-S12's settings; `POOLFORMER_V2_STYLE` holds the MetaFormer-baselines settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GroupNorm1, LayerNorm2d
from timm.models import build_model_with_cfg, is_model
from timm.models.metaformer import (
    GroupNorm1NoBias,
    LayerNorm2dNoBias,
    MetaFormer,
    Pooling,
    SepConv,
    StarReLU,
    checkpoint_filter_fn,
)
from torch import nn

from .catalog import ArchArgs
from .mixers import Attention2d, DepthwiseConv, RandomMixing, SpatialMlp

_T = TypeVar("_T")

TOKEN_MIXERS: dict[str, type[nn.Module]] = {
    "pooling": Pooling,  # timm's PoolFormer mixer: avgpool(x) - x
    "identity": nn.Identity,  # IdentityFormer
    "random": RandomMixing,  # frozen global random matrix (RandFormer)
    "dwconv": DepthwiseConv,  # plain depthwise conv, kernel = pool_size (Table 5)
    "sepconv": SepConv,  # timm's ConvFormer inverted separable conv (7x7)
    "attention": Attention2d,  # timm's MetaFormer self-attention on NCHW maps
    "spatial_mlp": SpatialMlp,  # one FC layer across tokens (Table 5 "SpatialFC")
}

NORMS: dict[str, type[nn.Module]] = {
    "gn1": GroupNorm1,  # PoolFormer's "modified LayerNorm": stats over C,H,W, affine per channel
    "gn1_nobias": GroupNorm1NoBias,  # the same without bias (PoolFormerV2 / IdentityFormer / RandFormer)
    "ln": LayerNorm2d,  # LayerNorm over channels only
    "ln_nobias": LayerNorm2dNoBias,
    "bn": nn.BatchNorm2d,
    "none": nn.Identity,
}

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "starrelu": StarReLU,
}

HEADS: dict[str, bool] = {"linear": False, "mlp": True}  # value: MetaFormer's use_mlp_head

# sail-sg/metaformer's settings shared by PoolFormerV2, IdentityFormer and RandFormer: StarReLU, no MLP bias,
# bias-free norms, norm before each downsampling, res-scale in the last two stages, no layer-scale.
POOLFORMER_V2_STYLE: ArchArgs = {
    "norm": "gn1_nobias",
    "act": "starrelu",
    "mlp_bias": False,
    "downsample_norm": "ln_nobias",
    "layer_scale_init_value": None,
    "res_scale_init_values": (None, None, 1.0, 1.0),
}


def _lookup(registry: Mapping[str, _T], key: str, what: str) -> _T:
    if key not in registry:
        raise ValueError(f"unknown {what} {key!r}; choose one of: {', '.join(registry)}")
    return registry[key]


def _explicit_params(cls: type) -> set[str]:
    """Named parameters of a mixer's __init__: timm's MetaFormer rejects an extra kwarg no mixer names."""
    return {
        n
        for n, p in inspect.signature(cls).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _to_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


def stage_grids(img_size: int | Sequence[int], dims: Sequence[int]) -> list[tuple[int, int]]:
    """Feature-map size (H, W) of each MetaFormer stage for an input of ``img_size``.

    Follows timm's MetaFormer: a 7x7 stride-4 stem, then a 3x3 stride-2 downsampling before each later stage
    whose width differs from the previous one (timm skips it when the widths are equal).
    """
    h, w = _to_hw(img_size)
    h, w = (h + 4 - 7) // 4 + 1, (w + 4 - 7) // 4 + 1
    grids = []
    for i, dim in enumerate(dims):
        if i > 0 and dim != dims[i - 1]:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        if h < 1 or w < 1:
            raise ValueError(f"img_size={img_size} is too small for {len(dims)} stages")
        grids.append((h, w))
    return grids


def needs_fixed_input(token_mixers: str | Sequence[str]) -> bool:
    """Whether these mixers tie the model to one input resolution (their weights are sized by H*W)."""
    names = [token_mixers] if isinstance(token_mixers, str) else list(token_mixers)
    return any("token_counts" in _explicit_params(_lookup(TOKEN_MIXERS, n, "token mixer")) for n in names)


def default_pretrained_cfg(
    input_size: tuple[int, int, int] = (3, 224, 224),
    crop_pct: float = 0.9,
    fixed_input_size: bool = False,
    dims: Sequence[int] = (64, 128, 320, 512),
) -> dict[str, object]:
    """A timm pretrained_cfg without weights (nothing can be downloaded): the data settings a model is used with."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": tuple(input_size),
        "pool_size": stage_grids(input_size[1:], dims)[-1],
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "fixed_input_size": fixed_input_size,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "license": "apache-2.0",
    }


@dataclass(frozen=True)
class MetaFormerSpec:
    """A MetaFormer architecture in named parts, checked on creation (a bad choice fails before anything is built).

    The defaults give PoolFormer-S12 exactly (timm's poolformer_s12). The fields:

    - depths, dims: blocks and width per stage.
    - token_mixers: one name for all stages or one per stage, from `TOKEN_MIXERS`
      ("pooling", "identity", "random", "dwconv", "sepconv", "attention", "spatial_mlp").
    - pool_size: window of "pooling" and kernel of "dwconv" (odd).
    - norm: per-block norm from `NORMS` ("gn1" = PoolFormer's modified LN, "ln", "bn", "none", ...).
    - act: channel-MLP activation from `ACTIVATIONS` ("gelu", "relu", "silu", "starrelu").
    - img_size: input resolution; only "random" and "spatial_mlp" depend on it (their matrices are sized by
      the stage's H*W), which also marks the model's pretrained_cfg with ``fixed_input_size``.
    - mlp_bias, layer_scale_init_value, res_scale_init_values, downsample_norm: block details; PoolFormer v1
      uses the defaults, the MetaFormer baselines use `POOLFORMER_V2_STYLE`.
    - head_norm: norm after global pooling (timm uses channel LayerNorm); head: "linear" or "mlp".
    - head_dim: per-head width of "attention" mixers.
    """

    depths: Sequence[int] = (2, 2, 6, 2)
    dims: Sequence[int] = (64, 128, 320, 512)
    token_mixers: str | Sequence[str] = "pooling"
    pool_size: int = 3
    norm: str = "gn1"
    act: str = "gelu"
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    img_size: int | Sequence[int] = 224
    in_chans: int = 3
    mlp_bias: bool = True
    layer_scale_init_value: float | None = 1e-5
    res_scale_init_values: float | Sequence[float | None] | None = None
    downsample_norm: str | None = None
    head_norm: str = "ln"
    head: str = "linear"
    head_dim: int = 32

    def __post_init__(self) -> None:
        # Normalised once, so the checks and timm see plain tuples whatever sequence was given.
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        self._check_stages()
        self._check_settings()
        self.token_counts()

    @property
    def stage_mixers(self) -> tuple[str, ...]:
        """The token mixer name of each stage."""
        mixers = self.token_mixers
        return (mixers,) * len(self.depths) if isinstance(mixers, str) else tuple(mixers)

    @property
    def fixed_input(self) -> bool:
        """Whether the model only accepts ``img_size`` inputs."""
        return needs_fixed_input(self.token_mixers)

    def _check_stages(self) -> None:
        depths, dims, n = self.depths, self.dims, len(self.depths)
        if n == 0 or len(dims) != n or min(depths) < 1 or min(dims) < 1:
            raise ValueError(
                f"depths and dims need one positive entry per stage, got depths={depths}, dims={dims}"
            )
        if len(self.stage_mixers) != n:
            raise ValueError(f"token_mixers needs one name per stage ({n}), got {list(self.stage_mixers)}")
        for i, (name, dim) in enumerate(zip(self.stage_mixers, dims, strict=True)):
            if _lookup(TOKEN_MIXERS, name, "token mixer") is Attention2d and dim % self.head_dim:
                raise ValueError(
                    f"stage {i} uses attention but its width {dim} is not divisible by head_dim={self.head_dim}"
                )

    def _check_settings(self) -> None:
        if self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(
                f"pool_size must be a positive odd number (the map keeps its size), got {self.pool_size}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        res_scale = self.res_scale_init_values
        if isinstance(res_scale, Sequence) and len(res_scale) != len(self.depths):
            raise ValueError(f"res_scale_init_values needs one value per stage ({len(self.depths)}), got {res_scale}")

    def token_counts(self) -> dict[int, int]:
        """``{stage width: H*W}`` for the mixers sized by their stage's tokens (see `mixers`)."""
        counts: dict[int, int] = {}
        grids = stage_grids(self.img_size, self.dims)
        for name, dim, (h, w) in zip(self.stage_mixers, self.dims, grids, strict=True):
            if "token_counts" in _explicit_params(TOKEN_MIXERS[name]):
                if counts.setdefault(dim, h * w) != h * w:
                    raise ValueError(
                        f"{name!r} mixers in two stages of width {dim} see different token counts; "
                        "give those stages different widths"
                    )
        return counts

    def timm_kwargs(self) -> dict[str, Any]:
        """The `timm.models.metaformer.MetaFormer` keyword arguments for this architecture."""
        mixers = [TOKEN_MIXERS[name] for name in self.stage_mixers]
        # MetaFormer hands the same extra kwargs to every mixer; each mixer picks what it names.
        offered = {"pool_size": self.pool_size, "head_dim": self.head_dim, "token_counts": self.token_counts()}
        wanted = set().union(*(_explicit_params(m) for m in mixers))
        return {
            "depths": self.depths,
            "dims": self.dims,
            "token_mixers": mixers,
            "norm_layers": _lookup(NORMS, self.norm, "norm"),
            "downsample_norm": None if self.downsample_norm is None else _lookup(NORMS, self.downsample_norm, "norm"),
            "output_norm": _lookup(NORMS, self.head_norm, "norm"),
            "mlp_act": _lookup(ACTIVATIONS, self.act, "activation"),
            "mlp_bias": self.mlp_bias,
            "layer_scale_init_values": self.layer_scale_init_value,
            "res_scale_init_values": self.res_scale_init_values,
            "use_mlp_head": _lookup(HEADS, self.head, "head"),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "drop_path_rate": self.drop_path_rate,
            "drop_rate": self.drop_rate,
            **{k: v for k, v in offered.items() if k in wanted},
        }


_SPEC_FIELDS = frozenset(f.name for f in fields(MetaFormerSpec))


def _metaformer_from_names(**kwargs: Any) -> MetaFormer:
    # model_cls for timm's build_model_with_cfg: the spec's fields are translated, the rest (global_pool, ...)
    # go to MetaFormer untouched.
    spec = MetaFormerSpec(**{k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_FIELDS})
    return MetaFormer(**spec.timm_kwargs(), **kwargs)


def _record_input_size(model: nn.Module, spec: MetaFormerSpec) -> None:
    # A fixed-resolution model only accepts the size it was built for: record that size for data configs.
    cfg = getattr(model, "pretrained_cfg", None)
    h, w = _to_hw(spec.img_size)
    if spec.fixed_input and isinstance(cfg, dict) and tuple(cfg.get("input_size", ()))[1:] != (h, w):
        cfg.update(
            input_size=(spec.in_chans, h, w), pool_size=stage_grids((h, w), spec.dims)[-1], fixed_input_size=True
        )


def build_metaformer(
    depths: Sequence[int] = MetaFormerSpec.depths,
    dims: Sequence[int] = MetaFormerSpec.dims,
    token_mixers: str | Sequence[str] = MetaFormerSpec.token_mixers,
    *,
    variant: str = "metaformer_custom",
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm MetaFormer from named parts; the defaults give PoolFormer-S12 exactly (timm's poolformer_s12).

    Args:
        depths, dims, token_mixers: and any other `MetaFormerSpec` field given in ``kwargs`` (pool_size, norm,
            act, img_size, ...): the architecture, see `MetaFormerSpec`.
        variant: name recorded in the model's pretrained_cfg (the registered name when built through timm).
        pretrained: load weights named by the pretrained_cfg (e.g. ``pretrained_cfg_overlay={"file": path}``).
        **kwargs: the rest go to timm's ``build_model_with_cfg`` / MetaFormer (pretrained_cfg,
            pretrained_cfg_overlay, features_only, out_indices, global_pool, proj_drop_rate, device, ...).
    """
    arch = {k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_FIELDS}
    spec = MetaFormerSpec(depths, dims, token_mixers, **arch)
    if kwargs.get("pretrained_cfg") is None and not is_model(variant):
        h, w = _to_hw(spec.img_size)
        kwargs["pretrained_cfg"] = default_pretrained_cfg(
            (spec.in_chans, h, w), fixed_input_size=spec.fixed_input, dims=spec.dims
        )
    out_indices = kwargs.pop("out_indices", tuple(range(len(spec.depths))))
    model = build_model_with_cfg(
        _metaformer_from_names,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"flatten_sequential": True, "out_indices": out_indices},
        **asdict(spec),
        **kwargs,
    )
    _record_input_size(model, spec)
    return model

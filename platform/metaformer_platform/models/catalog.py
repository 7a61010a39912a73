"""What the papers say about each model: families, sizes, reported ImageNet-1K numbers, ablation presets and the
per-size training settings that belong to the model.

Sources: "MetaFormer Is Actually What You Need for Vision" (PoolFormer, CVPR 2022; Tables 1 and 5) and
"MetaFormer Baselines for Vision" (sail-sg/metaformer README and its training scripts). Plain data only: this
module imports neither torch nor timm, so configs and reports can read it cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

# Stage depths and widths shared by PoolFormer (v1 and v2), IdentityFormer and RandFormer.
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512)),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512)),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512)),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768)),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768)),
}
DEBUG_SIZE: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1, 1, 1), (8, 16, 32, 64))
# A second tiny size, so tests can run a family of two (pipelines: params, MACs and top-1 per member).
DEBUG_SIZE_M: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1, 2, 1), (16, 32, 64, 128))



class ArchArgs(TypedDict, total=False):
    """`build_metaformer`'s architecture arguments as plain data (see `builder.MetaFormerSpec`); left out = default."""

    depths: Sequence[int]
    dims: Sequence[int]
    token_mixers: str | Sequence[str]
    pool_size: int
    norm: str
    act: str
    head_norm: str
    mlp_bias: bool
    downsample_norm: str | None
    layer_scale_init_value: float | None
    res_scale_init_values: float | Sequence[float | None] | None


class AblationRow(TypedDict):
    """One row of PoolFormer's Table 5: where it sits, how to build it, what the paper reports."""

    group: str
    row: str
    kwargs: ArchArgs
    paper_top1: float
    paper_params_m: float
    paper_macs_g: float


def _row(group: str, row: str, top1: float, params_m: float, macs_g: float, **overrides: object) -> AblationRow:
    kwargs: ArchArgs = {"depths": SIZES["s12"][0], "dims": SIZES["s12"][1]}
    kwargs.update(overrides)  # type: ignore[typeddict-item]
    return {
        "group": group,
        "row": row,
        "kwargs": kwargs,
        "paper_top1": top1,
        "paper_params_m": params_m,
        "paper_macs_g": macs_g,
    }


# PoolFormer paper, Table 5 (PoolFormer-S12 ablations on ImageNet-1K). "kwargs" are complete `build_metaformer`
# arguments (its defaults are the PoolFormer-S12 settings), so `build_metaformer(**ABLATIONS[n]["kwargs"])` builds
# the row; each name is also registered with timm. Paper params exclude the random matrix's frozen values.
_P, _A, _F = "pooling", "attention", "spatial_mlp"
ABLATIONS: dict[str, AblationRow] = {
    "poolformer_s12_ablation_baseline": _row("Baseline", "None (PoolFormer-S12)", 77.2, 11.9, 1.8),
    "poolformer_s12_ablation_identity": _row(
        "Token mixers", "Pooling -> Identity mapping", 74.3, 11.9, 1.8, token_mixers="identity"
    ),
    "poolformer_s12_ablation_random": _row(
        "Token mixers",
        "Pooling -> Global random matrix (extra 21M frozen parameters)",
        75.8,
        11.9,
        3.3,
        token_mixers="random",
    ),
    "poolformer_s12_ablation_dwconv": _row(
        "Token mixers", "Pooling -> Depthwise Convolution", 78.1, 11.9, 1.8, token_mixers="dwconv"
    ),
    "poolformer_s12_ablation_pool5": _row(
        "Token mixers", "Pooling size 3 -> 5", 77.2, 11.9, 1.8, pool_size=5
    ),
    "poolformer_s12_ablation_pool7": _row(
        "Token mixers", "Pooling size 3 -> 7", 77.1, 11.9, 1.8, pool_size=7
    ),
    "poolformer_s12_ablation_pool9": _row(
        "Token mixers", "Pooling size 3 -> 9", 76.8, 11.9, 1.8, pool_size=9
    ),
    "poolformer_s12_ablation_ln": _row(
        "Normalization", "Modified Layer Normalization -> Layer Normalization", 76.5, 11.9, 1.8, norm="ln"
    ),
    "poolformer_s12_ablation_bn": _row(
        "Normalization", "Modified Layer Normalization -> Batch Normalization", 76.4, 11.9, 1.8, norm="bn"
    ),
    # "None" removes every norm, the head's included (the paper's model has a norm before its head too).
    "poolformer_s12_ablation_nonorm": _row(
        "Normalization",
        "Modified Layer Normalization -> None",
        46.1,
        11.9,
        1.8,
        norm="none",
        head_norm="none",
    ),
    "poolformer_s12_ablation_relu": _row("Activation", "GELU -> ReLU", 76.4, 11.9, 1.8, act="relu"),
    "poolformer_s12_ablation_silu": _row("Activation", "GELU -> SiLU", 77.2, 11.9, 1.8, act="silu"),
    "poolformer_s12_ablation_hybrid_attn_last": _row(
        "Hybrid stages",
        "[Pool, Pool, Pool, Pool] -> [Pool, Pool, Pool, Attention]",
        78.3,
        14.0,
        1.9,
        token_mixers=(_P, _P, _P, _A),
    ),
    "poolformer_s12_ablation_hybrid_attn": _row(
        "Hybrid stages",
        "[Pool, Pool, Pool, Pool] -> [Pool, Pool, Attention, Attention]",
        81.0,
        16.5,
        2.5,
        token_mixers=(_P, _P, _A, _A),
    ),
    "poolformer_s12_ablation_hybrid_mlp_last": _row(
        "Hybrid stages",
        "[Pool, Pool, Pool, Pool] -> [Pool, Pool, Pool, SpatialFC]",
        77.5,
        11.9,
        1.8,
        token_mixers=(_P, _P, _P, _F),
    ),
    "poolformer_s12_ablation_hybrid_mlp": _row(
        "Hybrid stages",
        "[Pool, Pool, Pool, Pool] -> [Pool, Pool, SpatialFC, SpatialFC]",
        77.9,
        12.2,
        1.9,
        token_mixers=(_P, _P, _F, _F),
    ),
}

# Table 5 rows that timm's MetaFormerBlock cannot express (it always has both residuals and the channel MLP).
UNSUPPORTED_ABLATIONS: dict[str, dict[str, float]] = {
    "Residual connection -> None": {"paper_top1": 0.1, "paper_params_m": 11.9, "paper_macs_g": 1.8},
    "Channel MLP -> None": {"paper_top1": 5.7, "paper_params_m": 2.5, "paper_macs_g": 0.2},
}

_SML = ("s12", "s24", "s36", "m36", "m48")
_BIG = ("s18", "s36", "m36", "b36")

FAMILIES: dict[str, list[str]] = {
    "poolformer": [f"poolformer_{s}" for s in _SML],
    "poolformerv2": [f"poolformerv2_{s}" for s in _SML],
    "identityformer": [f"identityformer_{s}" for s in _SML],
    "randformer": [f"randformer_{s}" for s in _SML],
    "convformer": [f"convformer_{s}" for s in _BIG],
    "caformer": [f"caformer_{s}" for s in _BIG],
    "poolformer_s12_ablations": list(ABLATIONS),
    "debug": ["poolformer_debug", "poolformer_debug_m"],
}


def _family(prefix: str, sizes: tuple[str, ...], values: tuple[float, ...]) -> dict[str, float]:
    return {f"{prefix}_{s}": v for s, v in zip(sizes, values, strict=True)}


# ImageNet-1K top-1 (%) at 224 px as reported by the authors (PoolFormer paper; sail-sg/metaformer README).
PAPER_TOP1: dict[str, float] = {
    **_family("poolformer", _SML, (77.2, 80.3, 81.4, 82.1, 82.5)),
    **_family("poolformerv2", _SML, (78.0, 80.7, 81.6, 82.2, 82.6)),
    **_family("identityformer", _SML, (74.6, 78.2, 79.3, 80.0, 80.4)),
    **_family("randformer", _SML, (76.6, 78.2, 79.5, 81.2, 81.4)),
    **_family("convformer", _BIG, (83.0, 84.1, 84.5, 84.8)),
    **_family("caformer", _BIG, (83.6, 84.5, 85.2, 85.5)),
    **{name: row["paper_top1"] for name, row in ABLATIONS.items()},
}

# Reported parameters (millions; trainable only: RandFormer's frozen matrices are listed apart, see
# PAPER_FROZEN_PARAMS_M) and MACs (G) at 224 px.
PAPER_PARAMS_M: dict[str, float] = {
    **_family("poolformer", _SML, (11.9, 21.4, 30.9, 56.2, 73.5)),
    **_family("poolformerv2", _SML, (11.9, 21.3, 30.8, 56.1, 73.3)),
    **_family("identityformer", _SML, (11.9, 21.3, 30.8, 56.1, 73.3)),
    **_family("randformer", _SML, (11.9, 21.3, 30.8, 56.1, 73.3)),
    **_family("convformer", _BIG, (27.0, 40.0, 57.0, 100.0)),
    **_family("caformer", _BIG, (26.0, 39.0, 56.0, 99.0)),
    **{name: row["paper_params_m"] for name, row in ABLATIONS.items()},
}
PAPER_FROZEN_PARAMS_M: dict[str, float] = _family("randformer", _SML, (0.2, 0.5, 0.7, 0.7, 0.9))
PAPER_MACS_G: dict[str, float] = {
    **_family("poolformer", _SML, (1.8, 3.4, 5.0, 8.8, 11.6)),
    **_family("poolformerv2", _SML, (1.8, 3.4, 5.0, 8.8, 11.5)),
    **_family("identityformer", _SML, (1.8, 3.4, 5.0, 8.8, 11.5)),
    **_family("randformer", _SML, (1.9, 3.5, 5.2, 9.0, 11.9)),
    **_family("convformer", _BIG, (3.9, 7.6, 12.8, 22.6)),
    **_family("caformer", _BIG, (4.1, 8.0, 13.2, 23.2)),
    **{name: row["paper_macs_g"] for name, row in ABLATIONS.items()},
}

# Per-size settings that belong to the model: stochastic depth rate and evaluation crop_pct. PoolFormer: the
# paper's settings (drop path 0.1/0.1/0.2/0.3/0.4; crop 0.9 for S, 0.95 for M, as in timm's poolformer cfgs).
# MetaFormer baselines: sail-sg/metaformer scripts/*/train_*.sh (evaluated at crop 1.0). caformer's extra head dropout is not included: it sits inside
# sail-sg's MLP head, which timm's `drop_rate` (dropout before the head) does not reproduce.
_RECIPES: dict[str, tuple[float, float]] = {
    **{
        n: (d, c)
        for n, d, c in zip(
            FAMILIES["poolformer"], (0.1, 0.1, 0.2, 0.3, 0.4), (0.9, 0.9, 0.9, 0.95, 0.95), strict=True
        )
    },
    **{n: (d, 1.0) for n, d in zip(FAMILIES["poolformerv2"], (0.1, 0.1, 0.2, 0.3, 0.4), strict=True)},
    **{n: (d, 1.0) for n, d in zip(FAMILIES["identityformer"], (0.1, 0.1, 0.2, 0.3, 0.4), strict=True)},
    **{n: (d, 1.0) for n, d in zip(FAMILIES["randformer"], (0.1, 0.1, 0.2, 0.3, 0.3), strict=True)},
    **{n: (d, 1.0) for n, d in zip(FAMILIES["convformer"], (0.2, 0.3, 0.4, 0.6), strict=True)},
    **{n: (d, 1.0) for n, d in zip(FAMILIES["caformer"], (0.15, 0.3, 0.4, 0.6), strict=True)},
    # Table 5 varies only the architecture: the ablations keep PoolFormer-S12's settings.
    **{name: (0.1, 0.9) for name in ABLATIONS},
    # The debug model has one block per stage: nothing to drop.
    "poolformer_debug": (0.0, 0.9),
    "poolformer_debug_m": (0.0, 0.9),
}


def paper_recipe(name: str) -> dict[str, float]:
    """The paper's model-side training settings for `name`: ``{"drop_path_rate": ..., "crop_pct": ...}``.

    A pretrained tag (``poolformer_s12.sail_in1k``) is ignored. Raises ValueError for a model without a recorded
    recipe.
    """
    arch = name.split(".", 1)[0]
    if arch not in _RECIPES:
        raise ValueError(
            f"no paper recipe recorded for model {name!r}; models with one: {', '.join(sorted(_RECIPES))}"
        )
    drop_path_rate, crop_pct = _RECIPES[arch]
    return {"drop_path_rate": drop_path_rate, "crop_pct": crop_pct}

"""Registers with timm the MetaFormer-family models that timm lacks.

Importing this module (done by `metaformer_platform.models`) makes these names work in `timm.create_model`:

- ``identityformer_{s12,s24,s36,m36,m48}``: identity token mixer, PoolFormerV2 settings (sail-sg/metaformer).
- ``randformer_{s12,...,m48}``: identity in stages 1-2, frozen random mixing in stages 3-4. The random matrices
  are sized for ``img_size`` (default 224): pass ``img_size=`` to use another input resolution.
- ``poolformer_s12_ablation_*``: the rows of PoolFormer's Table 5 (see `catalog.ABLATIONS`).
- ``poolformer_debug``: PoolFormer with widths 8-16-32-64 and one block per stage, for tests (32 px input);
  ``poolformer_debug_m``: widths 16-32-64-128, blocks 1-1-2-1 (the debug family's second size).

timm's own poolformer/poolformerv2/convformer/caformer are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.models import generate_default_cfgs, register_model
from torch import nn

from .builder import POOLFORMER_V2_STYLE, build_metaformer, default_pretrained_cfg, needs_fixed_input
from .catalog import ABLATIONS, DEBUG_SIZE, DEBUG_SIZE_M, SIZES, ArchArgs, paper_recipe

_RAND_MIXERS = ("identity", "identity", "random", "random")

# Registered name -> complete build_metaformer arguments.
MODEL_SPECS: dict[str, ArchArgs] = {
    **{
        f"identityformer_{s}": {"depths": d, "dims": w, "token_mixers": "identity", **POOLFORMER_V2_STYLE}
        for s, (d, w) in SIZES.items()
    },
    **{
        f"randformer_{s}": {"depths": d, "dims": w, "token_mixers": _RAND_MIXERS, **POOLFORMER_V2_STYLE}
        for s, (d, w) in SIZES.items()
    },
    **{name: ArchArgs(**row["kwargs"]) for name, row in ABLATIONS.items()},
    "poolformer_debug": {"depths": DEBUG_SIZE[0], "dims": DEBUG_SIZE[1], "token_mixers": "pooling"},
    "poolformer_debug_m": {"depths": DEBUG_SIZE_M[0], "dims": DEBUG_SIZE_M[1], "token_mixers": "pooling"},
}


def _cfg_for(name: str, spec: ArchArgs) -> dict[str, object]:
    size = 32 if name.startswith("poolformer_debug") else 224
    return default_pretrained_cfg(
        input_size=(3, size, size),
        crop_pct=paper_recipe(name)["crop_pct"],
        fixed_input_size=needs_fixed_input(spec.get("token_mixers", "pooling")),
        dims=spec["dims"],
    )


# timm's register_model reads the module-level `default_cfgs`, so it must exist before registration.
default_cfgs = generate_default_cfgs({name: _cfg_for(name, spec) for name, spec in MODEL_SPECS.items()})


def _make_entrypoint(name: str, spec: ArchArgs) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # Like timm's own entrypoints, an argument that repeats the spec is an error rather than an override.
        return build_metaformer(**spec, variant=name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: build_metaformer(**{spec!r})"
    return entrypoint


for _name, _spec in MODEL_SPECS.items():
    # Also a module attribute, as in timm's own model modules (timm lists it in this module's __all__).
    globals()[_name] = register_model(_make_entrypoint(_name, _spec))

REGISTERED_MODELS: tuple[str, ...] = tuple(MODEL_SPECS)

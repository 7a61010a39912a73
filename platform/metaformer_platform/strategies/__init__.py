"""Distribution strategies, chosen by name (``strategy.name`` in the job config)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from metaformer_platform.strategies.config import STRATEGY_NAMES

if TYPE_CHECKING:
    from metaformer_platform.strategies.base import Strategy

# name -> "module:Class"; resolved lazily so that reading the config never imports torch or DeepSpeed.
STRATEGIES: dict[str, str] = {
    "ddp": "metaformer_platform.strategies.ddp:DDPStrategy",
    "fsdp": "metaformer_platform.strategies.fsdp:FSDPStrategy",
    "deepspeed": "metaformer_platform.strategies.deepspeed:DeepSpeedStrategy",
}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "STRATEGY_NAMES names the strategies registered here"


def get_strategy_class(name: str) -> type[Strategy]:
    """The Strategy class registered under ``name``."""
    import importlib

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    module, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)

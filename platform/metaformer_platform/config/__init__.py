"""The typed job config (``schema``) apart from loading it (``loading``: YAML, presets, dotted overrides)."""

from metaformer_platform.config.loading import (
    ConfigError,
    config_keys,
    describe_keys,
    load_config,
    parse_override,
    read_yaml,
)
from metaformer_platform.config.schema import (
    DataConfig,
    JobConfig,
    ModelConfig,
    OptimConfig,
    RunSettings,
    ScalingSettings,
    SyntheticDataConfig,
    TrackingConfig,
    TrainerConfig,
)

__all__ = [
    "ConfigError", "DataConfig", "JobConfig", "ModelConfig", "OptimConfig", "RunSettings",
    "ScalingSettings", "SyntheticDataConfig", "TrackingConfig", "TrainerConfig", "config_keys",
    "describe_keys", "load_config", "parse_override", "read_yaml",
]

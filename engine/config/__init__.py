"""The typed run configuration and the DeepSpeed JSON resolver.

One tree of dataclasses holds every setting the engine owns (``engine.config.schema``; each objective's own section
lives with the objective, ``engine.objectives``). Values resolve in three layers (``engine.config.loading``): the
dataclass defaults, then a YAML file, then ``key=value`` overrides with dotted keys (``method.leapalign.alpha=0.1``,
``rewards.0.name=pickscore``, ``output_dir=runs/x``). Every field is type-checked and range-checked in
``__post_init__`` (``engine.sections``); every error is a :class:`ConfigError` with a one-line message naming the
dotted field and the fix.

The DeepSpeed JSON is the single source of ZeRO, precision, optimizer, learning-rate and batch settings
(``engine.config.deepspeed``): nothing here duplicates them.

Example::

    cfg = load_config("configs/flux_hpsv21.yaml", ["method.leapalign.alpha=0.2", "optim.max_steps=10"])
    ds = resolve_deepspeed_config("configs/zero3.json", world_size=16)
    save_config(cfg, f"{cfg.output_dir}/config.yaml")
"""

from engine.config.deepspeed import (
    DEEPSPEED_OPTIMIZERS,
    DEEPSPEED_SCHEDULERS,
    deepspeed_precision,
    resolve_deepspeed_config,
)
from engine.config.loading import config_help, config_to_dict, load_config, save_config
from engine.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
)
from engine.sections import ConfigError

__all__ = [
    "DEEPSPEED_OPTIMIZERS",
    "DEEPSPEED_SCHEDULERS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainConfig",
    "config_help",
    "config_to_dict",
    "deepspeed_precision",
    "load_config",
    "resolve_deepspeed_config",
    "save_config",
]

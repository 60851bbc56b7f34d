"""Typed configuration: one dataclass per config group, registered in Hydra's ConfigStore.

`groups.py` holds the run-wide groups (train, model, data, ...) and the batch arithmetic,
`algos.py` one dataclass per algorithm, `schema.py` the composed config and `validate`, the
checks across groups. Everything is imported from here: `from rltune.config import ...`.

Every field carries a one-line docstring (the string literal under it); `rltune --help-config`
and the README's config reference are generated from the same place. The YAML files in `conf/`
only pick values: each starts with `defaults: [base_<group>, _self_]`, so a misspelt key
(`algo.betta=0.5`) fails when Hydra composes the config, before anything is loaded.

Batch semantics, stated once (the README repeats it):

    train.batch_size        examples per optimizer step, summed over all processes
    train.micro_batch_size  examples per forward/backward pass on one process
    grad_accum              = batch_size / (micro_batch_size * world_size), derived

`train.grad_accum`, when set, takes precedence: batch_size becomes
micro_batch_size * grad_accum * world_size. The resolved numbers are logged at start.
"""

from rltune.config.algos import (
    ALGO_CONFIGS,
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RMConfig,
    RSConfig,
    SFTConfig,
)
from rltune.config.groups import (
    BatchPlan,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    LoggerConfig,
    ModelConfig,
    PeftConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
    check_groups,
)
from rltune.config.schema import (
    CHOICES,
    GROUPS,
    RLTuneConfig,
    check_algorithm,
    field_docs,
    register_configs,
    validate,
)

__all__ = [
    "ALGO_CONFIGS",
    "CHOICES",
    "GROUPS",
    "BatchPlan",
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "GRPOConfig",
    "LoggerConfig",
    "ModelConfig",
    "PPOConfig",
    "PeftConfig",
    "RLTuneConfig",
    "RMConfig",
    "RSConfig",
    "RewardConfig",
    "RolloutConfig",
    "SFTConfig",
    "TrainConfig",
    "check_algorithm",
    "check_groups",
    "field_docs",
    "register_configs",
    "validate",
]

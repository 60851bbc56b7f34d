"""The whole composed config (RLTuneConfig), its registration in Hydra's ConfigStore, and
`validate`: the value checks across groups that the schema's types cannot express."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rltune.config.algos import ALGO_CONFIGS, GRPOConfig, RSConfig
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


@dataclass
class RLTuneConfig:
    algo: Any = MISSING
    """The algorithm and its hyperparameters (config group)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model (config group)."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient fine-tuning (config group)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (config group)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Experiment logging (config group)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward functions and reward model of the online algorithms (config group)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of completions in the online algorithms."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO (config group)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The trainer loop."""


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "logger": LoggerConfig,
    "reward": RewardConfig,
    "deepspeed": DeepSpeedConfig,
}


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore: `base_<x>` nodes the YAML presets extend."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RLTuneConfig)
    for name, cls in ALGO_CONFIGS.items():
        cs.store(group="algo", name=f"base_{name}", node=cls)
    for group, cls in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=cls)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[stmt.target.id] = str(nxt.value.value)
    return docs


CHOICES: dict[str, tuple[str, ...]] = {
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "peft.method": ("none", "lora", "qlora"),
    "data.format": (
        "auto",
        "text",
        "instruction",
        "prompt_completion",
        "chat",
        "sharegpt",
        "preference",
        "prompt_answer",
    ),
    "logger.backend": ("none", "wandb"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "algo.loss_type": ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo"),
    "algo.scale_rewards": ("group", "batch", "none"),
    "algo.estimator": ("grpo", "rloo", "reinforce"),
    "algo.critic_init": ("auto", "reward", "policy"),
    "algo.loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
    "algo.importance_level": ("token", "sequence"),
    "rollout.engine": ("auto", "fast", "hf"),
}
"""Keys whose value must be one of a fixed set, checked before anything is loaded."""


ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""The common attention implementations; others are checked against transformers' registry
(which also takes hub kernels named org/name)."""


def check_algorithm(algo: Any) -> None:
    """algo.name must name an algorithm whose config class is the one composed (algo=sft
    algo.name=dpo would run DPO on SFT's settings)."""
    configs = {**ALGO_CONFIGS, "rloo": GRPOConfig, "reinforce": GRPOConfig}  # GRPO's variants
    expected = configs.get(algo.name)
    if expected is None:
        raise ConfigError(
            f"algo.name={algo.name!r} is not one of: {', '.join(configs)} "
            "(choose the algorithm with algo=NAME)"
        )
    if not isinstance(algo, expected):
        raise ConfigError(
            f"algo.name={algo.name!r} does not match the composed algo group "
            f"({type(algo).__name__}); choose the algorithm with algo={algo.name}"
        )


def check_finite(cfg: RLTuneConfig) -> None:
    """Every number setting of every group (and model.lrs) a finite number: nan passes every
    range check below (nan < 0 is false), and nan or inf in a learning rate, a clip, a
    coefficient or a temperature fails only once training runs, or quietly breaks it."""
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(node):
            continue
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                if isinstance(v, float) and not math.isfinite(v):
                    key = f"{section.name}.{f.name}" + (f".{sub}" if sub is not None else "")
                    raise ConfigError(f"{key}={v} must be a finite number")


def validate(cfg: RLTuneConfig) -> None:
    """Value checks that the schema's types cannot express. Raises ConfigError naming the key."""
    check_finite(cfg)
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if not hasattr(getattr(cfg, section), name):
            continue  # e.g. algo.loss_type exists only for some algorithms
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    t = cfg.train
    positive = {
        "train.micro_batch_size": t.micro_batch_size,
        "train.batch_size": t.batch_size,
        "train.log_every": t.log_every,
        "data.max_length": cfg.data.max_length,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be -1 (use train.epochs) or >= 1")
    if t.profile_step < 0 or (t.max_steps > 0 and t.profile_step > t.max_steps):
        raise ConfigError(
            f"train.profile_step={t.profile_step} must be 0 (off) or a step from 1 to "
            f"train.max_steps={t.max_steps}"
        )
    if t.max_steps == -1 and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs} must be > 0 when train.max_steps is -1")
    for key in ("eval_every", "save_every", "keep_checkpoints", "eval_samples"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    for key, value in (("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"train.{key}={value} must be in [0, 1)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if not t.adam_eps > 0:
        raise ConfigError(f"train.adam_eps={t.adam_eps} must be > 0")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.max_grad_norm < 0:
        raise ConfigError(f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0: no clipping)")
    if not 0 <= t.seed < 2**32:  # numpy's seed range; the trainer seeds numpy with it
        raise ConfigError(f"train.seed={t.seed} must be in [0, 2**32 - 1]")
    if t.device != "auto":
        import torch

        try:
            torch.device(t.device)
        except RuntimeError:
            raise ConfigError(
                f"train.device={t.device!r} is not a device: auto, cpu, cuda, cuda:N, mps, ..."
            ) from None
    check_algorithm(cfg.algo)
    # the batch arithmetic too, so that a sweep's pre-check finds a bad combination in any job
    plan = BatchPlan.from_config(t, int(os.environ.get("WORLD_SIZE", "1")))
    # the online algorithms' batches count completions in whole groups; rejection sampling's
    # count the accepted examples, one per prompt
    group_size = getattr(cfg.algo, "group_size", None)
    if group_size is not None and not isinstance(cfg.algo, RSConfig):
        check_groups(plan, group_size, explicit_accum=t.grad_accum is not None)
    if cfg.model.dtype == "fp16" and cfg.peft.method == "none":
        raise ConfigError(
            "model.dtype=fp16 with peft=none would train fp16 weights in place, with no fp32 "
            "master copy or loss scaling: updates underflow and the model breaks. Use "
            "model.dtype=auto (fp32 master weights, bf16 compute on GPUs) or bf16, or keep an "
            "fp16 base frozen under peft=lora"
        )
    attn = cfg.model.attn_implementation
    if attn is not None and attn not in ATTENTION and "/" not in attn:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
        if attn not in known:
            raise ConfigError(
                f"model.attn_implementation={attn!r} is not one of: {', '.join(known)} "
                "(or a hub kernel, org/name)"
            )
    if cfg.peft.method != "none":
        p = cfg.peft
        if p.r < 1 or not p.alpha > 0 or not 0.0 <= p.dropout < 1.0:
            raise ConfigError(
                f"peft.r={p.r} must be >= 1, peft.alpha={p.alpha} > 0 and "
                f"peft.dropout={p.dropout} in [0, 1)"
            )
        from rltune.lora import lora_targets

        lora_targets(p.target_modules)  # its form now; the names once the model has loaded
    if t.lr is not None and t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0 (or null for the algorithm's default)")
    if cfg.data.path is None and cfg.data.task is None:
        raise ConfigError("data.path must be set: data.task is null, so there is no built-in data")
    if cfg.data.path is None and cfg.data.train_size < 1:
        raise ConfigError(f"data.train_size={cfg.data.train_size} must be >= 1")
    if not 0.0 <= cfg.data.eval_ratio < 1.0:
        raise ConfigError(f"data.eval_ratio={cfg.data.eval_ratio} must be in [0, 1)")
    if cfg.data.eval_ratio > 0 and cfg.data.eval_split is not None:
        raise ConfigError(
            f"data.eval_ratio={cfg.data.eval_ratio} and data.eval_split="
            f"{cfg.data.eval_split!r} both choose the eval rows: set one of them"
        )
    if cfg.data.eval_ratio > 0 and cfg.data.eval_path is not None:
        raise ConfigError(
            f"data.eval_ratio={cfg.data.eval_ratio} and data.eval_path="
            f"{cfg.data.eval_path!r} both choose the eval rows: set one of them"
        )
    if cfg.data.path is None and cfg.data.eval_path is not None:
        raise ConfigError(
            f"data.eval_path={cfg.data.eval_path!r} is eval data for data.path, but data.path is "
            f"null (the built-in task {cfg.data.task!r} is used, with its own eval split): set "
            "data.path too, or leave data.eval_path out"
        )
    hub_choices = [  # data.split's default, train, chooses nothing
        f"data.{k}"
        for k, chosen in (
            ("subset", cfg.data.subset is not None),
            ("split", cfg.data.split != "train"),
            ("eval_split", cfg.data.eval_split is not None),
            ("eval_subset", cfg.data.eval_subset is not None),
        )
        if chosen
    ]
    if cfg.data.path is None and hub_choices:
        raise ConfigError(
            f"{' and '.join(hub_choices)} {'choose' if len(hub_choices) > 1 else 'chooses'} "
            f"from a hub dataset, but data.path is null (the built-in task {cfg.data.task!r} is "
            "used): set data.path to a hub dataset id"
        )
    no_hub_eval = cfg.data.eval_path is None and cfg.data.eval_split is None
    if cfg.data.eval_subset is not None and no_hub_eval:  # eval_ratio's rows or none
        raise ConfigError(
            f"data.eval_subset={cfg.data.eval_subset!r} picks the subset of the eval rows read "
            "from the hub, but none are (data.eval_path and data.eval_split are null): set "
            "data.eval_split to a split of data.path, or data.eval_path to a hub dataset id"
        )
    targets = list(cfg.data.columns.values())
    if len(set(targets)) < len(targets):
        raise ConfigError(f"data.columns={dict(cfg.data.columns)} renames two columns to one name")
    if cfg.data.path is None and cfg.data.columns:
        raise ConfigError(
            f"data.columns={dict(cfg.data.columns)} renames the columns of data.path's rows, but "
            f"data.path is null (the built-in task {cfg.data.task!r} is used, with its own columns)"
        )
    if cfg.data.system_prompt is not None and not hasattr(cfg.algo, "group_size"):
        raise ConfigError(
            f"data.system_prompt is for the prompts of online algorithms (grpo, ppo, rloo, "
            f"reinforce, rs), not algo={cfg.algo.name}: put system turns in the data instead"
        )
    if cfg.data.packing and cfg.algo.name != "sft":  # the other algorithms never read it
        raise ConfigError(
            f"data.packing=true packs SFT examples; algo={cfg.algo.name} does not pack its "
            "rows: leave data.packing out"
        )
    if cfg.data.max_new_tokens < 1:
        raise ConfigError(f"data.max_new_tokens={cfg.data.max_new_tokens} must be >= 1")
    r = cfg.rollout
    if not r.temperature > 0:
        raise ConfigError(f"rollout.temperature={r.temperature} must be > 0")
    if not 0.0 < r.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    if r.top_k < 0 or not 0.0 <= r.min_p < 1.0 or r.batch_size < 1:
        raise ConfigError(
            "rollout.top_k must be >= 0, rollout.min_p in [0, 1), rollout.batch_size >= 1"
        )
    if any(not stop for stop in r.stop):  # "" is found at once: every completion one token
        raise ConfigError(
            f"rollout.stop={list(r.stop)} holds an empty string, which would end "
            "every completion after its first token"
        )
    if r.compile and (r.engine == "hf" or not r.cuda_graphs):
        raise ConfigError(
            f"rollout.compile=true compiles the static-cache decode step, which "
            f"rollout.engine={r.engine} rollout.cuda_graphs={r.cuda_graphs} does not run: "
            "set rollout.engine=fast (or auto) and rollout.cuda_graphs=true"
        )
    if not cfg.model.path:
        raise ConfigError(
            f"model.path must be set: model={cfg.model.name} model.path=<hub id or local folder>"
        )
    from rltune.models import check_model_folder

    check_model_folder(cfg.model.path, "model.path")
    if cfg.reward.model_path is not None:  # before the memory check reads its config
        check_model_folder(cfg.reward.model_path, "reward.model_path", scalar_head=True)
    if cfg.peft.method == "qlora":
        from rltune.models import check_qlora

        check_qlora(cfg.train.device)
    if not 0 <= cfg.deepspeed.stage <= 3:
        raise ConfigError(f"deepspeed.stage={cfg.deepspeed.stage} must be 0, 1, 2 or 3")
    if cfg.logger.backend == "wandb":
        from rltune.logging import check_wandb_environment

        check_wandb_environment()
    if cfg.deepspeed.config is not None:
        from rltune.distributed import read_user_config

        read_user_config(cfg.deepspeed.config)  # read again when the engine is built
    if t.compile and (cfg.deepspeed.stage > 0 or cfg.deepspeed.config is not None):
        raise ConfigError(
            f"train.compile=true does not combine with deepspeed={cfg.deepspeed.name}: "
            "use deepspeed=none or train.compile=false"
        )
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        raise ConfigError("deepspeed.offload_params=true needs deepspeed.stage=3")
    check = getattr(cfg.algo, "check", None)
    if check is not None:
        check()

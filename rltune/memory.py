"""Memory preflight: what a run's models hold for its whole length, known before any weights load.

A model's parameter count comes from its config alone (the model built on the meta device, so
tied weights count once). From the algorithm's pipeline and the dtypes follow the bytes of each
holding: trained weights with their gradients and AdamW's two moments (each in the weights'
dtype, as torch's AdamW keeps them), frozen copies (reference, reward model, LoRA base) and the
bf16 replica the CUDA-graph decoder reads. Activations, the KV cache and the output layer's
chunks come on top, so the sum is a floor: a run whose floor exceeds the device's free memory
cannot fit, and `check_memory` stops it before the loading starts, with the figures and the
settings that would bring them down.

One process without DeepSpeed only: ZeRO partitions and offloads exactly these states, by rules
of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch

from rltune.config import ConfigError, ModelConfig, RLTuneConfig
from rltune.losses import REFERENCE_FREE_LOSS_TYPES
from rltune.models import DTYPES, resolve_path, scalar_dtype

log = logging.getLogger(__name__)

GIB = 1024**3
ONLINE = ("grpo", "rloo", "reinforce", "ppo", "rs")
"""Algorithms that sample rollouts from the policy (and may score them with reward.model_path)."""


@dataclass(frozen=True)
class Holding:
    role: str
    what: str
    nbytes: int


def amount(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def describe(held: list[Holding]) -> str:
    """'policy: weights fp32 1.8 GiB, ...; reference: frozen fp32 1.8 GiB', a role at a time."""
    roles: dict[str, list[str]] = {}
    for h in held:
        roles.setdefault(h.role, []).append(f"{h.what} {amount(h.nbytes)}")
    return "; ".join(f"{role}: {', '.join(parts)}" for role, parts in roles.items())


@functools.lru_cache(maxsize=8)
def _count(path: str, revision: str | None, trust_remote_code: bool, scalar_head: bool) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code
    )
    if scalar_head:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def parameter_count(path: str, model_cfg: ModelConfig, *, scalar_head: bool = False) -> int:
    """Parameters of the model at `path` (a causal LM, or with a one-output score head in place
    of the output layer), counted from its config without loading a weight."""
    return _count(resolve_path(path), model_cfg.revision, model_cfg.trust_remote_code, scalar_head)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _trained(role: str, params: int, dtype: torch.dtype) -> list[Holding]:
    each = params * _size(dtype)
    name = _name(dtype)
    return [
        Holding(role, f"weights {name}", each),
        Holding(role, f"gradients {name}", each),
        Holding(role, f"AdamW moments {name}", 2 * each),
    ]


def _needs_reference(cfg: RLTuneConfig) -> bool:
    algo = cfg.algo
    if cfg.peft.method != "none":
        return False  # the policy with its adapters disabled
    if algo.name == "dpo":
        return algo.loss_type not in REFERENCE_FREE_LOSS_TYPES and not algo.precompute_ref
    return getattr(algo, "kl_coef", 0) > 0


def model_states(
    cfg: RLTuneConfig, *, compute_dtype: torch.dtype, device: torch.device
) -> list[Holding]:
    """What the run's models hold on `device` from the first step to the last."""
    m, algo = cfg.model, cfg.algo
    weights = torch.float32 if m.dtype == "auto" else DTYPES[m.dtype]
    scalar = scalar_dtype(m)  # a trained reward model's and PPO's value model's weights
    if algo.name == "rm":
        params = parameter_count(m.path, m, scalar_head=True)
        if cfg.peft.method == "none":
            return _trained("reward model", params, scalar)
        return [Holding("reward model", f"frozen base {_name(scalar)}", params * _size(scalar))]

    params = parameter_count(m.path, m)
    if cfg.peft.method == "qlora":  # 4-bit NF4: half a byte per weight, a floor
        held = [Holding("policy", "frozen base 4-bit", params // 2)]
    elif cfg.peft.method == "lora":
        base = compute_dtype if m.dtype == "auto" else weights
        held = [Holding("policy", f"frozen base {_name(base)}", params * _size(base))]
    else:
        held = _trained("policy", params, weights)
    if _needs_reference(cfg):
        held.append(Holding("reference", f"frozen {_name(weights)}", params * _size(weights)))
    if algo.name not in ONLINE:
        return held

    graph_replica = (
        device.type == "cuda"
        and cfg.rollout.engine != "hf"
        and cfg.rollout.cuda_graphs
        and cfg.peft.method == "none"
        and weights != compute_dtype
    )
    if graph_replica:  # the decoder's copy of the policy in the compute dtype
        held.append(
            Holding(
                "policy", f"decoding replica {_name(compute_dtype)}", params * _size(compute_dtype)
            )
        )
    reward_path = cfg.reward.model_path
    if reward_path is not None:
        scored = parameter_count(
            reward_path, dataclasses.replace(m, revision=None), scalar_head=True
        )
        held.append(
            Holding("reward model", f"frozen {_name(compute_dtype)}", scored * _size(compute_dtype))
        )
    if algo.name == "ppo":  # the critic, fully trained (rltune.models.load_value_model)
        critic = parameter_count(m.path, m, scalar_head=True)
        if reward_path is not None and algo.critic_init != "policy":
            # from the reward model, unless its tokenizer differs (then the policy): the smaller
            critic = min(critic, scored)
        held.extend(_trained("value model", critic, scalar))
    return held


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device`: the GPU's free memory, or the host's
    MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _alternatives(cfg: RLTuneConfig, free: int, **where) -> list[str]:
    """Settings that bring the floor down, each with the floor it gives."""
    options = []

    def option(setting: str, why: str, changed: RLTuneConfig) -> None:
        total = sum(h.nbytes for h in model_states(changed, **where))
        fits = ", below the free memory" if total <= free else ""
        options.append(f"{setting} ({why}: {amount(total)}{fits})")

    if cfg.peft.method == "none":
        if cfg.model.dtype in ("auto", "fp32"):
            model = dataclasses.replace(cfg.model, dtype="bf16")
            weights = "weights, gradients and moments in bf16"
            option("model.dtype=bf16", weights, dataclasses.replace(cfg, model=model))
        peft = dataclasses.replace(cfg.peft, method="lora")
        option(
            "peft=lora", "the base frozen, no reference copy", dataclasses.replace(cfg, peft=peft)
        )
    options.append("deepspeed=zero3 over several GPUs, or deepspeed=zero3_offload")
    return options


def check_memory(cfg: RLTuneConfig, *, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Log the run's floor of model states; raise ConfigError when it exceeds the free memory
    of `device` (train.memory_check=false skips the check)."""
    where = {"compute_dtype": compute_dtype, "device": device}
    try:
        held = model_states(cfg, **where)
    except Exception as err:  # a config the meta device cannot build: loading will tell
        log.warning("memory: model states not counted (%s: %s)", type(err).__name__, err)
        return
    total = sum(h.nbytes for h in held)
    free = free_memory(device)
    log.info(
        "memory: model states %s%s (%s); activations and caches come on top",
        amount(total),
        f" of {amount(free)} free on {device}" if free is not None else "",
        describe(held),
    )
    if free is None or total <= free:
        return
    options = "\n  ".join(_alternatives(cfg, free, **where))
    raise ConfigError(
        f"model.path={cfg.model.path} with algo={cfg.algo.name}: the models' weights, gradients "
        f"and optimizer states alone need {amount(total)} ({describe(held)}), and {device} has "
        f"{amount(free)} free. Settings that need less:\n  {options}\n"
        "or train.memory_check=false to try anyway"
    )

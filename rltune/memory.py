"""Memory preflight: what a run's models hold for its whole length, known before any weights load.

A model's parameter count comes from its config alone (the model built on the meta device, so
tied weights count once). From the algorithm's pipeline and the dtypes follow the bytes of each
holding: trained weights with their gradients and AdamW's two moments (each in the weights'
dtype, as torch's AdamW keeps them), frozen copies (reference, reward model, LoRA base) and the
bf16 replica the CUDA-graph decoder reads. Activations, the KV cache and the output layer's
chunks come on top, so the sum is a floor: a run whose floor exceeds the device's free memory
cannot fit, and `check_memory` stops it before the loading starts, with the figures and the
settings that would bring them down.

Under DeepSpeed (`Layout`) each process counts its own share: ZeRO partitions these very
states and moves some to the CPU, by its stage and offload settings.
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


@dataclass(frozen=True)
class Holding:
    role: str
    what: str
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where the states live: plain PyTorch on one device (stage None), or DeepSpeed ZeRO of
    `stage` over `world` processes, which holds the trained models in bf16 (`bf16`) or fp32 with
    an fp32 master copy and the moments in its optimizer, partitions what its stage partitions,
    and moves optimizer states or parameters to the CPU."""

    stage: int | None = None
    world: int = 1
    bf16: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False

    @classmethod
    def of(cls, ds_config: dict | None, world: int) -> Layout:
        """The layout of rltune.distributed.deepspeed_config's dict (None: plain PyTorch)."""
        if ds_config is None:
            return cls()
        zero = ds_config.get("zero_optimization", {})

        def on_cpu(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        return cls(
            stage=int(zero.get("stage", 0)),
            world=world,
            bf16=bool(ds_config.get("bf16", {}).get("enabled")),
            offload_optimizer=on_cpu("offload_optimizer"),
            offload_params=on_cpu("offload_param"),
        )

    def share(self, nbytes: int, partitioned_from: int) -> int:
        """This process's bytes of a state that ZeRO partitions from `partitioned_from` on."""
        stage = self.stage if self.stage is not None else -1
        return nbytes // self.world if stage >= partitioned_from else nbytes


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


def _trained(role: str, params: int, dtype: torch.dtype, layout: Layout) -> list[Holding]:
    if layout.stage is None:  # plain PyTorch: AdamW's moments in the weights' dtype
        each = params * _size(dtype)
        name = _name(dtype)
        return [
            Holding(role, f"weights {name}", each),
            Holding(role, f"gradients {name}", each),
            Holding(role, f"AdamW moments {name}", 2 * each),
        ]
    # DeepSpeed: the module in bf16 (or fp32); the optimizer's fp32 master copy (when in bf16)
    # and moments partitioned from stage 1, gradients from stage 2, parameters at stage 3
    width = 2 if layout.bf16 else 4
    name = "bf16" if layout.bf16 else "fp32"
    optimizer = params * (12 if layout.bf16 else 8)
    held = [
        Holding(
            role,
            f"weights {name}",
            0 if layout.offload_params and layout.stage == 3 else layout.share(params * width, 3),
        ),
        Holding(
            role,
            f"gradients {name}",
            0
            if layout.offload_optimizer and layout.stage >= 2
            else layout.share(params * width, 2),
        ),
        Holding(
            role,
            "optimizer fp32"
            + (" (master weights, AdamW moments)" if layout.bf16 else " (AdamW moments)"),
            0 if layout.offload_optimizer else layout.share(optimizer, 1),
        ),
    ]
    return [h for h in held if h.nbytes]


def _frozen(role: str, what: str, params: int, dtype: torch.dtype, layout: Layout) -> Holding:
    """A frozen model: whole in `dtype`, or under DeepSpeed cast to bf16 when it trains in bf16
    and partitioned at stage 3 (rltune.distributed.partition_frozen)."""
    if layout.stage is not None and layout.bf16:
        dtype = torch.bfloat16
    return Holding(role, f"{what} {_name(dtype)}", layout.share(params * _size(dtype), 3))


def _needs_reference(cfg: RLTuneConfig) -> bool:
    algo = cfg.algo
    if cfg.peft.method != "none":
        return False  # the policy with its adapters disabled
    if algo.name == "dpo":
        return algo.loss_type not in REFERENCE_FREE_LOSS_TYPES and not algo.precompute_ref
    return getattr(algo, "kl_coef", 0) > 0


def model_states(
    cfg: RLTuneConfig,
    *,
    compute_dtype: torch.dtype,
    device: torch.device,
    layout: Layout = Layout(),
) -> list[Holding]:
    """What the run's models hold on `device` (in one process of `layout`) from the first step
    to the last."""
    m, algo = cfg.model, cfg.algo
    weights = torch.float32 if m.dtype == "auto" else DTYPES[m.dtype]
    scalar = scalar_dtype(m)  # a trained reward model's and PPO's value model's weights
    if algo.name == "rm":
        params = parameter_count(m.path, m, scalar_head=True)
        if cfg.peft.method == "none":
            return _trained("reward model", params, scalar, layout)
        return [_frozen("reward model", "frozen base", params, scalar, layout)]

    params = parameter_count(m.path, m)
    if cfg.peft.method == "qlora":  # 4-bit NF4: half a byte per weight, a floor
        held = [Holding("policy", "frozen base 4-bit", layout.share(params // 2, 3))]
    elif cfg.peft.method == "lora":
        base = compute_dtype if m.dtype == "auto" else weights
        held = [_frozen("policy", "frozen base", params, base, layout)]
    else:
        held = _trained("policy", params, weights, layout)
    if _needs_reference(cfg):
        held.append(_frozen("reference", "frozen", params, weights, layout))
    if not hasattr(algo, "group_size"):  # rollouts (and reward.model_path): online algorithms
        return held

    graph_replica = (
        layout.stage is None
        and device.type == "cuda"
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
        held.append(_frozen("reward model", "frozen", scored, compute_dtype, layout))
    if algo.name == "ppo":  # the critic, fully trained (rltune.models.load_value_model)
        critic = parameter_count(m.path, m, scalar_head=True)
        if reward_path is not None and algo.critic_init != "policy":
            # from the reward model, unless its tokenizer differs (then the policy): the smaller
            critic = min(critic, scored)
        held.extend(_trained("value model", critic, scalar, layout))
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


def _alternatives(cfg: RLTuneConfig, free: int, layout: Layout, **where) -> list[str]:
    """Settings that bring the floor down, each with the floor it gives."""
    options = []

    def option(setting: str, why: str, changed: RLTuneConfig, to: Layout = layout) -> None:
        total = sum(h.nbytes for h in model_states(changed, layout=to, **where))
        fits = ", below the free memory" if total <= free else ""
        options.append(f"{setting} ({why}: {amount(total)}{fits})")

    if cfg.peft.method == "none":
        if layout.stage is None and cfg.model.dtype in ("auto", "fp32"):
            model = dataclasses.replace(cfg.model, dtype="bf16")
            weights = "weights, gradients and moments in bf16"
            option("model.dtype=bf16", weights, dataclasses.replace(cfg, model=model))
        peft = dataclasses.replace(cfg.peft, method="lora")
        option(
            "peft=lora", "the base frozen, no reference copy", dataclasses.replace(cfg, peft=peft)
        )
    if layout.stage is None:
        options.append("deepspeed=zero3 over several GPUs, or deepspeed=zero3_offload")
        return options
    if layout.stage < 3:
        why = f"parameters partitioned too, over the {layout.world} processes"
        option("deepspeed=zero3", why, cfg, dataclasses.replace(layout, stage=3))
    if where["device"].type != "cpu" and not (layout.offload_optimizer and layout.offload_params):
        offload = dataclasses.replace(layout, stage=3, offload_optimizer=True, offload_params=True)
        option(
            "deepspeed=zero3_offload", "optimizer states and parameters in CPU memory", cfg, offload
        )
    options.append(
        f"more processes: ZeRO divides what it partitions by their number ({layout.world} now)"
    )
    return options


def check_memory(
    cfg: RLTuneConfig,
    *,
    compute_dtype: torch.dtype,
    device: torch.device,
    layout: Layout = Layout(),
) -> None:
    """Log the run's floor of model states (on one process of `layout`); raise ConfigError
    when it exceeds the free memory of `device` (train.memory_check=false skips the check)."""
    where = {"compute_dtype": compute_dtype, "device": device}
    if device.type == "cpu":  # offloading to the CPU moves nothing off a CPU run's memory
        layout = dataclasses.replace(layout, offload_optimizer=False, offload_params=False)
    try:
        held = model_states(cfg, layout=layout, **where)
    except Exception as err:  # a config the meta device cannot build: loading will tell
        log.warning("memory: model states not counted (%s: %s)", type(err).__name__, err)
        return
    total = sum(h.nbytes for h in held)
    free = free_memory(device)
    per = (
        ""
        if layout.stage is None
        else f" per process (ZeRO-{layout.stage}, {layout.world} process"
        + ("es)" if layout.world > 1 else ")")
    )
    log.info(
        "memory: model states %s%s%s (%s); activations and caches come on top",
        amount(total),
        per,
        f" of {amount(free)} free on {device}" if free is not None else "",
        describe(held),
    )
    if free is None or total <= free:
        return
    options = "\n  ".join(_alternatives(cfg, free, layout, **where))
    raise ConfigError(
        f"model.path={cfg.model.path} with algo={cfg.algo.name}: the models' weights, gradients "
        f"and optimizer states alone need {amount(total)}{per} ({describe(held)}), and {device} "
        f"has {amount(free)} free. Settings that need less:\n  {options}\n"
        "or train.memory_check=false to try anyway"
    )

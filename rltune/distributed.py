"""Processes, ranks and DeepSpeed: everything the loop needs to run on several processes.

One process (no launcher, deepspeed=none) is plain PyTorch. Under `torchrun` / `deepspeed`
(WORLD_SIZE > 1) or with a DeepSpeed stage (deepspeed=zero1|zero2|zero3|zero3_offload, or
deepspeed.config=path.json) the process group is initialised here: gloo on CPU, nccl on CUDA. A
single DeepSpeed process without a launcher gets its rank variables set here.

The loop's batch arithmetic is global (README: batch semantics), so each rank normalises its
micro-batch losses by the *global* step count divided by the world size: DeepSpeed (and DDP)
average gradients over ranks, which then gives exactly the single-process gradient.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rltune.config import ConfigError, DeepSpeedConfig, RLTuneConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def deepspeed_enabled(cfg: DeepSpeedConfig) -> bool:
    return cfg.stage > 0 or cfg.config is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RLTuneConfig) -> Dist:
    """Initialise the process group when there are several processes or DeepSpeed is on."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_ds = deepspeed_enabled(cfg.deepspeed)
    if world_size == 1 and not use_ds:
        return Dist(0, 0, 1)
    if world_size == 1:  # DeepSpeed without a launcher: be rank 0 of 1
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if use_ds:
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        else:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(close_process_group)
    return Dist(rank, local_rank, world_size)


def close_process_group() -> None:
    """Tear down the process group at exit (registered by `init_distributed`): NCCL asks for it
    (pending collectives finish first), and a group left to the interpreter's own teardown can
    abort the process (`terminate called without an active exception`), turning a finished
    run's exit status into a failure. Not after each run: DeepSpeed keeps the group for the
    process's later runs (Hydra multirun, tests)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over ranks (the keys must be the same on every rank, in any order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def shared_denominator(local: float, device: torch.device) -> float:
    """A step-level loss denominator counted on this rank's share of the step (tokens, rows,
    pairs), made global: the sum over ranks, at least 1, divided by the number of ranks. Each rank
    divides its own sum by it and DeepSpeed averages the gradients over ranks, which gives the
    one-process gradient of the whole step; metrics divided by it likewise average over ranks to
    the whole step's mean. The floor applies to the total only, so a rank with nothing to count
    changes nothing."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = all_reduce_sum({"n": local}, device)["n"]
    return max(total, 1.0) / world


def all_reduce_tensor(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over ranks (a copy; unchanged with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank along dim 0 (rank order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """One step's metrics from every rank: `num_tokens` summed, everything else averaged over
    the ranks that reported it (keys may differ between ranks, e.g. skipped updates)."""
    every: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, metrics)
    merged: dict[str, float] = {}
    for key in {k for m in every for k in m}:
        values = [m[key] for m in every if key in m]
        merged[key] = sum(values) if key == "num_tokens" else sum(values) / len(values)
    return merged


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_user_config(config: str) -> dict[str, Any]:
    """The JSON object in the file deepspeed.config names; a ConfigError naming it when it is
    missing or is not a JSON object (checked with the config, before anything loads)."""
    path = Path(config).expanduser()
    if not path.is_file():
        raise ConfigError(f"deepspeed.config={config}: no such file")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"deepspeed.config={config}: not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(
            f"deepspeed.config={config}: not a JSON object of DeepSpeed settings "
            f"(a {type(ds).__name__})"
        )
    return ds


def deepspeed_config(cfg: RLTuneConfig, *, grad_accum: int, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config: the user's JSON (deepspeed.config) or the stage's preset, with the
    loop's own settings filled in so the two never disagree."""
    d = cfg.deepspeed
    if d.config is not None:
        ds = read_user_config(d.config)
    else:
        zero: dict[str, Any] = {"stage": d.stage}
        if d.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if d.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if d.stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
            if d.param_persistence_threshold is not None:
                zero["stage3_param_persistence_threshold"] = d.param_persistence_threshold
        ds = {"zero_optimization": zero}
    t = cfg.train
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=t.max_grad_norm,
        zero_allow_untested_optimizer=True,  # the loop's AdamW (no C++ op to build)
        zero_force_ds_cpu_optimizer=False,  # ... also when offloading it
        steps_per_print=1 << 30,
        wall_clock_breakdown=False,
    )
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds.pop("fp16", None)
    return ds


def partitioned_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (the ZeRO-3 partition, or the whole model)."""
    total = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)
        t = local if local is not None else p
        total += t.numel() * t.element_size()
    return total


def gathered(model: torch.nn.Module):
    """A context in which a ZeRO-3 model's parameters are whole on every rank (for generation
    and export); a no-op for anything else."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def partition_frozen(models: dict[str, torch.nn.Module], ds_config: dict[str, Any]) -> None:
    """Under ZeRO-3, partition frozen models (the reference copy) across ranks in place, as
    DeepSpeed inference engines: each rank keeps its shard and forward passes gather layer by
    layer, in the trained models' dtype. Other stages leave them whole, cast to bf16 when
    DeepSpeed trains in bf16: its engine holds the policy in bf16, and a reference kept in
    fp32 would differ from it at step 0 (a KL above 0 before any update)."""
    zero = ds_config.get("zero_optimization", {})
    if not models:
        return
    if zero.get("stage", 0) != 3:
        if ds_config.get("bf16", {}).get("enabled"):
            for model in models.values():  # parameters only, as DeepSpeed casts the policy:
                for param in model.parameters():  # buffers (rotary inv_freq) stay fp32
                    param.data = param.data.to(torch.bfloat16)
        return
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "zero_optimization": {k: v for k, v in zero.items() if k != "offload_optimizer"},
        "bf16": ds_config.get("bf16", {"enabled": False}),
    }
    for role, model in models.items():
        deepspeed.initialize(model=model, config=config)
        log.warning(
            "deepspeed: %s partitioned, %s bytes on this rank",
            role,
            f"{partitioned_bytes(model):,}",
        )

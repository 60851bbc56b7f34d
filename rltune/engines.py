"""How the loop applies gradients, saves and exports: plain PyTorch, or DeepSpeed ZeRO.

The trainer calls the same five methods either way:

    engine.backward(loss, last=...)   once per micro-batch
    engine.step() -> metrics          once per optimizer step (clip, step, schedule, zero grads)
    engine.save(...) / engine.load(...)
    engine.export(final_dir, tokenizer, dtype)

`PlainEngine` holds one AdamW over the trained model and any models trained beside it (PPO's
value model, each at its own lr and clipped on its own), skips updates whose gradient norm is not
finite, and checkpoints through `rltune.checkpoint`. `DeepSpeedEngine` hands the model, the same
AdamW and the same schedule to `deepspeed.initialize`; DeepSpeed partitions them per the ZeRO
stage, clips, steps and checkpoints (each rank its own shard).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rltune import checkpoint as ckpt
from rltune.config import TrainConfig
from rltune.distributed import Dist, barrier, gathered, partitioned_bytes
from rltune.durable import make_dirs
from rltune.export import export_final
from rltune.lora import is_peft

log = logging.getLogger(__name__)

MAIN = "policy"
"""The role under which the main trained model's loss and engine go (PPO adds "value")."""


def make_optimizer(
    models: list[tuple[torch.nn.Module, float]], t: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """One AdamW over every trained model, each at its own learning rate (PPO's critic has its
    own); no weight decay on biases and norm scales."""
    groups = []
    for model, lr in models:
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups += [
            {"params": decay, "weight_decay": t.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
    return torch.optim.AdamW(
        groups,
        lr=models[0][1],
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        fused=True,  # one kernel per parameter group; PyTorch has it on CPU and CUDA
    )


SETTINGS = ("initial_lr", "betas", "eps", "weight_decay")
"""Per-group optimizer settings that come from the config, not from a checkpoint."""


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The config's settings of each parameter group (the schedule's peak lr as `initial_lr`)."""
    return [{k: group[k] for k in SETTINGS if k in group} for group in optimizer.param_groups]


def restore_settings(optimizer: torch.optim.Optimizer, scheduler: Any, settings) -> None:
    """Put this run's `settings` back after a checkpoint's optimizer and schedule state replaced
    them (`load_state_dict` restores every group's hyperparameters and the schedule's base
    lrs), and set each group's lr to its peak lr x the schedule at the restored step."""
    for group, wanted in zip(optimizer.param_groups, settings, strict=True):
        group.update(wanted)
    scheduler.base_lrs = [w["initial_lr"] for w in settings]
    lrs = [
        b * f(scheduler.last_epoch)
        for b, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


class PlainEngine:
    def __init__(
        self,
        trained: nn.Module,
        extra_models: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        max_grad_norm: float,
    ):
        self.trained, self.extra_models = trained, extra_models
        self.optimizer, self.scheduler = optimizer, scheduler
        self.clip = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.settings = optimizer_settings(optimizer)

    def backward(self, loss: torch.Tensor | dict[str, torch.Tensor], *, last: bool) -> None:
        total = sum(loss.values()) if isinstance(loss, dict) else loss
        total.backward()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self) -> dict[str, float]:
        metrics = {}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.clip).item()
        finite = math.isfinite(grad_norm)
        for role, model in self.extra_models.items():  # each model clipped on its own
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip).item()
            metrics[f"grad_norm/{role}"] = norm
            finite = finite and math.isfinite(norm)
        if finite:
            self.optimizer.step()
        else:
            # a NaN/inf gradient would poison every weight and AdamW moment: skip the update
            # (the schedule still advances, so the run's length is unchanged) and say so
            log.warning("gradient norm is %s: update skipped", grad_norm)
            metrics["skipped_updates"] = 1.0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["grad_norm"] = grad_norm
        return metrics

    def save(
        self, root: Path, step: int, *, trainer_state, algo_state, config_yaml: str, keep: int
    ) -> Path:
        return ckpt.save_checkpoint(
            root,
            step,
            model=self.trained,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra_models=self.extra_models,
            trainer_state=trainer_state,
            algo_state=algo_state,
            config_yaml=config_yaml,
            keep=keep,
        )

    def load(self, path: Path) -> dict[str, Any]:
        return ckpt.load_checkpoint(
            path,
            model=self.trained,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra_models=self.extra_models,
        )

    def apply_config(self) -> None:
        """After `load`: this run's lrs, betas, eps and weight decay, not the checkpoint's."""
        restore_settings(self.optimizer, self.scheduler, self.settings)

    def export(self, final: Path, tokenizer, dtype: torch.dtype) -> None:
        """final/ (and final/<role>/) written beside it, then renamed into place: a crash while
        exporting never leaves a half-written final/ that looks complete."""
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        # training is over: export in the compute dtype (bf16 on GPUs), as the peers do; a LoRA
        # adapter is saved and merged from its fp32 weights, and only the merged model is cast
        export_final(self.trained, tokenizer, tmp, dtype, in_place=True)
        for role, model in self.extra_models.items():  # e.g. final/value/
            export_final(model, tokenizer, tmp / role, dtype)
        ckpt.fsync_tree(tmp)  # the weights on disk before the rename names them final/
        ckpt.replace_dir(tmp, final)


DS_STATE = "deepspeed"
"""Folder of a checkpoint holding DeepSpeed's own (per-rank, partitioned) state."""


class DeepSpeedEngine:
    """One DeepSpeed engine per trained model (the policy; PPO's value model too), each with the
    loop's AdamW at its own lr and the loop's schedule."""

    def __init__(
        self,
        models: dict[str, tuple[nn.Module, float]],
        t: TrainConfig,
        lr_factor,
        ds_config: dict[str, Any],
        dist: Dist,
        device: torch.device,
    ):
        import deepspeed

        self.dist = dist
        self.models = {role: m for role, (m, _) in models.items()}
        self.engines, self.schedulers, self.settings = {}, {}, {}
        self.unreported: set[str] = set()  # roles whose gradient norm the loop measures itself
        self.norms: dict[str, float] = {}
        self.skipped: set[str] = set()  # roles whose DeepSpeed step this loop skipped
        for role, (model, lr) in models.items():
            engine, _, _, scheduler = deepspeed.initialize(
                model=model,
                optimizer=make_optimizer([(model, lr)], t, device),
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
                config=ds_config,
            )
            self.engines[role], self.schedulers[role] = engine, scheduler
            # without ZeRO or a 16-bit optimizer DeepSpeed clips, but keeps no gradient norm
            if not (
                engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()
            ):
                self.unreported.add(role)
            self.settings[role] = optimizer_settings(engine.optimizer)
            log.warning(
                "deepspeed: ZeRO stage %d, rank %d of %d holds %s bytes of %s parameters",
                ds_config.get("zero_optimization", {}).get("stage", 0),
                dist.rank,
                dist.world_size,
                f"{partitioned_bytes(model):,}",
                role,
            )

    def backward(self, loss: torch.Tensor | dict[str, torch.Tensor], *, last: bool) -> None:
        # the loop's losses are already normalised for the whole step: no 1/accumulation scaling;
        # the step's last micro-batch is the accumulation boundary, however many there are
        losses = loss if isinstance(loss, dict) else {MAIN: loss}
        for role, part in losses.items():
            engine = self.engines[role]
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(part, scale_wrt_gas=False)
            if last and role in self.unreported:  # averaged over ranks, not yet clipped
                params = [p for p in engine.module.parameters() if p.grad is not None]
                norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params]
                norm = torch.stack(norms).norm().item() if norms else 0.0
                self.norms[role] = norm
                if not math.isfinite(norm):  # DeepSpeed would apply it: no step at all
                    engine.zero_grad()
                    self.skipped.add(role)
                    continue
            engine.step()
            # The algorithms call the module, not engine.forward, which is where ZeRO-3 counts
            # micro-steps; without this it would overwrite instead of accumulate gradients.
            clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
            if clear is not None:
                clear()

    def lr(self) -> float:
        return self.schedulers[MAIN].get_last_lr()[0]

    def step(self) -> dict[str, float]:
        metrics = {}
        for role, engine in self.engines.items():
            norm = engine.get_global_grad_norm()
            if role in self.unreported:
                norm = self.norms.pop(role, None)
            key = "grad_norm" if role == MAIN else f"grad_norm/{role}"
            metrics[key] = float(norm) if norm is not None else float("nan")
            # a non-finite gradient: the update was skipped, by DeepSpeed's 16-bit optimizer
            # or above; as in the plain engine the schedule still advances and the step says so
            held_back = role in self.skipped or not engine.was_step_applied()
            if held_back or not math.isfinite(metrics[key]):
                log.warning("%s: gradient norm is %s: update skipped", role, metrics[key])
                metrics["skipped_updates"] = 1.0
            if held_back:  # DeepSpeed's step did not run or held its schedule back
                self.schedulers[role].step()
        self.skipped.clear()
        return metrics

    def save(
        self, root: Path, step: int, *, trainer_state, algo_state, config_yaml: str, keep: int
    ) -> Path:
        """Every rank writes its shards, RNG and algorithm state into a temporary folder; rank
        0 adds the loop's state and renames it into place once all ranks are done."""
        tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
        if self.dist.main:
            make_dirs(root)
            ckpt.clear_temporaries(root)
            tmp.mkdir()
        barrier()
        for role, engine in self.engines.items():
            engine.save_checkpoint(str(tmp / DS_STATE / role), tag="state")
        torch.save(ckpt.rng_state(), tmp / f"rng-{self.dist.rank}.pt")
        torch.save(algo_state, tmp / ckpt.algo_file(self.dist.rank))
        barrier()
        if self.dist.main:
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / ckpt.STATE_FILE).write_text(
                json.dumps({"step": step, **trainer_state}, indent=2)
            )
            ckpt.fsync_tree(tmp)  # every rank's files on disk before the rename makes them a step
            ckpt.replace_dir(tmp, final)
            ckpt.rotate(root, keep)
        barrier()
        return final

    def load(self, path: Path) -> dict[str, Any]:
        for role, engine in self.engines.items():
            engine.load_checkpoint(str(path / DS_STATE / role), tag="state")
        ckpt.set_rng_state(torch.load(path / f"rng-{self.dist.rank}.pt", weights_only=False))
        return json.loads((path / ckpt.STATE_FILE).read_text())

    def apply_config(self) -> None:
        """After `load`: this run's lrs, betas, eps and weight decay, not the checkpoint's."""
        for role, engine in self.engines.items():
            restore_settings(engine.optimizer, self.schedulers[role], self.settings[role])

    def export(self, final: Path, tokenizer, dtype: torch.dtype) -> None:
        """final/ (and final/<role>/) in Hugging Face format from rank 0, with ZeRO-3 parameters
        gathered first; written beside final/, then renamed into place. As in the plain engine a
        LoRA adapter is saved and merged from fp32 weights (DeepSpeed's master copy: in bf16 its
        module holds bf16 roundings of them) and only the merged model is cast to `dtype`. A full
        model is exported from the module's weights: `dtype` is the one DeepSpeed trains in, and
        DeepSpeed copies each fp32 master into them rounded once to it, which is what casting the
        master would write. Training is over, so a LoRA model is merged into itself, as in the
        plain engine: a merged copy would hold a second base on rank 0 (under ZeRO-3, beside the
        gathered one)."""
        tmp = final.with_name(f".tmp-{final.name}")
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
        for role, model in self.models.items():
            with gathered(model), fp32_adapters(model, self.engines[role].optimizer):
                if self.dist.main:
                    out = tmp if role == MAIN else tmp / role
                    export_final(model, tokenizer, out, dtype, in_place=True)
            barrier()
        if self.dist.main:
            ckpt.fsync_tree(tmp)  # the weights on disk before the rename names them final/
            ckpt.replace_dir(tmp, final)
        barrier()


def fp32_masters(params: list[nn.Parameter], optimizer: Any) -> list[torch.Tensor | None]:
    """The whole fp32 master value that DeepSpeed's `optimizer` keeps of each 16-bit parameter in
    `params` (None for an fp32 one: it is its own master). Collective at ZeRO stages 1-3 (one
    all-reduce or all-gather per parameter): every rank calls it with the same parameters."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    # stage 0 in bf16 wraps the loop's AdamW in FP16_UnfusedOptimizer, which keeps an fp32 copy
    # of each parameter beside it; safe_get_full_fp32_param knows only ZeRO's partitions
    copies = {}
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            copies.update({id(low): high for low, high in zip(lows, highs, strict=True)})
    masters: list[torch.Tensor | None] = []
    missing = 0
    for param in params:
        master = None
        if param.dtype != torch.float32:
            master = copies.get(id(param))
            if master is None:
                master = safe_get_full_fp32_param(param)
            missing += master is None
        masters.append(None if master is None else master.detach())
    if missing:
        log.warning(
            "%d 16-bit parameters have no fp32 master in %s: exported as they are",
            missing,
            type(optimizer).__name__,
        )
    return masters


@contextlib.contextmanager
def fp32_adapters(model: nn.Module, optimizer: Any):
    """A LoRA model's trainable (adapter) weights set to DeepSpeed's fp32 masters for the block,
    and back after it: the model `export_final` gets, as in the plain engine, fp32 adapters on
    a base in the compute dtype. A full model is left as it is (see `DeepSpeedEngine.export`)."""
    params = [p for p in model.parameters() if p.requires_grad] if is_peft(model) else []
    masters = fp32_masters(params, optimizer)
    held = [p.data for p in params]
    for param, master in zip(params, masters, strict=True):
        if master is not None:
            param.data = master
    try:
        yield
    finally:
        for param, data in zip(params, held, strict=True):
            param.data = data

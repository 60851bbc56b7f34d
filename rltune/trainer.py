"""THE training loop. Every algorithm runs through `train`; none has a loop of its own.

    for step in 1..max_steps:
        batches = algo.next_batches(grad_accum)          # micro-batches of one optimizer step
        for batch in batches: algo.loss(batch).backward()  # each loss already normalised for the step
        clip · optimizer · schedule · log · eval · checkpoint

Around it: resume (exact: weights, optimizer, schedule, RNG and data position), SIGINT/SIGTERM
(finish the step, save a checkpoint, exit), and `train.fail_at_step` (die abruptly, for tests).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import torch

from rltune.algos import BuildContext, build_algorithm
from rltune.checkpoint import (
    check_resumable,
    clear_temporaries,
    config_changes,
    find_resume,
    load_algo_state,
    normal_value,
    rotate,
    set_aside_after,
)
from rltune.config import BatchPlan, ConfigError, RLTuneConfig, TrainConfig
from rltune.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    deepspeed_config,
    deepspeed_enabled,
    init_distributed,
    merge_ranks,
    partition_frozen,
    shared_denominator,
)
from rltune.engines import MAIN, DeepSpeedEngine, PlainEngine, make_optimizer
from rltune.hidden_states import compile_stack
from rltune.logging import METRICS_FILE, MetricsLogger, NullLogger, read_metrics
from rltune.memory import Layout, check_memory
from rltune.models import autocast, count_parameters, disable_dropout, resolve_device, resolve_dtype
from rltune.profiling import StepProfile, memory_metrics, reset_peak_memory

log = logging.getLogger("rltune")

FAIL_EXIT_CODE = 3
"""Exit status of a run ended by train.fail_at_step."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. Carries the signal number."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved at {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


def lr_lambda(t: TrainConfig, max_steps: int):
    """Multiplier of the peak lr for optimizer step i (0-based): linear warmup that never uses a
    zero lr, then cosine, linear or constant down to min_lr_ratio."""
    warmup = math.ceil(t.warmup_ratio * max_steps)
    if t.scheduler not in ("cosine", "linear", "constant"):
        raise ConfigError(
            f"train.scheduler={t.scheduler!r} is not one of: cosine, linear, constant"
        )

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if t.scheduler == "constant":
            return 1.0
        progress = min(1.0, (i - warmup) / max(1, max_steps - warmup))
        if t.scheduler == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return factor


def lr_key(cfg: RLTuneConfig) -> str:
    """This run's key in model.lrs: the algorithm's name, with `_lora` under LoRA."""
    return cfg.algo.name + ("_lora" if cfg.peft.method in ("lora", "qlora") else "")


def preset_mismatch(cfg: RLTuneConfig) -> str | None:
    """A warning when model.path names another model than its preset's own while settings
    tuned for that preset apply (its model.lrs, conf/tuned/<algo>_<preset>.yaml): `rltune
    model.path=/my/model` keeps the default preset, tiny, whose rates are 100 times an 8B
    model's."""
    from omegaconf import OmegaConf

    from rltune.cli import conf_dir

    conf = conf_dir()
    preset = conf / "model" / f"{cfg.model.name}.yaml"
    own = OmegaConf.load(preset).get("path") if preset.exists() else None
    if own is None or normal_value("model.path", own) == normal_value("model.path", cfg.model.path):
        return None
    key = lr_key(cfg)
    tuned = []
    if cfg.train.lr is None and key in cfg.model.lrs:
        tuned.append(f"model.lrs.{key}={cfg.model.lrs[key]}")
    tuned_file = Path("tuned") / f"{cfg.algo.name}_{cfg.model.name}.yaml"
    if (conf / tuned_file).exists():
        tuned.append(f"conf/{tuned_file}")
    if not tuned:
        return None
    if (conf / "model" / f"{cfg.model.path}.yaml").exists():  # a preset's name: tiny_init
        instead = f"model={cfg.model.path}"
    else:
        instead = f"model=custom model.path={cfg.model.path} (the algorithms' defaults)"
    return (
        f"model.path={cfg.model.path} is not model={cfg.model.name}'s own model ({own}), yet "
        f"settings tuned for that model apply: {' and '.join(tuned)}. For another model, use "
        f"{instead}"
    )


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _SignalFlag:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: finishing this step, saving a checkpoint, then exiting", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    cfg: RLTuneConfig, run_dir: Path, *, config_yaml: str, config_dict: dict[str, Any]
) -> Path:
    """Run the configured algorithm to the end; return the exported `final/` folder."""
    t = cfg.train
    d = init_distributed(cfg)
    use_ds = deepspeed_enabled(cfg.deepspeed)
    if d.world_size > 1:
        run_dir = broadcast_object(run_dir)  # every rank writes where rank 0 does
        if not d.main:
            logging.getLogger().setLevel(logging.WARNING)  # one rank narrates
    plan = BatchPlan.from_config(t, d.world_size)
    device = resolve_device(t.device)
    if device.type == "cuda" and d.world_size > 1:
        device = torch.device("cuda", d.local_rank)
    dtype = resolve_dtype(t.dtype, device)
    seed_everything(t.seed)  # the same on every rank: new heads start identical everywhere
    ckpt_root = run_dir / "checkpoints"
    if d.main and ckpt_root.is_dir():  # an interrupted save put back before choosing where
        clear_temporaries(ckpt_root)  # to resume (and before later checkpoints are set aside)
    barrier()
    resume_from = find_resume(t.resume, ckpt_root)
    if resume_from is not None:  # before any model loads
        check_resumable(resume_from, config_dict)
    ds_config = deepspeed_config(cfg, grad_accum=plan.grad_accum, dtype=dtype) if use_ds else None
    if t.memory_check and (use_ds or d.world_size == 1):  # (several without DeepSpeed: refused)
        layout = Layout.of(ds_config, d.world_size)
        check_memory(cfg, compute_dtype=dtype, device=device, layout=layout)

    algo = build_algorithm(
        BuildContext(
            cfg=cfg,
            device=device,
            dtype=dtype,
            run_dir=run_dir,
            plan=plan,
            rank=d.rank,
            world_size=d.world_size,
        )
    )
    if d.world_size > 1:
        seed_everything(t.seed + d.rank)  # from here on each rank samples its own completions
    trained = algo.trained  # the policy (or the reward model for algo=rm)
    if t.compile:  # in place: parameter names, checkpoints and exports stay as they are
        for role, model in algo.models().items():
            compiled = compile_stack(model)
            log.info("train.compile: %s's %s compiled", role, type(compiled).__name__)
    for role, model in algo.models().items():
        trainable, total = count_parameters(model)
        log.info(
            "%s: %s parameters, %s trainable (%.2f%%)",
            role,
            f"{total:,}",
            f"{trainable:,}",
            100 * trainable / max(1, total),
        )
    key = lr_key(cfg)
    if t.lr is not None:
        lr, lr_from = t.lr, "train.lr"
    elif key in cfg.model.lrs:
        lr, lr_from = cfg.model.lrs[key], f"model.lrs.{key} of model={cfg.model.name}"
    else:
        lr_from = "algo.lora_lr" if key.endswith("_lora") else "algo.lr"
        lr = algo.default_lr()
    mismatch = preset_mismatch(cfg)
    if mismatch:
        log.warning("%s", mismatch)
    examples = algo.examples_per_epoch()
    if t.max_steps > 0:
        max_steps = t.max_steps
    elif examples is not None:
        max_steps = max(1, math.ceil(t.epochs * examples / plan.batch_size))
    else:
        raise ConfigError("train.max_steps must be set for an algorithm that generates its batches")
    log.info(
        "batch: %s; %d steps at lr %.3g (%s) on %s (%s)",
        plan.describe(),
        max_steps,
        lr,
        lr_from,
        device,
        str(dtype).replace("torch.", ""),
    )

    # models trained beside the main one (PPO's value model), by role, with their own lr
    extra = algo.extra_trained(lr)
    for role, (_, extra_lr) in extra.items():
        log.info("%s: trained beside the policy at lr %.3g", role, extra_lr)
    extra_models = {role: m for role, (m, _) in extra.items()}
    no_dropout = t.disable_dropout if t.disable_dropout is not None else cfg.algo.name != "sft"
    if no_dropout:
        roles = {id(m): role for role, m in algo.models().items()}
        for model in (trained, *extra_models.values()):
            if changed := disable_dropout(model):
                role = roles.get(id(model), MAIN)
                log.info("%s: %d dropouts set to 0 (train.disable_dropout)", role, changed)
    factor = lr_lambda(t, max_steps)
    if use_ds:
        assert ds_config is not None
        engine: Any = DeepSpeedEngine(
            {MAIN: (trained, lr), **extra}, t, factor, ds_config, d, device
        )
        frozen = {
            role: m for role, m in algo.models().items() if m is not trained and role not in extra
        }
        partition_frozen(frozen, ds_config)
    else:
        if d.world_size > 1:
            raise ConfigError(
                f"{d.world_size} processes need DeepSpeed: add deepspeed=zero2 (or zero1, zero3)"
            )
        optimizer = make_optimizer(
            [(trained, lr), *((m, extra_lr) for m, extra_lr in extra.values())], t, device
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        engine = PlainEngine(trained, extra_models, optimizer, scheduler, t.max_grad_norm)
    logger: Any = (
        MetricsLogger(
            run_dir,
            cfg.logger,
            config=config_dict,
            total_steps=max_steps,
            resuming=resume_from is not None,
        )
        if d.main
        else NullLogger()
    )

    step, pending, total_tokens = 0, {}, 0.0
    if resume_from is not None:
        state = engine.load(resume_from)
        algo.load_state_dict(load_algo_state(resume_from, d.rank, state, device))
        step, pending, total_tokens = state["step"], state["pending"], state["total_tokens"]
        log.info("resumed from %s at step %d", resume_from, step)
        engine.apply_config()  # this run's lr, betas, eps and weight decay, not the saved ones
        for key, (saved, now) in config_changes(resume_from, config_dict).items():
            log.warning("resume: %s was %s in the checkpoint's run, is %s now", key, saved, now)
    if d.main:
        for name, path in set_aside_after(ckpt_root, step):
            if resume_from is None:
                log.warning("checkpoint %s is an earlier run's: kept as %s", name, path)
            else:
                log.warning(
                    "checkpoint %s is past step %d, where this run starts: kept as %s",
                    name,
                    step,
                    path,
                )
        # a crash between a save's rename and its rotation left one checkpoint too many; a run
        # resumed at its last step saves none, so no later save would ever rotate it away
        rotate(ckpt_root, t.keep_checkpoints)
    barrier()
    logger.truncate_after(step if resume_from is not None else -1)

    def snapshot() -> dict[str, Any]:
        return {"pending": pending, "total_tokens": total_tokens}

    def evaluate(at: int) -> dict[str, Any]:
        with autocast(device, dtype):
            metrics, samples = algo.evaluate()
        if samples:
            logger.log_samples(at, list(samples[0]), [list(s.values()) for s in samples])
        evals.append((at, metrics))
        return metrics

    # a resumed run's summary starts from the evaluations already logged (step 0's included)
    evals: list[tuple[int, dict[str, Any]]] = [
        (row["step"], {k: float(v) for k, v in row.items() if k.startswith("eval/")})  # "nan"
        for row in read_metrics(run_dir / METRICS_FILE)
        if resume_from is not None and any(k.startswith("eval/") for k in row)
    ]

    if step == 0:
        initial = evaluate(0)
        if initial:  # nothing to evaluate (no eval data, eval_samples=0): no empty row
            logger.log({"step": 0, **initial})
    logger.start_progress(step)
    for model in (trained, *extra_models.values()):
        model.train()
    with _SignalFlag() as stop:
        while step < max_steps:
            profile = StepProfile(device).start() if step + 1 == t.profile_step and d.main else None
            reset_peak_memory(device)
            started = time.perf_counter()
            batches = algo.next_batches(plan.grad_accum, plan.micro_batch_size)
            # what preparing the batches measured (rollout rewards, generation time, ...)
            step_metrics, samples = algo.report()
            if samples:
                logger.log_samples(step + 1, list(samples[0]), [list(s.values()) for s in samples])
            norm = shared_denominator(algo.normaliser(batches), device)
            train_started = time.perf_counter()
            step_lr = engine.lr()
            for i, batch in enumerate(batches):
                with autocast(device, dtype):
                    loss, metrics = algo.loss(batch, norm)
                engine.backward(loss, last=i == len(batches) - 1)
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v
            step_metrics.update(engine.step())
            step_metrics.update(memory_metrics(device))
            step += 1
            now = time.perf_counter()
            elapsed = now - started
            step_metrics["time/train"] = now - train_started
            if d.world_size > 1:
                step_metrics = merge_ranks(step_metrics)
            tokens = step_metrics.pop("num_tokens", 0.0)
            total_tokens += tokens
            step_metrics.update(tokens_per_s=tokens / elapsed, step_time_s=elapsed)
            if profile is not None:  # after the step's timing: writing the files is not the step
                profile.finish(run_dir, step)
            # metrics are averaged over the steps since the last log that reported them, like the
            # peers' `loss` (with algo.num_iterations > 1 rollout metrics come every few steps)
            for k, v in step_metrics.items():
                total, count = pending.get(k, (0.0, 0))
                if k.startswith("memory/"):  # peaks: the highest of the steps, not their mean
                    pending[k] = (max(total, v), 1)
                else:
                    pending[k] = (total + v, count + 1)
            logger.advance({"loss": step_metrics.get("loss", float("nan")), "lr": step_lr})

            row: dict[str, Any] = {}
            if step % t.log_every == 0 or step == max_steps:
                row.update({k: total / count for k, (total, count) in pending.items()})
                row.update(lr=step_lr, num_tokens=total_tokens)
                if examples:
                    row["epoch"] = algo.epoch()
                pending = {}
            if (t.eval_every and step % t.eval_every == 0) or step == max_steps:
                row.update(evaluate(step))
            if row:
                logger.log({"step": step, **row})
            signum = stop.signum
            # one decision for all ranks (saving is collective): a signal to any stops all
            if d.world_size > 1 and all_reduce_sum({"s": float(signum is not None)}, device)["s"]:
                signum = signum or signal.SIGTERM
            if (t.save_every and step % t.save_every == 0) or signum is not None:
                # rows up to this step on disk before the checkpoint is: a resume from it never
                # writes them again, so a machine crash must not keep one and lose the other
                logger.sync()
                saved = engine.save(
                    ckpt_root,
                    step,
                    trainer_state=snapshot(),
                    algo_state=algo.state_dict(),
                    config_yaml=config_yaml,
                    keep=t.keep_checkpoints,
                )
                if signum is not None:
                    logger.close()
                    raise Interrupted(signum, saved)
            if t.fail_at_step is not None and step == t.fail_at_step:
                os._exit(FAIL_EXIT_CODE)

    logger.close()
    final = run_dir / "final"
    engine.export(final, algo.tokenizer, dtype)
    log.info("done: %d steps; model written to %s", step, final)
    if evals:
        (first_step, first), (last_step, last) = evals[0], evals[-1]
        for key in last:
            if key.endswith("/errors") and not last[key] and not first.get(key):
                continue  # a reward function that never failed: nothing to report
            before = (
                f"{first[key]:.4g} at step {first_step} -> "
                if key in first and first_step != last_step
                else ""
            )
            log.info("%s: %s%.4g at step %d", key, before, last[key], last_step)
    return final

"""Measured runs for scripts/bench.py: rltune through its command line, TRL through its
trainers, and the step timer they share. Each function runs in the process that
`bench.py --one` starts for one (framework, workload, setting)."""

from __future__ import annotations

import time
from pathlib import Path

WARMUP = 2
"""Steps left out of every median (first-call and allocator warm-up)."""


def run_rltune(overrides: list[str]) -> list[dict]:
    """rltune's CLI in this process; the metrics rows of its optimizer steps."""
    from rltune.cli import run
    from rltune.logging import read_metrics

    run_dir = run(overrides)
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [r for r in rows if "step_time_s" in r]


class _StepTimer:
    """Seconds between the ends of consecutive optimizer steps of a transformers Trainer (the
    first from its start); `cuda` waits for the GPU at each end."""

    def __init__(self, cuda: bool = False):
        self.times: list[float] = []
        self._last = None
        self.cuda = cuda

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if timer._last is None:
                    timer._last = timer._now()

            def on_step_end(self, args, state, control, **kw):
                now = timer._now()
                timer.times.append(now - timer._last)
                timer._last = now

        return Cb()


def trl_steps(
    workload: str, model, tokenizer, rows: list[dict], args: dict, **knobs
) -> list[float]:
    """Train `model` with TRL's trainer for `workload` (GRPO, DPO or SFT) on `rows`; `args` are
    the TrainingArguments all three take, `knobs` the trainer's own (GRPO's `reward` function
    among them). Returns the optimizer steps' times."""
    from datasets import Dataset

    timer = _StepTimer(cuda=not args.get("use_cpu", False))
    kw = dict(
        model=model,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer.callback()],
    )
    if workload == "A":
        from trl import GRPOConfig, GRPOTrainer

        reward = knobs.pop("reward")
        trainer = GRPOTrainer(reward_funcs=reward, args=GRPOConfig(**args, **knobs), **kw)
    elif workload == "B":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(args=DPOConfig(**args, **knobs), **kw)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(args=SFTConfig(**args, **knobs), **kw)
    trainer.train()
    return timer.times


def trl_args(output_dir: str, steps: int, gradient_checkpointing: bool | None, cuda: bool) -> dict:
    """The TrainingArguments every TRL run here shares; gradient_checkpointing None keeps TRL's
    default (on)."""
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": False}
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not cuda,
        bf16=cuda,
        dataloader_num_workers=0,
        **extra,
    )

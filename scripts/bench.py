"""Benchmark rltune's training steps, and TRL's on the same workloads (`--compare trl`).

    python scripts/bench.py --cpu                    # the CPU workloads on the tiny model
    python scripts/bench.py --cpu --compare trl      # ... and TRL's trainers, same invocation
    python scripts/bench.py --cpu --json out.json    # also write the table as JSON

The CPU workloads scale DESIGN.md's A (GRPO), B (DPO) and C (SFT) down to the shipped tiny model
and the built-in arithmetic task:

    A  GRPO: 16 prompts x 8 completions per step, up to 16 new tokens, KL coef 0.04,
       micro-batches of 32, one optimizer step per generation batch
    B  DPO:  16 preference pairs per step (frozen reference copy)
    C  SFT:  16 packed rows of 128 tokens per step

Every (framework, workload, setting) runs in its own subprocess, so the peak resident memory
reported is that run's alone. A step's time is the median over the steps after the first two
(warm-up). TRL runs twice: with its defaults, and with its best setting here (gradient
checkpointing off). The ratio column is rltune's step time over the best TRL one (below 1 means
rltune is faster). The GPU workloads at full size are issue 7's next step and are not here yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 12
WARMUP = 2

WORKLOADS = {
    "A": {"name": "GRPO", "unit": "completions", "per_step": 128},
    "B": {"name": "DPO", "unit": "pairs", "per_step": 16},
    "C": {"name": "SFT", "unit": "tokens", "per_step": 16 * 128},
}


# ----------------------------------------------------------------------------- rltune


def rltune_overrides(workload: str, steps: int, run_dir: str) -> list[str]:
    common = [
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_samples=0",
        "train.lr=1e-4",
        "train.device=cpu",
        f"hydra.run.dir={run_dir}",
    ]
    if workload == "A":
        return [
            "algo=grpo",
            "algo.kl_coef=0.04",
            "train.batch_size=128",
            "train.micro_batch_size=32",
            *common,
        ]
    if workload == "B":
        return ["algo=dpo", "train.batch_size=16", "train.micro_batch_size=16", *common]
    return [
        "algo=sft",
        "data.packing=true",
        "data.max_length=128",
        "train.batch_size=16",
        "train.micro_batch_size=16",
        *common,
    ]


def run_rltune(workload: str, steps: int) -> list[float]:
    from rltune.cli import run
    from rltune.logging import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run(rltune_overrides(workload, steps, tmp))
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        return [r["step_time_s"] for r in rows if "step_time_s" in r]


# ----------------------------------------------------------------------------- TRL


class _StepTimer:
    def __init__(self):
        self.times: list[float] = []
        self._last = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if timer._last is None:
                    timer._last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                timer.times.append(now - timer._last)
                timer._last = now

        return Cb()


def _arith_rows(kind: str, n: int) -> list[dict]:
    from rltune.tasks.arith import rows

    return rows(kind, n, seed=0, split="train")


def run_trl(workload: str, steps: int, gradient_checkpointing: bool | None) -> list[float]:
    """TRL's trainer on the workload; gradient_checkpointing None keeps TRL's default."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rltune.models import SHIPPED
    from rltune.tasks.arith import is_correct

    path = str(SHIPPED["tiny"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    timer = _StepTimer()
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": False}
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            output_dir=tmp,
            max_steps=steps,
            learning_rate=1e-4,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            dataloader_num_workers=0,
            **extra,
        )
        if workload == "A":
            from trl import GRPOConfig, GRPOTrainer

            def reward(prompts, completions, answer, **kw):
                texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
                return [float(is_correct(t, a)) for t, a in zip(texts, answer, strict=True)]

            data = Dataset.from_list(_arith_rows("prompt_answer", 16 * (steps + 2)))
            args = GRPOConfig(
                per_device_train_batch_size=32,
                gradient_accumulation_steps=4,
                num_generations=8,
                max_completion_length=16,
                beta=0.04,
                temperature=1.0,
                **common,
            )
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=reward,
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
                callbacks=[timer.callback()],
            )
        elif workload == "B":
            from trl import DPOConfig, DPOTrainer

            data = Dataset.from_list(_arith_rows("preference", 16 * (steps + 2)))
            args = DPOConfig(per_device_train_batch_size=16, beta=0.1, **common)
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
                callbacks=[timer.callback()],
            )
        else:
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_list(_arith_rows("prompt_completion", 120 * (steps + 2)))
            args = SFTConfig(per_device_train_batch_size=16, packing=True, max_length=128, **common)
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
                callbacks=[timer.callback()],
            )
        trainer.train()
    return timer.times


# ----------------------------------------------------------------------------- driver


def one(spec: str, steps: int) -> dict:
    """Run one (framework, workload, setting) in this process; return its measurements."""
    framework, workload, setting = spec.split(":")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if framework == "rltune":
        times = run_rltune(workload, steps)
    else:
        times = run_trl(workload, steps, None if setting == "default" else False)
    measured = times[WARMUP:] or times
    step = statistics.median(measured)
    w = WORKLOADS[workload]
    return {
        "framework": framework,
        "workload": workload,
        "setting": setting,
        "step_time_s": step,
        f"{w['unit']}_per_s": w["per_step"] / step,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_measured": len(measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU workloads (required for now)")
    parser.add_argument("--compare", choices=["trl"], help="also run TRL's trainers")
    parser.add_argument("--workloads", default="ABC")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("BENCH " + json.dumps(one(args.one, args.steps)))
        return
    if not args.cpu:
        parser.error("only the CPU workloads exist so far: pass --cpu")

    specs = [f"rltune:{w}:default" for w in args.workloads]
    if args.compare == "trl":
        specs += [f"trl:{w}:{s}" for w in args.workloads for s in ("default", "no_gc")]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    results = []
    for spec in specs:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", spec, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
        if proc.returncode or not line:
            print(f"{spec}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[0][6:]))
        print(f"done {spec}: {results[-1]['step_time_s']:.3f} s/step", file=sys.stderr)
    report(results, args)


def report(results: list[dict], args) -> None:
    import torch

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    import transformers

    versions["transformers"] = transformers.__version__
    header = (
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{os.environ.get('BENCH_THREADS', '1')} torch thread(s); "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(header)
    print(
        "| workload | framework | setting | step (s) | throughput | peak RSS (MiB) | rltune / best TRL |"
    )
    print("|---|---|---|---|---|---|---|")
    for w in args.workloads:
        rows = [r for r in results if r["workload"] == w]
        trl_best = min((r["step_time_s"] for r in rows if r["framework"] == "trl"), default=None)
        for r in rows:
            unit = WORKLOADS[w]["unit"]
            ratio = (
                f"{r['step_time_s'] / trl_best:.2f}"
                if r["framework"] == "rltune" and trl_best
                else ""
            )
            print(
                f"| {w} {WORKLOADS[w]['name']} | {r['framework']} | {r['setting']} | "
                f"{r['step_time_s']:.3f} | {r[f'{unit}_per_s']:,.0f} {unit}/s | "
                f"{r['peak_rss_mib']:,.0f} | {ratio} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"environment": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()

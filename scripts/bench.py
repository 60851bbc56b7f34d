"""Benchmark rltune's training steps, and TRL's on the same workloads (`--compare trl`).

    python scripts/bench.py --cpu                    # the CPU workloads on the tiny model
    python scripts/bench.py --cpu --compare trl      # ... and TRL's trainers, same invocation
    python scripts/bench.py --gpu                    # DESIGN.md's workloads at full size (CUDA)
    python scripts/bench.py --gpu --compare trl      # ... and TRL's trainers on them, same invocation
    python scripts/bench.py --gpu --small            # the same pipeline shrunk, on this CPU
    python scripts/bench.py ... --json out.json      # also write the table as JSON
    python scripts/bench.py ... --workloads C --extra train.gradient_checkpointing=true

The CPU workloads scale DESIGN.md's A (GRPO), B (DPO) and C (SFT) down to the shipped tiny model
and the built-in arithmetic task:

    A  GRPO: 16 prompts x 8 completions per step, up to 16 new tokens, KL coef 0.04,
       micro-batches of 32, one optimizer step per generation batch
    B  DPO:  16 preference pairs per step (frozen reference copy)
    C  SFT:  16 packed rows of 128 tokens per step

The GPU workloads are DESIGN.md's at full size, on a randomly initialised model of the
Qwen2.5-0.5B architecture (494M parameters, vocabulary 151,936) saved in bf16, with a synthetic
byte-level BPE tokenizer of the same vocabulary; nothing is downloaded. rltune trains it through
its normal command line (model=qwen2.5-0.5b, data=custom) with bf16 autocast over fp32 master
weights. The data are strings of random digits, one token per digit (Qwen's pre-tokeniser
splits digits apart):

    A  GRPO: 16 prompts of 128 tokens x 8 completions of up to 256 new tokens, KL coef 0.04,
       micro-batches of 32; reward: the share of digits in a completion (it only has to vary)
    B  DPO:  16 pairs per step, micro-batches of 8; each side is prompt 128 + response 256 + EOS
       = 385 tokens
    C  SFT:  16 rows of 1024 tokens per step (1023 digits + EOS), one micro-batch

A random policy almost never samples EOS, so A's completions run to 256 tokens (their mean
length is printed under the table). The table adds TRL 1.16's best H100 step time from DESIGN.md's performance
anchors, so the ratio rltune / best TRL appears without TRL installed; it means something only
when the GPU is an H100. With `--compare trl` (TRL, datasets installed) TRL's trainers run the
same workloads in the same invocation, set up as DESIGN.md's anchor script set them up (the
model loaded in bf16, bf16 mixed precision, the same micro-batches, data and reward), and the
ratio is taken against the faster of TRL's two runs instead. `--gpu --small` keeps the vocabulary and tokenizer but shrinks the
model (hidden 64, 2 layers) and the lengths, to check the whole --gpu path on a CPU in a minute
or two.

Every (framework, workload, setting) runs in its own subprocess, so the peak memory reported is
that run's alone. A step's time is the median over the steps after the first two (warm-up). TRL
runs twice: with its defaults, and with its best setting here (gradient checkpointing off). The
ratio column is rltune's step time over the best TRL one (below 1 means rltune is faster).
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench_gpu import (
    GPU_STEPS,
    QWEN25_05B,
    SIZES,
    SMALL_SHAPE,
    check_lengths,
    measure_gpu,
    report_gpu,
    run_trl_gpu,
    save_model,
    synthetic_tokenizer,
    throughput,
    write_data,
)
from bench_runs import WARMUP, run_rltune, trl_args, trl_steps

REPO = Path(__file__).resolve().parent.parent

STEPS = 12

WORKLOADS = {
    "A": {"name": "GRPO", "unit": "completions", "per_step": 128},
    "B": {"name": "DPO", "unit": "pairs", "per_step": 16},
    "C": {"name": "SFT", "unit": "tokens", "per_step": 16 * 128},
}


# ----------------------------------------------------------------------------- CPU workloads
# (the GPU ones are in bench_gpu.py; the runs themselves in bench_runs.py)


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


def _arith_rows(kind: str, n: int) -> list[dict]:
    from rltune.tasks.arith import rows

    return rows(kind, n, seed=0, split="train")


def run_trl(workload: str, steps: int, gradient_checkpointing: bool | None) -> list[float]:
    """TRL's trainer on a CPU workload (the tiny model, the arithmetic task)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rltune.models import SHIPPED
    from rltune.tasks.arith import is_correct

    path = str(SHIPPED["tiny"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        args = trl_args(tmp, steps, gradient_checkpointing, cuda=False) | {"learning_rate": 1e-4}
        if workload == "A":

            def reward(prompts, completions, answer, **kw):
                texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
                return [float(is_correct(t, a)) for t, a in zip(texts, answer, strict=True)]

            rows = _arith_rows("prompt_answer", 16 * (steps + 2))
            knobs = dict(
                per_device_train_batch_size=32,
                gradient_accumulation_steps=4,
                num_generations=8,
                max_completion_length=16,
                beta=0.04,
                temperature=1.0,
                reward=reward,
            )
        elif workload == "B":
            rows = _arith_rows("preference", 16 * (steps + 2))
            knobs = dict(per_device_train_batch_size=16, beta=0.1)
        else:
            rows = _arith_rows("prompt_completion", 120 * (steps + 2))
            knobs = dict(per_device_train_batch_size=16, packing=True, max_length=128)
        return trl_steps(workload, model, tokenizer, rows, args, **knobs)


# ----------------------------------------------------------------------------- driver


def one(spec: str, steps: int, extra: list[str]) -> dict:
    """Run one CPU (framework, workload, setting) in this process; return its measurements."""
    framework, workload, setting = spec.split(":")
    if framework == "rltune":
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_rltune(rltune_overrides(workload, steps, tmp) + extra)
        times = [r["step_time_s"] for r in rows]
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


def spawn(argv: list[str]) -> dict | None:
    """`bench.py *argv --one ...` in a fresh process; its result, or None (stderr shown)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    proc = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO, env=env
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode or not line:
        print(f"{' '.join(argv)}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(line[0][6:])
    name = f"{result['framework']} {result['workload']} {result['setting']}"
    memory = result.get("peak_gpu_gib")
    memory = (
        f"{memory:.1f} GiB GPU" if memory is not None else f"{result['peak_rss_mib']:,.0f} MiB RSS"
    )
    print(f"done {name}: {result['step_time_s']:.3f} s/step, peak {memory}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true", help="the CPU workloads on the tiny model")
    mode.add_argument("--gpu", action="store_true", help="DESIGN.md's workloads at full size")
    parser.add_argument("--small", action="store_true", help="--gpu shrunk to run on a CPU")
    parser.add_argument("--compare", choices=["trl"], help="also run TRL's trainers")
    parser.add_argument("--workloads", default="ABC")
    parser.add_argument(
        "--steps", type=int, help=f"steps per run (default {STEPS}; --gpu: {GPU_STEPS})"
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more rltune overrides, for every rltune run"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--workdir", type=Path, help="--gpu: build the model and data here once, and keep them"
    )
    args = parser.parse_args()
    if args.small and not args.gpu:
        parser.error("--small shrinks the --gpu workloads; pass --gpu --small")
    if args.one:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        if args.gpu:
            framework, workload, setting = args.one.split(":")
            steps = args.steps or GPU_STEPS["small" if args.small else "full"][workload]
            if framework == "trl":
                gc = None if setting == "default" else False
                result = run_trl_gpu(workload, steps, args.workdir, args.small, gc)
            else:
                result = measure_gpu(workload, steps, args.workdir, args.small, args.extra)
        else:
            result = one(args.one, args.steps or STEPS, args.extra)
        print("BENCH " + json.dumps(result))
        return
    if args.gpu:
        main_gpu(parser, args)
        return

    specs = [f"rltune:{w}:default" for w in args.workloads]
    if args.compare == "trl":
        specs += [f"trl:{w}:{s}" for w in args.workloads for s in ("default", "no_gc")]
    results = []
    for spec in specs:
        argv = ["--cpu", "--one", spec, "--steps", str(args.steps or STEPS)]
        result = spawn([*argv, "--extra", *args.extra])
        results += [result] if result else []
    report(results, args)


def main_gpu(parser: argparse.ArgumentParser, args) -> None:
    import torch

    if not args.small and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; --gpu --small runs the same pipeline on a CPU")
    size = "small" if args.small else "full"
    results = []
    with contextlib.ExitStack() as stack:
        if args.workdir:  # kept: built once per size, reused by later invocations
            workdir = args.workdir / size
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rltune-")))
        started = time.perf_counter()
        built = workdir / "built.json"
        if built.exists():
            n_params = json.loads(built.read_text())["parameters"]
        else:
            shape = SMALL_SHAPE if args.small else QWEN25_05B
            n_params = save_model(workdir / "model", shape, synthetic_tokenizer())
            write_data(workdir, SIZES[size])
            built.write_text(json.dumps({"parameters": n_params}))
        lengths = check_lengths(workdir, SIZES[size])
        print(
            f"model ({n_params:,} parameters), tokenizer and data ready in "
            f"{time.perf_counter() - started:.1f} s; lengths {lengths}",
            file=sys.stderr,
        )
        specs = [f"rltune:{w}:{size}" for w in args.workloads]
        if args.compare == "trl":
            specs += [f"trl:{w}:{s}" for w in args.workloads for s in ("default", "no_gc")]
        for spec in specs:
            argv = ["--gpu", "--one", spec, "--workdir", str(workdir)]
            argv += ["--small"] if args.small else []
            argv += ["--steps", str(args.steps)] if args.steps else []
            result = spawn([*argv, "--extra", *args.extra])
            if result:
                results.append(result | throughput(result, SIZES[size], n_params, small=args.small))
                if args.json:  # so far, in case a later run hangs past the caller's timeout
                    args.json.write_text(json.dumps({"partial": True, "results": results}))
    report_gpu(results, args, n_params, lengths)


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

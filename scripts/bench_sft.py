"""SFT throughput on workload C of DESIGN.md: 16 sequences x 1024 tokens per optimizer step.

A randomly initialised Qwen2.5-0.5B-architecture model (nothing downloaded) with the shipped tiny
tokenizer, trained by `rltune` itself through the normal CLI path; prints the median step time
and tokens/s over the timed steps. Needs a CUDA GPU for meaningful numbers.

    python scripts/bench_sft.py --steps 12 --micro 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
SMALL = dict(
    QWEN25_05B,
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)  # a CPU dry run of the script itself


def make_model(folder: Path, shape: dict) -> None:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from rltune.tiny import TINY_INIT_DIR

    config = Qwen2Config(**shape)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_INIT_DIR).save_pretrained(folder)


def make_data(path: Path, docs: int = 400) -> None:
    rng = random.Random(0)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "sum",
        "of",
        "the",
        "numbers",
        "is",
        "42",
        "7",
        "and",
    ]
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(1500))}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--micro", type=int, default=8, help="micro-batch size (16 / micro accumulated)"
    )
    parser.add_argument(
        "--small", action="store_true", help="a tiny model, to check the script on a CPU"
    )
    parser.add_argument("--extra", nargs="*", default=[], help="more rltune overrides")
    args = parser.parse_args()

    from rltune.cli import run
    from rltune.logging import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", SMALL if args.small else QWEN25_05B)
        make_data(tmp / "docs.jsonl")
        run_dir = run(
            [
                f"model.path={tmp / 'model'}",
                f"data.path={tmp / 'docs.jsonl'}",
                "data.max_length=1024",
                f"train.max_steps={args.steps}",
                "train.batch_size=16",
                f"train.micro_batch_size={args.micro}",
                "train.log_every=1",
                "train.eval_samples=0",
                "train.lr=1e-5",
                f"hydra.run.dir={tmp / 'run'}",
                *args.extra,
            ]
        )
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step_time_s" in r]
        timed = rows[2:]  # the first steps include allocator and kernel warm-up
        step = statistics.median(r["step_time_s"] for r in timed)
        tokens = statistics.median(r["tokens_per_s"] for r in timed)
        peak = (
            torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        )
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(
            json.dumps(
                {
                    "workload": "C (SFT 16x1024)",
                    "model": "small" if args.small else "qwen2.5-0.5b (random)",
                    "device": device,
                    "micro_batch": args.micro,
                    "step_s": round(step, 4),
                    "tokens_per_s": round(tokens),
                    "peak_gib": round(peak, 2),
                    "loss_first": rows[0]["loss"],
                    "loss_last": rows[-1]["loss"],
                    "torch": torch.__version__,
                    "extra": args.extra,
                }
            )
        )


if __name__ == "__main__":
    main()

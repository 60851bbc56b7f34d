"""The GPU workloads of scripts/bench.py (`--gpu`): DESIGN.md's A, B and C at full size on a
randomly initialised Qwen2.5-0.5B-architecture model with a synthetic tokenizer of the same
vocabulary, or shrunk (`--small`) to check the same pipeline on a CPU. Builds the model, the
tokenizer and the data in a work folder, measures one run of rltune or TRL on them, and prints
the table. The workloads are described in bench.py's docstring."""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from bench_runs import WARMUP, run_rltune, trl_args, trl_steps

from rltune.models import QWEN2_5_0_5B

QWEN25_05B = QWEN2_5_0_5B
VOCAB_SIZE = QWEN25_05B["vocab_size"]
SMALL_SHAPE = dict(
    QWEN25_05B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
"""--gpu --small: the same vocabulary and tokenizer, a model a CPU trains in seconds."""

SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
"""Qwen2.5's ids of the tiny tokenizer's specials (pad, chat start, EOS); all other ids are BPE."""

SIZES = {
    "full": {
        "A": {"prompts": 16, "group_size": 8, "prompt_len": 128, "new_tokens": 256, "micro": 32},
        "B": {"pairs": 16, "prompt_len": 128, "response_len": 256, "micro": 8},
        "C": {"rows": 16, "row_len": 1024, "micro": 16},
    },
    "small": {
        "A": {"prompts": 4, "group_size": 4, "prompt_len": 32, "new_tokens": 32, "micro": 8},
        "B": {"pairs": 4, "prompt_len": 32, "response_len": 64, "micro": 2},
        "C": {"rows": 4, "row_len": 128, "micro": 4},
    },
}
"""Per-step shapes of the GPU workloads; micro is the micro-batch (completions, pairs, rows)."""

GPU_STEPS = {"full": {"A": 7, "B": 12, "C": 12}, "small": {"A": 4, "B": 4, "C": 4}}
"""Default optimizer steps per run, the first WARMUP untimed (a full GRPO step takes seconds)."""

TRL_H100 = {"A": 9.0, "B": 0.31, "C": 0.22}
"""Step time (s) of TRL 1.16's best setting on one H100 (DESIGN.md, "Performance anchors"):
A defaults (9.0 s with or without gradient checkpointing), B and C gradient checkpointing off."""
H100_BF16_FLOPS = 989e12
"""Dense bf16 peak of an H100 SXM, the denominator of MFU."""


def synthetic_tokenizer():
    """A byte-level BPE `Qwen2Tokenizer` with exactly VOCAB_SIZE ids, built without training.

    Its ids: the 256 byte symbols, every ordered pair of them, then byte triples (a pair and one
    more byte) until the vocabulary is full, around Qwen2.5's ids of the three specials. Each
    merged token comes with the merge that makes it, so BPE accepts the vocabulary. The pipeline
    around the BPE is the one transformers rebuilds for model_type qwen2 (see rltune/tiny.py), so
    the ids survive save -> reload, and every digit is a token of its own.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    from rltune.tiny import chatml_tokenizer

    alphabet = sorted(ByteLevel.alphabet())
    pairs = [(a, b) for a in alphabet for b in alphabet]
    triples = ((a + b, c) for a, b in pairs for c in alphabet)
    merged = VOCAB_SIZE - len(SPECIAL_IDS) - len(alphabet)
    merges = list(itertools.islice(itertools.chain(pairs, triples), merged))
    tokens = alphabet + [a + b for a, b in merges]
    ids = [i for i in range(VOCAB_SIZE) if i not in SPECIAL_IDS.values()]
    vocab = dict(zip(tokens, ids, strict=True)) | SPECIAL_IDS
    return chatml_tokenizer(vocab, merges, model_max_length=QWEN25_05B["max_position_embeddings"])


def save_model(folder: Path, shape: dict, tokenizer) -> int:
    """A randomly initialised Qwen2 model of `shape` and `tokenizer`, saved in bf16 into `folder`;
    returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        **shape,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,  # as in Qwen2.5's config
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a GPU initialises faster
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs measure their own peak memory in their own processes
    return n


def write_data(folder: Path, sizes: dict) -> None:
    """<folder>/{A,B,C}.jsonl: four steps' worth of rows of random digits per workload (longer
    runs go round them again)."""
    rng = random.Random(0)

    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))

    a, b, c = sizes["A"], sizes["B"], sizes["C"]
    rows = {
        "A": [{"prompt": digits(a["prompt_len"])} for _ in range(4 * a["prompts"])],
        "B": [
            {
                "prompt": digits(b["prompt_len"]),
                "chosen": digits(b["response_len"]),
                "rejected": digits(b["response_len"]),
            }
            for _ in range(4 * b["pairs"])
        ],
        # SFT appends EOS to a text row, which makes it exactly row_len tokens
        "C": [{"text": digits(c["row_len"] - 1)} for _ in range(4 * c["rows"])],
    }
    for workload, lines in rows.items():
        text = "".join(json.dumps(row) + "\n" for row in lines)
        (folder / f"{workload}.jsonl").write_text(text)


def check_lengths(folder: Path, sizes: dict) -> dict[str, int]:
    """Token counts of the first row of each workload, encoded as rltune encodes them, with the
    tokenizer reloaded from the model folder; exits when one is not what the workload promises."""
    from transformers import AutoTokenizer

    from rltune.data import encode_sft
    from rltune.data.preference import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    first = {w: json.loads((folder / f"{w}.jsonl").read_text().splitlines()[0]) for w in "ABC"}
    pair = encode_pair(first["B"], tokenizer)
    a, b, c = sizes["A"], sizes["B"], sizes["C"]
    side = b["prompt_len"] + b["response_len"] + 1  # + EOS
    found = {
        "vocabulary": (len(tokenizer), VOCAB_SIZE),
        "eos_id": (tokenizer.eos_token_id, SPECIAL_IDS["<|im_end|>"]),
        "pad_id": (tokenizer.pad_token_id, SPECIAL_IDS["<|endoftext|>"]),
        "A_prompt": (len(tokenizer(first["A"]["prompt"])["input_ids"]), a["prompt_len"]),
        "B_chosen": (len(pair["chosen"]["input_ids"]), side),
        "B_rejected": (len(pair["rejected"]["input_ids"]), side),
        "C_row": (
            len(encode_sft(first["C"], "text", tokenizer, max_length=c["row_len"])[0]["input_ids"]),
            c["row_len"],
        ),
    }
    wrong = {k: v for k, v in found.items() if v[0] != v[1]}
    if wrong:
        sys.exit(f"synthetic tokenizer: (found, expected) differ for {wrong}")
    return {k: v[0] for k, v in found.items()}


def digit_fraction(prompts: list, completions: list[str], **columns) -> list[float]:
    """Workload A's reward: the share of a completion's characters that are digits. A random
    policy samples random tokens, so it varies within a group, which is all GRPO needs here."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def gpu_overrides(workload: str, steps: int, workdir: Path, small: bool, run_dir: str) -> list[str]:
    s = SIZES["small" if small else "full"][workload]
    device = ["train.device=cpu"] if small else ["train.device=cuda", "train.dtype=bf16"]
    common = [
        "model=qwen2.5-0.5b",
        f"model.path={workdir / 'model'}",
        "data=custom",
        f"data.path={workdir / f'{workload}.jsonl'}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_samples=0",
        "train.lr=1e-6",
        *device,
        f"hydra.run.dir={run_dir}",
    ]
    if workload == "A":
        return [
            "algo=grpo",
            f"algo.group_size={s['group_size']}",
            "algo.kl_coef=0.04",
            f"data.max_new_tokens={s['new_tokens']}",
            f"data.max_length={s['prompt_len'] + s['new_tokens']}",
            f"train.batch_size={s['prompts'] * s['group_size']}",
            f"train.micro_batch_size={s['micro']}",
            f"reward.funcs=['{Path(__file__).resolve()}:digit_fraction']",
            *common,
        ]
    if workload == "B":
        return [
            "algo=dpo",
            f"data.max_length={s['prompt_len'] + s['response_len'] + 1}",
            f"train.batch_size={s['pairs']}",
            f"train.micro_batch_size={s['micro']}",
            *common,
        ]
    return [
        "algo=sft",
        f"data.max_length={s['row_len']}",
        f"train.batch_size={s['rows']}",
        f"train.micro_batch_size={s['micro']}",
        *common,
    ]


def measure_gpu(workload: str, steps: int, workdir: Path, small: bool, extra: list[str]) -> dict:
    """One GPU workload through rltune in this process; medians over the timed steps."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix=f"run-{workload}-") as run_dir:
        rows = run_rltune(gpu_overrides(workload, steps, workdir, small, run_dir) + extra)
        table = Path(run_dir) / "profile.txt"  # with --extra train.profile_step=N
        profile = table.read_text() if table.exists() else None
    timed = rows[WARMUP:] or rows

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if key in r]
        return statistics.median(values) if values else None

    cuda = torch.cuda.is_available() and not small
    return {
        "framework": "rltune",
        "workload": workload,
        "setting": "small" if small else "full",
        "step_time_s": median("step_time_s"),
        "steps_measured": len(timed),
        # tokens_per_s is the step's tokens over its time, so their product is the tokens
        "tokens_per_step": statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in timed),
        "time_generate_s": median("time/generate"),
        "time_reward_s": median("time/reward"),
        "time_train_s": median("time/train"),
        "completion_mean_length": median("completions/mean_length"),
        # the trainer restarts the GPU peak every step (memory/peak_gib): the run's is their max,
        # and the peak while generating (memory/generate_peak_gib) says which phase set it
        "peak_gpu_gib": max(
            (r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r), default=None
        )
        if cuda
        else None,
        "generate_peak_gpu_gib": max(
            (r["memory/generate_peak_gib"] for r in rows if "memory/generate_peak_gib" in r),
            default=None,
        ),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "profile": profile,
    }


def throughput(r: dict, sizes: dict, n_params: int, *, small: bool) -> dict:
    """The derived rates of one GPU result, and its ratio to TRL's H100 anchor (None for a
    --small run, which is not the anchor's workload)."""
    s, step = sizes[r["workload"]], r["step_time_s"]
    if r["workload"] == "A":
        completions = s["prompts"] * s["group_size"]
        out = {
            "completion_tokens_per_s": completions * s["new_tokens"] / step,
            "completions_per_s": completions / step,
        }
    elif r["workload"] == "B":
        out = {"pairs_per_s": s["pairs"] / step}
    else:
        tokens_per_s = s["rows"] * s["row_len"] / step
        out = {"tokens_per_s": tokens_per_s, "mfu": 6 * n_params * tokens_per_s / H100_BF16_FLOPS}
    anchor = TRL_H100[r["workload"]]
    return out | {
        "trl_h100_best_s": anchor,
        "rltune_over_best_trl": None if small else step / anchor,
    }


def run_trl_gpu(
    workload: str, steps: int, workdir: Path, small: bool, gradient_checkpointing: bool | None
) -> dict:
    """TRL's trainer on a GPU workload, set up as DESIGN.md's anchor script set it up: the model
    loaded in bf16 (fp32 for --small on a CPU), bf16 mixed precision, the same micro-batches and
    accumulation as rltune's run, lr 1e-6, the same data and reward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = SIZES["small" if small else "full"][workload]
    cuda = torch.cuda.is_available() and not small
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "model", dtype=torch.bfloat16 if cuda else torch.float32
    )
    if cuda:
        model = model.cuda()
    rows = [json.loads(line) for line in (workdir / f"{workload}.jsonl").read_text().splitlines()]
    if workload == "A":
        per_step = s["prompts"] * s["group_size"]
        knobs = dict(
            gradient_accumulation_steps=per_step // s["micro"],
            num_generations=s["group_size"],
            max_completion_length=s["new_tokens"],
            beta=0.04,
            temperature=1.0,
            reward=digit_fraction,
        )
    elif workload == "B":
        per_step = s["pairs"]
        knobs = dict(
            gradient_accumulation_steps=per_step // s["micro"],
            max_length=s["prompt_len"] + s["response_len"] + 1,
            beta=0.1,
        )
    else:
        per_step = s["rows"]
        knobs = dict(
            gradient_accumulation_steps=per_step // s["micro"],
            max_length=s["row_len"],
            dataset_text_field="text",
        )
    rows = rows * (1 + per_step * (steps + 1) // len(rows))  # enough for every step
    with tempfile.TemporaryDirectory() as tmp:
        args = trl_args(tmp, steps, gradient_checkpointing, cuda) | {"learning_rate": 1e-6}
        args["per_device_train_batch_size"] = s["micro"]
        times = trl_steps(workload, model, tokenizer, rows, args, **knobs)
    timed = times[WARMUP:] or times
    return {
        "framework": "trl",
        "workload": workload,
        "setting": "default" if gradient_checkpointing is None else "no_gc",
        "step_time_s": statistics.median(timed),
        "steps_measured": len(timed),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def report_gpu(results: list[dict], args, n_params: int, lengths: dict[str, int]) -> None:
    size = "small" if args.small else "full"
    a, b, c = (SIZES[size][w] for w in "ABC")
    first = results[0] if results else {}
    shape = (
        "--small: Qwen2 hidden 64, 2 layers, fp32 on the CPU"
        if args.small
        else "Qwen2.5-0.5B architecture, bf16 autocast over fp32 master weights, sdpa"
    )
    device = first.get("device", "?")
    if device == "cpu":
        device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    header = (
        f"{'CPU' if args.small else 'GPU'}: {device}; torch {first.get('torch', '?')}, transformers {first.get('transformers', '?')}, Python "
        f"{platform.python_version()}; {shape}, random init, {n_params:,} parameters, "
        f"vocabulary {VOCAB_SIZE:,}; lr 1e-6, eval off; median of the steps after {WARMUP} "
        "warm-up" + (f"; extra overrides {args.extra}" if args.extra else "")
    )
    labels = {
        "A": f"A GRPO: {a['prompts']} x {a['group_size']}, {a['prompt_len']} + "
        f"{a['new_tokens']} tokens, micro {a['micro']}",
        "B": f"B DPO: {b['pairs']} pairs of {lengths['B_chosen']} tokens, micro {b['micro']}",
        "C": f"C SFT: {c['rows']} x {lengths['C_row']} tokens, micro {c['micro']}",
    }
    if args.compare:
        header += (
            "; TRL: the model loaded in "
            + ("fp32" if args.small else "bf16")
            + ", bf16 mixed precision on CUDA, defaults (gradient checkpointing on) and no_gc"
        )
    print(header)
    print(
        "| workload | framework | step (s) | throughput | generate / train / other (s) | "
        "peak memory | TRL 1.16, DESIGN.md anchor, H100 (s) | rltune / best TRL |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in args.workloads:
        rows = [r for r in results if r["workload"] == w]
        live = min((r["step_time_s"] for r in rows if r["framework"] == "trl"), default=None)
        for r in rows:
            step, split = r["step_time_s"], ""
            if w == "A":
                rate = (
                    f"{r['completion_tokens_per_s']:,.0f} completion tok/s, "
                    f"{r['completions_per_s']:,.1f} completions/s"
                )
                if r["framework"] == "rltune":
                    other = step - r["time_generate_s"] - r["time_reward_s"] - r["time_train_s"]
                    split = f"{r['time_generate_s']:.2f} / {r['time_train_s']:.2f} / {other:.2f}"
            elif w == "B":
                rate = f"{r['pairs_per_s']:,.1f} pairs/s"
            else:
                rate = f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%"
            memory = (
                f"{r['peak_gpu_gib']:.1f} GiB GPU"
                if r["peak_gpu_gib"] is not None
                else f"{r['peak_rss_mib']:,.0f} MiB RSS"
            )
            if r.get("generate_peak_gpu_gib") is not None:
                memory += f" ({r['generate_peak_gpu_gib']:.1f} generating)"
            ratio = ""
            if r["framework"] == "rltune" and live:
                ratio = f"{step / live:.2f} (TRL of this run)"
            elif r["framework"] == "rltune":
                ratio = "n/a (--small)" if args.small else f"{r['rltune_over_best_trl']:.2f}"
            name = r["framework"] + ("" if r["framework"] == "rltune" else f" {r['setting']}")
            print(
                f"| {labels[w]} | {name} | {step:.3f} | {rate} | {split} | {memory} | "
                f"{r['trl_h100_best_s']:.2f} | {ratio} |"
            )
    for r in results:
        if r["workload"] == "A" and r.get("completion_mean_length") is not None:
            length = r["completion_mean_length"]
            print(f"A: completions averaged {length:.1f} of {a['new_tokens']} tokens")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": header,
                    "sizes": SIZES[size],
                    "lengths": lengths,
                    "parameters": n_params,
                    "results": results,
                },
                indent=2,
            )
        )

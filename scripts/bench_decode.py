"""Rollout speed of each engine on workload A's generation (DESIGN.md): 16 prompts x 128 tokens,
8 samples each (batch 128), 256 new tokens, on a random Qwen2.5-0.5B-shape policy held as
rltune holds it (fp32 master weights, bf16 autocast). Needs a CUDA GPU for the graph engine.

    python scripts/bench_decode.py                      # hf, dynamic, graph, compiled
    python scripts/bench_decode.py --engines graph --json out.json
    python scripts/bench_decode.py --small              # a tiny shape on CPU: checks the script

Engines: `hf` (transformers `generate`, rollout.engine=hf), `dynamic` (rltune's loop, eager
steps), `graph` (static cache, each step one CUDA-graph replay on a bf16 replica) and
`compiled` (graph, with the step compiled by torch.compile before capture, and the draw
compiled: rollout.compile).
For each: the first call (capture and compile included), the median of the next calls, ms per
decode step (call time / new tokens), completion tokens/s and peak GPU memory; for the graph
engines also one replay alone (the model's step without sampling) and one draw alone (sampling
a token from the step's logits), each timed with CUDA events over 50 calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rltune.models import QWEN2_5_0_5B

SMALL = dict(QWEN2_5_0_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2)


def policy(shape: dict, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape, eos_token_id=151645, pad_token_id=151643)
    with device:
        return Qwen2ForCausalLM(config)  # fp32: trained weights are fp32 masters in rltune


class _Ids:
    """A stand-in tokenizer: EOS and padding ids, and decode to nothing (text is not timed)."""

    eos_token_id, pad_token_id = 151645, 151643

    def batch_decode(self, rows, **kw):
        return ["" for _ in rows]

    def decode(self, row, **kw):
        return ""


def _cuda_ms(fn, calls: int = 50) -> float:
    """Mean GPU time of `fn` over `calls` calls, in ms."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(begin.elapsed_time(end) / calls, 3)


def run(engine: str, model, prompts, params, group: int, device, calls: int) -> dict:
    from rltune.decode import _REPLICAS, fast_sample
    from rltune.models import autocast
    from rltune.rollout import sample

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(calls):
        sync()
        start = time.perf_counter()
        with autocast(device, torch.bfloat16 if device.type == "cuda" else torch.float32):
            if engine == "hf":
                out = sample(model, _Ids(), prompts, params, group_size=group)
            else:
                out, _ = fast_sample(
                    model,
                    _Ids(),
                    prompts,
                    params,
                    group_size=group,
                    decoder="graph" if engine == "compiled" else engine,
                    compile=engine == "compiled",
                    dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                )
        sync()
        times.append(time.perf_counter() - start)
    steps = out.completion_ids.shape[1]
    median = statistics.median(times[1:])
    result = {
        "engine": engine,
        "first_call_s": round(times[0], 3),
        "call_s": round(median, 4),
        "new_tokens": steps,
        "ms_per_decode_step": round(1000 * median / steps, 3),
        "completion_tokens_per_s": round(out.completion_ids.numel() / median),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    replica = _REPLICAS.get(model)  # its decoders by row count, the last used last
    decoder = next(reversed(replica.decoders.values()), None) if replica else None
    if engine in ("graph", "compiled") and decoder is not None and decoder.graph is not None:
        # each replay writes the next cache position: start again after the prompt, so the 50
        # replays stay inside the cache
        for layer in decoder.cache.layers:
            layer.cumulative_length.fill_(decoder.width)
        result["ms_per_replay"] = _cuda_ms(decoder.graph.replay)
        result["ms_per_draw"] = _cuda_ms(lambda: decoder.draw(decoder.logits, params, greedy=False))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="hf,dynamic,graph,compiled")
    parser.add_argument("--calls", type=int, default=4, help="the first is the warm-up")
    parser.add_argument("--small", action="store_true", help="a tiny shape on CPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from rltune.rollout import SamplingParams

    device = torch.device("cpu" if args.small else "cuda")
    shape = SMALL if args.small else QWEN2_5_0_5B
    prompts_n, width, group, new = (4, 16, 2, 8) if args.small else (16, 128, 8, 256)
    model = policy(shape, device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 151000, (prompts_n, width), generator=g).tolist()
    params = SamplingParams(max_new_tokens=new, temperature=1.0)
    rows = []
    for engine in args.engines.split(","):
        print(f"running {engine}", flush=True)
        rows.append(run(engine, model, prompts, params, group, device, args.calls))
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import transformers

    print(
        f"\n{name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"batch {prompts_n * group} ({prompts_n} prompts x {group}), prompt {width}, {new} new "
        "tokens, temperature 1, fp32 master weights + bf16 autocast"
    )
    print(
        "| engine | first call (s) | call (s) | ms / decode step | ms / replay | ms / draw "
        "| tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['first_call_s']} | {r['call_s']} | "
            f"{r['ms_per_decode_step']} | {r.get('ms_per_replay', '')} | "
            f"{r.get('ms_per_draw', '')} | "
            f"{r['completion_tokens_per_s']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "results": rows}, indent=2))


if __name__ == "__main__":
    main()

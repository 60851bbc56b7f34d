"""Peak memory and time of the output layer's log-probs from hidden states
(`logps.linear_token_logps`), forward and backward, at the size of one GRPO micro-batch of
workload A (DESIGN.md) on the Qwen2.5-0.5B vocabulary: what the chunks cost beyond the
output layer's weight and its gradient.

    python scripts/bench_logps.py                       # CUDA if present, else CPU
    python scripts/bench_logps.py --tokens 2048 --entropy-grad

On a GPU the peak is torch.cuda.max_memory_allocated above what was allocated before the call;
on a CPU it is the process's peak resident memory above the same point (one configuration per
process, so the peak is this call's)."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from rltune.logps import linear_token_logps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8704, help="4 groups of 128 + 8 x 256")
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--entropy-grad", action="store_true", help="an entropy bonus's gradient")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    g = torch.randn(args.tokens, device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logps, ent = linear_token_logps(
            hidden, weight, targets, chunk_size=args.chunk, entropy=True
        )
        entropy_term = ent if args.entropy_grad else ent.detach()
        loss = (logps * g).sum() + 0.01 * entropy_term.sum()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tokens": args.tokens,
        "vocab": args.vocab,
        "chunk": args.chunk,
        "entropy_grad": args.entropy_grad,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_above_inputs_gib": round(peak / 2**30, 3),
        "one_fp32_chunk_gib": round(args.chunk * args.vocab * 4 / 2**30, 3),
        "weight_grad_fp32_gib": round(args.vocab * args.hidden * 4 / 2**30, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

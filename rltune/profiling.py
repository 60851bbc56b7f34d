"""Where a step's time and memory go: train.profile_step (one optimizer step under
torch.profiler, written to the run directory) and the memory/* metrics of every step."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("rltune")

TABLE_FILE = "profile.txt"
TRACE_FILE = "profile_trace.json"


class StepProfile:
    """torch.profiler around one optimizer step (rollout, forward, backward and update), begun
    with `start` and ended with `finish`, which writes the operators by their own time (CUDA
    kernels' time first on a GPU) and a Chrome trace."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)

    def start(self) -> StepProfile:
        if self.cuda:
            torch.cuda.synchronize()  # the step's kernels only, none queued before it
        self.profiler.start()
        return self

    def finish(self, run_dir: Path, step: int) -> Path:
        if self.cuda:
            torch.cuda.synchronize()
        self.profiler.stop()
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=40)
        path = run_dir / TABLE_FILE
        path.write_text(f"step {step}, sorted by {sort_by}\n{table}\n")
        self.profiler.export_chrome_trace(str(run_dir / TRACE_FILE))
        log.info("train.profile_step: step %d profiled into %s and %s", step, path, TRACE_FILE)
        return path


GIB = 2**30


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `cuda_peak_gib` (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_gib(device: torch.device) -> float | None:
    """GiB of GPU memory allocated at the peak since `reset_peak_memory`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def memory_metrics(device: torch.device) -> dict[str, float]:
    """memory/peak_gib: the step's peak of allocated GPU memory (CUDA); memory/reserved_gib:
    what the caching allocator holds from the GPU after it; memory/peak_rss_gib: the process's
    peak resident memory so far (where the platform reports it; on Linux it starts from what
    the parent process held when it forked this one)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        out["memory/peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["memory/reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
    try:
        import resource
    except ImportError:  # Windows
        return out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out["memory/peak_rss_gib"] = peak / (GIB if sys.platform == "darwin" else 2**20)
    return out

"""train.profile_step: one optimizer step under torch.profiler, written to the run directory."""

from __future__ import annotations

import logging
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

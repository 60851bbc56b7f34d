"""Where metrics go: `metrics.jsonl` (always), a progress bar (always), wandb (logger=wandb).

`metrics.jsonl` holds one JSON object per logged step, each with `step`. Every row is flushed
as it is written, so a crash loses at most the row being written; a torn last line is skipped
on reading and dropped before new rows are appended. Before each checkpoint both files are
synced to disk, so a machine crash never keeps a checkpoint while losing rows up to its step,
which the resumed run would not write again; each file's name is synced into the run directory
once, when it is created. On resume, rows after the checkpoint's
step belong to the abandoned trajectory: they are moved to `metrics.orphaned.jsonl` (never
deleted) and the main file is rewritten atomically without them (written beside it, synced,
renamed over it, the rename synced); `samples.jsonl` likewise. A move that a crash cut short
is finished by the next resume, not repeated: rows never land in the orphans' file twice.

wandb plots every metric against `step`, a metric of its own, rather than wandb's internal
step: a resumed run goes on in the same wandb run, and the steps it repeats (those after its
checkpoint) are logged again instead of being dropped as out of order. A fresh start in a run
directory gets a new wandb run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from rltune.config import ConfigError, LoggerConfig
from rltune.durable import fsync_dir

log = logging.getLogger("rltune")

METRICS_FILE = "metrics.jsonl"
ORPHANED_FILE = "metrics.orphaned.jsonl"
SAMPLES_FILE = "samples.jsonl"
SAMPLES_ORPHANED = "samples.orphaned.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics file, skipping a torn (unparseable) last line."""
    rows = []
    if not path.exists():
        return rows
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


def _truncate(path: Path, orphans: Path, step: int) -> tuple[int, bool]:
    """Move the rows of `path` with a step after `step` to `orphans` and rewrite `path`
    atomically without them; also rewrite it when it does not end in a newline (a crash
    mid-write), dropping an unparseable last line. Returns (rows moved, whether a torn line was
    dropped)."""
    if not path.exists():
        return 0, False
    text = path.read_text()
    rows = read_metrics(path)
    torn = len(rows) != sum(1 for line in text.splitlines() if line.strip())
    keep = [r for r in rows if r.get("step", 0) <= step]
    orphaned = [r for r in rows if r.get("step", 0) > step]
    if not orphaned and (not text or text.endswith("\n")):
        return 0, False
    if orphaned:  # on disk, named, before they leave the main file
        done = _moved_before(orphans, orphaned)
        with _append(orphans) as f:
            f.writelines(json.dumps(r) + "\n" for r in orphaned[done:])
            _fsync(f)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in keep))
        _fsync(f)
    os.replace(tmp, path)
    fsync_dir(path.parent)  # else a power loss could bring back the old file, or none
    return len(orphaned), torn


def _moved_before(orphans: Path, rows: list[dict[str, Any]]) -> int:
    """How many of `rows` (from their start) an interrupted earlier move already appended to
    `orphans`: a crash after that append but before the main file's rewrite leaves them in both
    files, and the next resume moves them again. A torn last line (a crash mid-append) is cut
    off first: its row is among `rows`, and the append would glue the next row onto it."""
    if not orphans.exists():
        return 0
    data = orphans.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        os.truncate(orphans, len(whole))
    there = []
    for line in whole.decode().splitlines():
        try:
            there.append(json.loads(line))
        except json.JSONDecodeError:  # glued by an older version's append: matches no row
            there.append(None)
    for i in range(max(0, len(there) - len(rows)), len(there)):
        if there[i:] == rows[: len(there) - i]:
            return len(there) - i
    return 0


def _append(path: Path):
    """`path` opened for appending. A file it creates has its name synced into its folder at
    once: one sync per file and run, where its rows are synced before each checkpoint
    (MetricsLogger.sync) but would be lost with the name."""
    new = not path.exists()
    f = open(path, "a")  # noqa: SIM115 - the caller closes it
    if new:
        fsync_dir(path.parent)
    return f


def _fsync(f) -> None:
    """Flush the open file `f` through to the disk."""
    f.flush()
    os.fsync(f.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash the run
    return value


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class MetricsLogger:
    """Writes metric rows to every sink. Only the process with rank 0 should create one."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        *,
        config: dict[str, Any],
        total_steps: int,
        resuming: bool = False,
    ):
        self.run_dir = run_dir
        self.path = run_dir / METRICS_FILE
        self._file = None
        self._wandb = None
        self._bar = None
        self.total_steps = total_steps
        if cfg.backend == "wandb":
            self._wandb = _start_wandb(run_dir, cfg, config, resuming=resuming)
        elif cfg.backend != "none":
            raise ValueError(f"logger.backend={cfg.backend!r} is not one of: none, wandb")

    def truncate_after(self, step: int) -> None:
        """Before a run continues from `step` (-1: starts afresh): rows of metrics.jsonl and
        samples.jsonl after it belong to the abandoned trajectory and move to their
        `.orphaned.jsonl` files (never deleted), and a torn last line is dropped, so that new
        rows never land on it."""
        for name, orphans in ((METRICS_FILE, ORPHANED_FILE), (SAMPLES_FILE, SAMPLES_ORPHANED)):
            moved, torn = _truncate(self.run_dir / name, self.run_dir / orphans, step)
            if moved or torn:
                log.info(
                    "%s: moved %d rows of %s to %s%s",
                    f"resume at step {step}" if step >= 0 else "a fresh run in a used directory",
                    moved,
                    name,
                    orphans,
                    "; dropped a torn last line" if torn else "",
                )

    def start_progress(self, initial: int) -> None:
        from tqdm.auto import tqdm

        # redirected to a file (a batch job's log) the bar is a line per update: a few a minute,
        # not one a second; metrics.jsonl and the log carry the numbers
        interactive = sys.stderr.isatty()
        self._bar = tqdm(
            total=self.total_steps,
            initial=initial,
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0 if interactive else 30.0,
        )

    def advance(self, summary: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                {k: f"{v:.4g}" for k, v in summary.items() if isinstance(v, (int, float))},
                refresh=False,
            )

    def log(self, row: dict[str, Any]) -> None:
        if self._file is None:  # held open for the run, closed in close()
            self._file = _append(self.path)
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(row)  # `step` is the x-axis metric (see _start_wandb)

    def sync(self) -> None:
        """metrics.jsonl and samples.jsonl through to the disk (a row is otherwise only handed
        to the operating system, which a machine crash can lose)."""
        if self._file is not None:
            _fsync(self._file)
        samples = self.run_dir / SAMPLES_FILE
        if samples.exists():
            with open(samples, "a") as f:
                _fsync(f)

    def log_samples(self, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        """A table of generated samples: a wandb Table, and `samples.jsonl` beside the metrics."""
        with _append(self.run_dir / SAMPLES_FILE) as f:
            for values in rows:
                f.write(
                    json.dumps({"step": step, **dict(zip(columns, values, strict=False))}) + "\n"
                )
        if self._wandb is not None:
            import wandb

            self._wandb.log({"step": step, "samples": wandb.Table(columns=columns, data=rows)})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_has_key() -> bool:
    """An API key in the environment, or a login in the netrc file for wandb's host (its
    public one, or the server in WANDB_BASE_URL)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from urllib.parse import urlparse

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base).hostname or base
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and f"machine {host}" in netrc.read_text()


WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
"""The values wandb takes in WANDB_MODE: it refuses any other (also in another case, or
empty) in wandb.init, whatever logger.mode says."""


def check_wandb_environment() -> None:
    """A ConfigError naming WANDB_MODE when it holds a value wandb refuses (checked with the
    config: wandb.init would fail with a validation traceback once the models had loaded)."""
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in WANDB_MODES:
        raise ConfigError(
            f"logger.backend=wandb: the environment's WANDB_MODE={env!r} is not a mode wandb "
            f"takes ({', '.join(WANDB_MODES)}): unset it, or fix it"
        )


def _auto_mode() -> tuple[str, str]:
    """logger.mode=auto: (mode, why). The environment's WANDB_MODE or WANDB_DISABLED decide
    where set (a cluster may run offline by policy); else online with a key, offline without."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    if env in ("online", "offline", "disabled"):
        return env, f"WANDB_MODE={env}"
    if env == "dryrun":
        return "offline", "WANDB_MODE=dryrun"
    if _wandb_has_key():
        return "online", "an API key is configured"
    return "offline", "no API key configured"


def _start_wandb(run_dir: Path, cfg: LoggerConfig, config: dict[str, Any], *, resuming: bool):
    import wandb

    mode = cfg.mode
    if mode == "auto":
        mode, why = _auto_mode()
        if mode == "offline":
            log.info(
                "wandb: %s, logging offline to %s (upload later with `wandb sync`)",
                why,
                run_dir / "wandb",
            )
        elif mode == "disabled":
            log.info("wandb: disabled (%s)", why)
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode={cfg.mode!r} is not one of: auto, online, offline, disabled")
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.run_name or run_dir.name,
        group=cfg.group,
        dir=str(run_dir),
        config=config,
        mode=mode,
        resume="allow",
        id=_wandb_run_id(run_dir, resuming=resuming),
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _wandb_run_id(run_dir: Path, *, resuming: bool) -> str:
    """The run directory's wandb run when resuming from its checkpoint, so the resumed run
    continues it; a new one otherwise."""
    id_file = run_dir / ".wandb_run_id"
    if resuming and id_file.exists():
        return id_file.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id

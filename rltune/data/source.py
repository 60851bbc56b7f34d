"""Where an algorithm's rows come from: the built-in task, or data.path (+ eval_path/eval_ratio).

Every row is format-checked here, before any model is loaded.
"""

from __future__ import annotations

import torch

from rltune.config import DataConfig
from rltune.data.formats import check_records, require_kind, resolve_format
from rltune.data.loading import Record, load_records


def task_records(task_name: str, kind: str, n: int, *, seed: int, split: str) -> list[Record]:
    from rltune.evaluation import get_task

    rows = get_task(task_name).rows(kind, n, seed=seed, split=split)
    source = f"<task {task_name}:{split}>"
    return [Record(data=row, file=source, index=i) for i, row in enumerate(rows)]


def checked(records: list[Record], forced: str, allowed: set[str], algo: str) -> str:
    """The records' format (forced, or detected from the columns); every row validated."""
    fmt = resolve_format(records, None if forced == "auto" else forced)
    require_kind(fmt, allowed, algo, records[0].file)
    check_records(records, fmt)
    return fmt


def split_records(
    data: DataConfig, *, eval_n: int, task_kind: str, allowed: set[str], algo: str
) -> tuple[tuple[list[Record], str], tuple[list[Record], str] | None]:
    """((train records, format), (eval records, format) or None).

    With data.path null the built-in task supplies `task_kind` rows for both splits; otherwise
    eval rows come from data.eval_path, or a seeded data.eval_ratio share of data.path."""
    if data.path is None:
        train = task_records(data.task, task_kind, data.train_size, seed=data.seed, split="train")
        evals = (
            task_records(data.task, task_kind, eval_n, seed=data.seed, split="eval")
            if eval_n
            else []
        )
    else:
        train = load_records(data.path)
        evals = load_records(data.eval_path, "data.eval_path") if data.eval_path is not None else []
        if not evals and data.eval_ratio > 0:
            n_eval = max(1, int(len(train) * data.eval_ratio))
            order = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(data.seed)
            ).tolist()
            evals = [train[i] for i in order[:n_eval]]
            train = [train[i] for i in sorted(order[n_eval:])]
    train_part = (train, checked(train, data.format, allowed, algo))
    eval_part = (evals, checked(evals, data.format, allowed, algo)) if evals else None
    return train_part, eval_part

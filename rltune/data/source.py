"""Where an algorithm's rows come from: the built-in task, or data.path (+ eval_path/eval_ratio).

Every row is format-checked here, before any model is loaded.
"""

from __future__ import annotations

import logging

import torch

from rltune.config import DataConfig
from rltune.data.formats import DataError, check_records, require_kind, resolve_format
from rltune.data.loading import Record, is_hub_id, load_records

log = logging.getLogger(__name__)


def task_records(task_name: str, kind: str, n: int, *, seed: int, split: str) -> list[Record]:
    from rltune.evaluation import get_task

    rows = get_task(task_name).rows(kind, n, seed=seed, split=split)
    source = f"<task {task_name}:{split}>"
    return [Record(data=row, file=source, index=i) for i, row in enumerate(rows)]


def renamed(records: list[Record], columns: dict[str, str]) -> list[Record]:
    """`records` with their columns renamed by `columns` ({the data's name: rltune's},
    data.columns). A name that no row has, or a new name that a row already has beside the old
    one, is an error naming the files (or the row)."""
    if not columns:
        return records
    names = {name for record in records for name in record.data}
    missing = [old for old in columns if old not in names]
    if records and missing:  # a typo; a file that needs no renaming beside one that does is fine
        files = sorted({record.file for record in records})
        raise DataError(
            f"{', '.join(files)}: data.columns renames {', '.join(map(repr, missing))}, which "
            f"no row has; the columns are {sorted(names)}"
        )
    out = []
    for record in records:
        for old, new in columns.items():  # a swap ({a: b, b: a}) moves the old `new` away
            if old in record.data and new in record.data and new not in columns:
                raise DataError(
                    f"{record.where}: data.columns renames {old!r} to {new!r}, "
                    "which the row already has"
                )
        row = {columns.get(k, k): v for k, v in record.data.items()}
        out.append(Record(row, record.file, record.index, record.line))
    return out


def checked(
    records: list[Record], forced: str, allowed: set[str], algo: str, key: str = "data.path"
) -> str:
    """The records' format (forced, or detected from the columns); every row validated.
    `key` is the setting the records were read from."""
    fmt = resolve_format(records, None if forced == "auto" else forced)
    require_kind(fmt, allowed, algo, records[0].file, forced=forced != "auto", key=key)
    check_records(records, fmt)
    return fmt


def check_hub_choices(data: DataConfig) -> None:
    """A DataError naming the key where data.subset, data.split, data.eval_split or
    data.eval_subset chooses from a hub dataset but the data it would choose from is local (it
    would be silently ignored)."""
    if data.subset is not None and not is_hub_id(data.path):
        raise DataError(
            f"data.subset={data.subset!r} picks a subset of a hub dataset, but "
            f"data.path={data.path!r} is local data"
        )
    if data.split != "train" and not is_hub_id(data.path):
        raise DataError(
            f"data.split={data.split!r} names a split of a hub dataset, but "
            f"data.path={data.path!r} is local data: all of it is read for training"
        )
    if data.eval_path is None:
        key, source, hint = "data.path", data.path, "set data.eval_path instead"
    else:
        key, source, hint = "data.eval_path", data.eval_path, "all of it is read for eval"
    if is_hub_id(source):
        return
    if data.eval_split is not None:
        raise DataError(
            f"data.eval_split={data.eval_split!r} names a split of a hub dataset, but "
            f"{key}={source!r} is local data: {hint}"
        )
    if data.eval_subset is not None:
        raise DataError(
            f"data.eval_subset={data.eval_subset!r} picks a subset of a hub dataset, but "
            f"{key}={source!r} is local data: {hint}"
        )


def eval_subset(data: DataConfig) -> str | None:
    """The subset the hub eval rows are read at: data.eval_subset; else data.subset where they
    come from data.path's dataset, none where data.eval_path names another one (a subset of
    one dataset means nothing to another)."""
    if data.eval_subset is not None:
        return data.eval_subset
    same = data.eval_path is None or data.eval_path == data.path
    return data.subset if same else None


def eval_records(data: DataConfig) -> list[Record]:
    """The rows read for eval: data.eval_path (at data.eval_split, else data.split), or
    data.path's data.eval_split, at `eval_subset`; none where data.eval_ratio holds rows out,
    or nothing does."""
    subset = eval_subset(data)
    if data.eval_path is not None:
        split = data.eval_split or data.split
        return load_records(data.eval_path, "data.eval_path", subset=subset, split=split)
    if data.eval_split is not None:
        return load_records(data.path, subset=subset, split=data.eval_split)
    return []


def split_records(
    data: DataConfig, *, eval_n: int, task_kind: str, allowed: set[str], algo: str
) -> tuple[tuple[list[Record], str], tuple[list[Record], str] | None]:
    """((train records, format), (eval records, format) or None).

    With data.path null the built-in task supplies `task_kind` rows for both splits; otherwise
    eval rows come from data.eval_path, data.eval_split, or a seeded data.eval_ratio share of
    data.path. With `eval_n` 0 (train.eval_samples=0: no eval runs) no eval rows are read, so a
    missing eval file or split does not stop the run; data.eval_ratio still holds its share
    out, so that the training rows do not depend on whether eval runs."""
    if data.path is None:
        train = task_records(data.task, task_kind, data.train_size, seed=data.seed, split="train")
        evals = (
            task_records(data.task, task_kind, eval_n, seed=data.seed, split="eval")
            if eval_n
            else []
        )
    else:
        check_hub_choices(data)  # with eval off too: the setting is wrong either way
        train = load_records(data.path, subset=data.subset, split=data.split)
        evals = eval_records(data) if eval_n else []
        if not eval_n and (data.eval_path is not None or data.eval_split is not None):
            log.info("eval data not read: train.eval_samples=0 runs no eval")
        both = renamed(train + evals, data.columns)
        train, evals = both[: len(train)], both[len(train) :]
        # by data.eval_path and data.eval_split alone, not by what was read: eval off holds no
        # share of the training rows out that eval on would not
        if data.eval_path is None and data.eval_split is None and data.eval_ratio > 0:
            n_eval = max(1, int(len(train) * data.eval_ratio))
            order = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(data.seed)
            ).tolist()
            if n_eval >= len(train):  # at least one row is held out
                raise DataError(
                    f"data.eval_ratio={data.eval_ratio} holds out all {len(train)} row(s) of "
                    f"data.path={data.path}: none are left to train on (add rows, or set "
                    "data.eval_ratio=0)"
                )
            evals = [train[i] for i in order[:n_eval]]
            train = [train[i] for i in sorted(order[n_eval:])]
    train_part = (train, checked(train, data.format, allowed, algo))
    eval_key = "data.eval_path" if data.eval_path is not None else "data.path"
    eval_part = (evals, checked(evals, data.format, allowed, algo, eval_key)) if evals else None
    return train_part, eval_part

"""Reward functions for the online algorithms (GRPO, and PPO's function rewards).

A reward function has the signature

    fn(prompts, completions, **columns) -> list[float | None]

and is selected by name in `reward.funcs`: a built-in (`BUILTINS`, plus one per built-in task,
e.g. `arith`), or a user function as `module:function` or `path/to/file.py:function`.
`reward.model_path` adds a trained reward model as one more function, named `reward_model`.

Names and imports are resolved by `resolve` before any model loads, so a typo fails in seconds.
`score` calls every function on the batch, each with a timeout and retried one sample at a time
when it fails (how: `rltune.rewards.calls`), and never raises for a function's fault: each
sample that fails counts in `rewards/<name>/errors`, and the run goes on, unless a function
fails on every sample of FAILING_STEPS rollouts in a row (`FailureWatch`).

A sample's reward is the weighted sum of the values its functions returned (None values are
skipped); it is None (NaN in tensors) when any function failed on it or none returned a value.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rltune.config import ConfigError, RewardConfig
from rltune.rewards.builtin import RewardFn, format_reward, length_penalty, math_answer, task_reward
from rltune.rewards.calls import call_function

log = logging.getLogger(__name__)

BUILTINS = ("math_answer", "format", "length")
"""Built-in functions besides the tasks' own checkers (`arith`, ...)."""

MODEL_REWARD = "reward_model"
"""The name under which reward.model_path scores (rewards/reward_model/mean)."""


@dataclass
class RewardFunction:
    name: str
    fn: RewardFn
    weight: float
    needs: tuple[str, ...] = ()
    """Data columns without which it scores nothing (the built-in checkers need `answer`)."""
    model: bool = False
    """reward.model_path's scorer (rltune's own code, run without a timeout)."""
    hung: list[threading.Thread] = field(default_factory=list, repr=False)
    """Threads of its calls abandoned at a timeout, until they end (see calls.call_with_timeout)."""
    batch_failure_logged: bool = field(default=False, repr=False)
    """Whether its failure on a whole batch has been logged (once a run; see
    calls._batch_failed)."""


@dataclass
class RewardScores:
    total: torch.Tensor
    """[N] float32 weighted sum per sample; NaN where the sample has no reward."""
    values: dict[str, list[float | None]]
    """Per function, its value per sample (None: not applicable or failed)."""
    errors: dict[str, int]
    """Per function, how many samples failed (exception, timeout or a bad return value)."""
    last_error: dict[str, str]
    """Per function that failed, what its last failure said."""
    batch_failures: dict[str, int]
    """Per function, 1 when its call on the whole batch failed and it was called per sample."""


class RewardError(ConfigError):
    """A reward function that cannot score this run: it fails on every sample, step after
    step, or the data lacks the column it reads."""


FAILING_STEPS = 3
"""Steps in a row in which a reward function fails on every sample before the run stops."""


NO_REWARD = "(no reward)"
"""`failed_everywhere`'s entry for a rollout in which no sample got a reward at all."""


class FailureWatch:
    """Stops a run whose reward function fails on every sample for FAILING_STEPS steps in a
    row, or in which no sample gets a reward for as long (every function returned None): its
    rewards are all missing, so the run would train on nothing while looking alive."""

    def __init__(self) -> None:
        self.streak: dict[str, int] = {}

    def update(self, failed_all: dict[str, bool], last_error: dict[str, str]) -> None:
        """`failed_all`: per function, whether it failed on every sample of this rollout (on
        every process: the decision to stop must be the same everywhere)."""
        for name, failed in failed_all.items():
            self.streak[name] = self.streak.get(name, 0) + 1 if failed else 0
            if self.streak[name] >= FAILING_STEPS and name == NO_REWARD:
                raise RewardError(
                    f"no completion got a reward in {FAILING_STEPS} rollouts in a row: the "
                    "reward functions returned None for every sample, so there is nothing to "
                    "learn from (None means 'does not apply to this sample')"
                )
            if self.streak[name] >= FAILING_STEPS:
                raise RewardError(
                    f"reward function {name} failed on every sample of {FAILING_STEPS} rollouts "
                    f"in a row; the last failure: {last_error.get(name, '?')}"
                )


def failed_everywhere(scores: RewardScores, n: int) -> dict[str, float]:
    """Per function, 1.0 when it failed on all `n` samples (0.0 otherwise), and under NO_REWARD
    1.0 when no sample got a reward: summed over the processes, it is their number exactly when
    it happened everywhere."""
    failed = {name: float(n > 0 and count == n) for name, count in scores.errors.items()}
    return failed | {NO_REWARD: float(n > 0 and bool(scores.total.isnan().all()))}


ROLLOUT_COLUMNS = ("completion_ids", "truncated")
"""Keyword arguments every call gets beside the data's columns."""


def check_columns(functions: list[RewardFunction], rows: list[dict[str, Any]], where: str) -> None:
    """Raise RewardError when a function's needed column is in none of `rows` (every reward
    would be missing and nothing would train), or when a function cannot be called as
    `fn(prompts, completions, **columns)` with these rows' columns (it would fail on every
    sample, found only after rollouts)."""
    names = sorted({k for row in rows for k in row} | set(ROLLOUT_COLUMNS))
    for f in functions:
        try:
            signature = inspect.signature(f.fn)
        except (TypeError, ValueError):  # a builtin or an object whose signature is hidden
            signature = None
        if signature is not None and not f.model:
            try:
                signature.bind([], [], **dict.fromkeys(names, []))
            except TypeError as err:
                raise RewardError(
                    f"reward.funcs: {f.name}{signature} cannot be called as "
                    f"fn(prompts, completions, **columns) with the columns of {where} "
                    f"({', '.join(names)}): {err}. Give it two positional parameters and "
                    "**kwargs (or a parameter per column it reads)"
                ) from None
        for column in f.needs:
            if not any(row.get(column) is not None for row in rows):
                raise RewardError(
                    f"reward.funcs: {f.name} compares each completion with the row's "
                    f"'{column}' column, and no row of {where} has one; add the column or "
                    "choose other reward functions"
                )


def builtin_names() -> list[str]:
    from rltune.evaluation import TASKS

    return [*TASKS, *BUILTINS]


def resolve(cfg: RewardConfig, *, max_new_tokens: int) -> list[RewardFunction]:
    """The configured functions (reward.model_path not loaded yet: see `load_model_reward`).
    Raises ConfigError naming the bad entry: an unknown name, a failed import, a missing
    function, a bad regex or a weights list of the wrong length."""
    names = list(cfg.funcs)
    count = len(names) + (cfg.model_path is not None)
    if count == 0:
        raise ConfigError(
            "reward.funcs is empty and reward.model_path is null: nothing to score. Set "
            "reward.model_path to a reward model (an algo=rm run's final/, or a hub id) or "
            "reward.funcs to reward functions"
        )
    weights = list(cfg.weights) if cfg.weights is not None else [1.0] * count
    if len(weights) != count:
        raise ConfigError(
            f"reward.weights has {len(weights)} entries but there are {count} reward functions "
            f"({', '.join(names + ([MODEL_REWARD] if cfg.model_path else []))})"
        )
    bad = [w for w in weights if not (isinstance(w, int | float) and math.isfinite(w))]
    if bad:
        raise ConfigError(f"reward.weights={weights}: {bad[0]} is not a finite number")
    if len(set(names)) != len(names):
        raise ConfigError(f"reward.funcs={names} names a function twice")
    if not cfg.timeout_s > 0:
        raise ConfigError(f"reward.timeout_s={cfg.timeout_s} must be > 0")
    if cfg.model_batch_size < 1:
        raise ConfigError(f"reward.model_batch_size={cfg.model_batch_size} must be >= 1")
    if cfg.model_path is not None:  # a missing or wrong local folder fails now, not after
        from rltune.models import check_model_folder  # the policy has loaded

        check_model_folder(cfg.model_path, "reward.model_path", scalar_head=True)
    # metrics name a user function by its function name (rewards/my_reward/mean), like TRL,
    # unless two share one
    short = [n.rpartition(":")[2] for n in names]
    labels = [s if short.count(s) == 1 else n for s, n in zip(short, names, strict=True)]
    if MODEL_REWARD in labels:
        raise ConfigError(
            f"reward.funcs: {names[labels.index(MODEL_REWARD)]!r}: the name {MODEL_REWARD!r} is "
            "the reward model's (reward.model_path); rename the function"
        )
    return [
        RewardFunction(label, _make(name, cfg, max_new_tokens), weight, _needs(name))
        for name, label, weight in zip(names, labels, weights, strict=False)
    ]


def _needs(name: str) -> tuple[str, ...]:
    from rltune.evaluation import TASKS

    return ("answer",) if name in TASKS or name == "math_answer" else ()


def load_model_reward(
    cfg: RewardConfig,
    weight: float,
    *,
    device: torch.device,
    dtype: torch.dtype,
    system_prompt: str | None = None,
) -> RewardFunction:
    """reward.model_path's scorer; `system_prompt` (data.system_prompt) is the system turn the
    policy's prompts open with, which the reward model then reads too."""
    from rltune.rewards.model import RewardModelScorer

    scorer = RewardModelScorer(
        cfg.model_path,
        device=device,
        dtype=dtype,
        batch_size=cfg.model_batch_size,
        system_prompt=system_prompt,
    )
    return RewardFunction(MODEL_REWARD, scorer, weight, model=True)


def _make(name: str, cfg: RewardConfig, max_new_tokens: int) -> RewardFn:
    from rltune.evaluation import TASKS, get_task

    if name in TASKS:
        return task_reward(get_task(name).is_correct)
    if name == "math_answer":
        return math_answer
    if name == "format":
        try:
            return format_reward(cfg.format_pattern)
        except re.error as err:
            raise ConfigError(f"reward.format_pattern={cfg.format_pattern!r}: {err}") from None
    if name == "length":
        if not 0.0 < cfg.overlong_ratio <= 1.0:
            raise ConfigError(f"reward.overlong_ratio={cfg.overlong_ratio} must be in (0, 1]")
        return length_penalty(max_new_tokens, max(1, round(cfg.overlong_ratio * max_new_tokens)))
    if ":" not in name:
        raise ConfigError(
            f"reward.funcs: unknown reward function {name!r}. Built-ins: "
            f"{', '.join(builtin_names())}; or give a user function as module:function "
            "or path/to/file.py:function"
        )
    return import_function(name)


def import_function(spec: str) -> RewardFn:
    """`module:function` or `file.py:function` (relative to the working directory)."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"reward.funcs: {spec!r}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # the console script does not put the cwd on the path
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as err:  # ImportError, or whatever the module raises while importing
        raise ConfigError(
            f"reward.funcs: cannot import {target!r} (from {spec!r}): {type(err).__name__}: {err}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward.funcs: {target!r} has no function {attr!r} (from {spec!r})")
    return fn


def score(
    functions: list[RewardFunction],
    prompts: list[Any],
    completions: list[str],
    columns: dict[str, list[Any]],
    *,
    timeout_s: float,
) -> RewardScores:
    """Every function on every sample; never raises for a function's fault."""
    n = len(completions)
    total = torch.zeros(n)
    has_value = torch.zeros(n, dtype=torch.bool)
    broken = torch.zeros(n, dtype=torch.bool)
    values, errors, last_error, batch_failures = {}, {}, {}, {}
    for f in functions:
        vals, failed, last, batch_failed = call_function(
            f, prompts, completions, columns, timeout_s
        )
        values[f.name], errors[f.name] = vals, sum(failed)
        batch_failures[f.name] = int(batch_failed)
        if last is not None:
            last_error[f.name] = last
        for i, v in enumerate(vals):
            if v is not None:
                total[i] += f.weight * v
                has_value[i] = True
        broken |= torch.tensor(failed, dtype=torch.bool)
    total[~has_value | broken] = float("nan")
    return RewardScores(
        total=total,
        values=values,
        errors=errors,
        last_error=last_error,
        batch_failures=batch_failures,
    )

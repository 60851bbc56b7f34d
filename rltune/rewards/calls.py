"""Calling reward functions: user code that rltune does not control, called so that nothing
it does stops the run.

`score` (in `rltune.rewards`) calls every user or built-in function through `call_function`,
with a timeout (`reward.timeout_s`; the reward model, rltune's own code, runs directly). A call
that raises, times out or returns something other than one number-or-None per completion is retried
one sample at a time, within one more timeout_s for all the retries, so only the samples that
fail lose their reward. Every rollout tries the whole batch first; a function that only ever
works one sample at a time would fail so at every step, so its first failure on a batch is
logged as a warning and the later ones only counted, in `rewards/<name>/batch_failures`. The
timeout cannot interrupt code that holds Python's global lock (a long regular-expression match):
such a call ends when it ends. A call that timed out runs on in its abandoned thread until it
returns (Python cannot stop a thread); while MAX_HUNG_CALLS of one function's calls run so, it
gets no new call and its samples fail, so a function that hangs for good costs a bounded number
of threads, not one or two per step for the rest of the run. Each function gets its own copies
of the arguments.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import site
import sysconfig
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rltune.rewards import RewardFunction

log = logging.getLogger(__name__)


class _Timeout(Exception):
    pass


class _Hung(Exception):
    """The function has MAX_HUNG_CALLS calls still running past their timeout."""


MAX_HUNG_CALLS = 8
"""Calls of one reward function that may run on past reward.timeout_s at once; beyond them it
gets no new call. Each holds a thread and its own copies of a batch's arguments."""


def call_with_timeout(
    fn, timeout_s: float, hung: list[threading.Thread], /, *args: Any, **kwargs: Any
) -> Any:
    """fn(*args, **kwargs) in a daemon thread; _Timeout when it has not returned in timeout_s.
    The thread is then abandoned (Python cannot kill it, but it never blocks the run or its
    exit) and kept in `hung` until it ends. With MAX_HUNG_CALLS of them still running, no thread
    is started: _Hung. (Positional-only, so that a data column named `fn` reaches `fn`.)"""
    hung[:] = [t for t in hung if t.is_alive()]
    if len(hung) >= MAX_HUNG_CALLS:
        raise _Hung(
            f"{len(hung)} earlier calls are still running past their reward.timeout_s (Python "
            "cannot stop them), so no new call is made until one returns; fix the function if "
            "it hangs, or raise reward.timeout_s if it is only slow"
        )
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="reward")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        hung.append(thread)
        raise _Timeout(f"no result within reward.timeout_s={timeout_s}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _checked(values: Any, n: int) -> list[float | None]:
    """One float or None per completion, from a list or tuple (or a 1-D tensor or array) of
    numbers: Python's, numpy's, bools, or one-element tensors."""
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:  # tensor, array
        values = values.tolist()
    if not isinstance(values, list | tuple):  # a number, a generator, a dict, ...
        raise TypeError(
            f"returned a {type(values).__name__}, not a list of one number (or None) for each "
            f"of the {n} completion(s)"
        )
    if len(values) != n:
        raise TypeError(
            f"returned a {type(values).__name__} of {len(values)} values for {n} completion(s)"
        )
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if (isinstance(v, torch.Tensor) and v.numel() == 1) or getattr(v, "ndim", None) == 0:
            v = v.item()  # a one-element tensor, a numpy scalar
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise TypeError(f"returned {v!r}; expected a finite number or None")
        out.append(float(v))
    return out


# where Python's and installed libraries' code lives: a failure is located past their frames
# (site's lists add what sysconfig leaves out, e.g. Debian's dist-packages and the user site)
_LIBRARY_DIRS = tuple(
    {
        os.path.realpath(d) + os.sep
        for d in [
            *(sysconfig.get_path(k) for k in ("stdlib", "purelib", "platlib")),
            *site.getsitepackages(),
            site.getusersitepackages(),
        ]
    }
)


def _failure(err: BaseException, prompts: list[Any]) -> str:
    """`Type: message (at file:line, in function)`, naming the innermost line of the reward
    function's own code (not Python's or an installed library's, nor this module's call, nor
    code with no file: `eval(completion)`'s `<string>`), so a failure logged steps into a run
    can be found in the user's file."""
    text = f"{type(err).__name__}: {err}"
    frames = [
        frame
        for frame in traceback.extract_tb(err.__traceback__)
        if not frame.filename.startswith("<")
        and os.path.realpath(frame.filename) != os.path.realpath(__file__)
        and not os.path.realpath(frame.filename).startswith(_LIBRARY_DIRS)
    ]
    if frames:
        text += f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})"
    if (
        isinstance(err, TypeError)
        and "string indices must be integers" in str(err)
        and any(isinstance(p, list) for p in prompts)
    ):
        # TRL gives a message-list prompt's completions as [{"role": "assistant", ...}] lists
        text += (
            "; completions are the generated text (strings), also for message-list prompts, "
            "where TRL passes [{'role': 'assistant', 'content': ...}]"
        )
    return text


def _batch_failed(f: RewardFunction, failure: str) -> None:
    """Log `f`'s failure on a whole batch the first time only: a function that works on single
    samples alone fails so at every step (a 200-step run's log held 200 copies), and the later
    failures are counted in its batch_failures metric instead."""
    if f.batch_failure_logged:
        log.debug("reward %s failed on the batch (%s); retrying per sample", f.name, failure)
        return
    f.batch_failure_logged = True
    log.warning(
        "reward %s failed on the batch (%s); retrying per sample. Each rollout still tries the "
        "whole batch first; further failures on a batch are not logged, but counted in "
        "rewards/%s/batch_failures",
        f.name,
        failure,
        f.name,
    )


def call_function(
    f: RewardFunction,
    prompts: list[Any],
    completions: list[str],
    columns: dict[str, list[Any]],
    timeout_s: float,
) -> tuple[list[float | None], list[bool], str | None, bool]:
    """(values, failed, the last failure's message, whether the call on the whole batch
    failed) for one function over the batch, falling back to one sample at a time."""
    n = len(completions)
    # each function gets its own copies: one that edits its arguments (a prompt's message list
    # is the dataset's own object) changes nothing for the next function or a later step
    prompts, completions = copy.deepcopy(prompts), list(completions)
    columns = copy.deepcopy(columns)
    if f.model:
        # rltune's own reward model runs in this thread: under ZeRO-3 its forward passes are
        # collective, and a call abandoned by a timeout on one rank would hang the others
        return _checked(f.fn(prompts, completions, **columns), n), [False] * n, None, False
    try:
        values = call_with_timeout(f.fn, timeout_s, f.hung, prompts, completions, **columns)
        return _checked(values, n), [False] * n, None, False
    except _Hung as err:  # the retries would find no thread either
        return [None] * n, [True] * n, _failure(err, prompts), False
    except Exception as err:  # noqa: BLE001 - a reward function must never stop the run
        _batch_failed(f, _failure(err, prompts))
    # the retries share one more timeout_s: a function that hangs costs a rollout twice its
    # timeout, not once per sample
    deadline = time.monotonic() + timeout_s
    values, failed, last = [], [], None
    for i in range(n):
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout(f"no time left of reward.timeout_s={timeout_s} for the retries")
            one = call_with_timeout(
                f.fn,
                left,
                f.hung,
                prompts[i : i + 1],
                completions[i : i + 1],
                **{k: v[i : i + 1] for k, v in columns.items()},
            )
            values.append(_checked(one, 1)[0])
            failed.append(False)
        except Exception as err:  # noqa: BLE001
            values.append(None)
            failed.append(True)
            last = _failure(err, prompts[i : i + 1])
    return values, failed, last, True

"""Built-in reward functions. Each has the user-function signature

    fn(prompts, completions, **columns) -> list[float | None]

`prompts` as in the data (strings or message lists), `completions` the generated text, and
`columns` the data's other columns (each a list aligned with the completions, e.g. `answer`) plus
`completion_ids` (token ids) and `truncated` (hit the token limit). None means "no reward for
this sample" (e.g. a row without an answer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list[float | None]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def task_reward(is_correct: Callable[[str, str], bool]) -> RewardFn:
    """1.0 when the task's checker accepts the completion for the row's `answer`, else 0.0."""

    def reward(prompts: list[Any], completions: list[str], **columns: Any) -> list[float | None]:
        answers = columns.get("answer") or [None] * len(completions)
        return [
            None if answer is None else float(is_correct(text, str(answer)))
            for text, answer in zip(completions, answers, strict=True)
        ]

    return reward


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} in `text` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced


def extract_answer(text: str) -> str | None:
    r"""The final answer of a solution: the last \boxed{} content, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalise(answer: str) -> str:
    return answer.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")


def answers_match(predicted: str, expected: str) -> bool:
    """Equal as numbers (within 1e-6 relative) when both parse as numbers, else as text after
    dropping spaces, thousands separators, `$` and a trailing period."""
    a, b = _normalise(predicted), _normalise(expected)
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def reference_answer(answer: str) -> str:
    """The answer a reference states: what follows the last `####` where there is one (GSM8K's
    solutions end `#### 72`, so the column can be used as it comes), else all of it."""
    head, mark, tail = answer.rpartition("####")
    return tail.strip() if mark else answer


def math_answer(prompts: list[Any], completions: list[str], **columns: Any) -> list[float | None]:
    r"""1.0 when the completion's final answer (\boxed{} or last number) matches `answer`
    (`reference_answer` of it: a GSM8K solution counts by what follows its `####`)."""
    answers = columns.get("answer") or [None] * len(completions)
    out: list[float | None] = []
    for text, answer in zip(completions, answers, strict=True):
        if answer is None:
            out.append(None)
            continue
        predicted = extract_answer(text)
        expected = reference_answer(str(answer))
        out.append(float(predicted is not None and answers_match(predicted, expected)))
    return out


def format_reward(pattern: str) -> RewardFn:
    """1.0 when the completion matches the regex `pattern` (re.search, DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: list[Any], completions: list[str], **columns: Any) -> list[float | None]:
        return [float(compiled.search(text) is not None) for text in completions]

    return reward


def length_penalty(max_tokens: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer tokens, then falling
    linearly to -1 at max_tokens (a truncated completion gets -1)."""

    def reward(prompts: list[Any], completions: list[str], **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        for ids in columns["completion_ids"]:
            over = len(ids) - (max_tokens - buffer)
            out.append(0.0 if over <= 0 else max(-1.0, -over / max(buffer, 1)))
        return out

    return reward

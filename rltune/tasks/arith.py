"""Integer arithmetic: the embedded task with verifiable answers.

Every algorithm in rltune can run on this task without a download, and the test suite uses it for
fast end-to-end checks. A problem is one short question and its exact integer answer:

    "37+58="  -> "95"       addition, both operands in [0, 99]
    "42-67="  -> "-25"      subtraction, negative results allowed
    "23*7="   -> "161"      multiplication by a one-digit factor

The mix is tuned so that the tiny model (about 1M parameters, see ``rltune.tiny``) gets partial
greedy accuracy after a few minutes of SFT on a CPU: high enough that sampled completions are
sometimes right (GRPO and PPO need reward variance), low enough that RL has room to improve it.

Train and eval never share a question: a question belongs to the eval split when a stable hash of
its text falls in the eval bucket, so the split does not depend on ``n`` or ``seed``. The hash is
of the text, so an eval question ``a+b=`` can have its twin ``b+a=`` in train. The shipped tiny
model shows no memorisation through that: on the 969 eval additions, its greedy accuracy was
0.82 where the twin is in train (861) and 0.88 where it is in eval too (108).

``rows`` renders problems in the data shapes the algorithms read (prompt-completion and chat for
SFT, preference pairs for DPO and reward models, prompt plus answer for GRPO and PPO rewards).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SPLITS = ("train", "eval")
ROW_KINDS = ("prompt_completion", "chat", "preference", "prompt_answer")

MAX_OPERAND = 99
"""Largest operand of + and -, and largest multiplicand of *."""
MAX_FACTOR = 9
"""Largest multiplier of * (one digit keeps it learnable by a tiny model)."""
OPERATIONS = ("+", "-", "*")
EVAL_PERCENT = 10
"""Share of the question space (by hash) that belongs to the eval split."""

_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """One question such as ``"37+58="`` and its exact answer such as ``"95"``."""

    question: str
    answer: str


def split_of(question: str) -> str:
    """The split ("train" or "eval") a question belongs to, from a hash stable across runs.

    Python's ``hash`` is salted per process, so sha256 is used to keep the split reproducible.
    """
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def _random_problem(rng: random.Random) -> Problem:
    op = rng.choice(OPERATIONS)
    a = rng.randint(0, MAX_OPERAND)
    if op == "*":
        b = rng.randint(0, MAX_FACTOR)
        return Problem(f"{a}*{b}=", str(a * b))
    b = rng.randint(0, MAX_OPERAND)
    result = a + b if op == "+" else a - b
    return Problem(f"{a}{op}{b}=", str(result))


def make_problems(n: int, *, seed: int, split: str) -> list[Problem]:
    """``n`` problems of one split, the same list for the same ``(seed, split)``.

    Problems are drawn with replacement (a long training list repeats questions) and those whose
    hash puts them in the other split are skipped, so train and eval are disjoint for any ``n``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    # Seeding with a string is deterministic across processes (Random hashes it with sha512).
    rng = random.Random(f"arith-{seed}-{split}")
    problems: list[Problem] = []
    while len(problems) < n:
        problem = _random_problem(rng)
        if split_of(problem.question) == split:
            problems.append(problem)
    return problems


def is_correct(completion: str, answer: str) -> bool:
    """Whether a completion answers correctly.

    Rule: strip the completion, take the first integer in it (an optional ``-`` followed by
    digits, regex ``-?\\d+``), and compare its text exactly with ``answer``. So ``"95"``,
    ``" 95<|im_end|>"`` and ``"95 is the sum"`` are correct for ``"95"``; ``"095"``, ``"9 5"``,
    ``"96"`` and a completion without any digit are not.
    """
    match = _INTEGER.search(completion.strip())
    return match is not None and match.group() == answer


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible but wrong answer: off by a small amount, two digits swapped, or sign flipped.

    Used as the rejected side of preference pairs, so it should look like a near miss rather
    than noise; it is never a correct answer to ``problem``.
    """
    value = int(problem.answer)
    candidates = {value + delta for delta in (-10, -2, -1, 1, 2, 10)}
    digits = str(abs(value))
    if len(digits) >= 2:
        i = rng.randrange(len(digits) - 1)
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]
        candidates.add(int(swapped) * (-1 if value < 0 else 1))
    if value != 0:
        candidates.add(-value)
    candidates.discard(value)
    # Sorted before choosing so the pick depends only on rng, not on set iteration order.
    return str(rng.choice(sorted(candidates)))


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def rows(kind: str, n: int, *, seed: int, split: str) -> list[dict]:
    """``n`` problems rendered as dataset rows of one ``kind``.

    - ``"prompt_completion"``: ``{"prompt": [user], "completion": [assistant answer]}``
    - ``"chat"``: ``{"messages": [user, assistant answer]}``
    - ``"preference"``: ``{"prompt": [user], "chosen": [assistant answer],
      "rejected": [assistant wrong answer]}``
    - ``"prompt_answer"``: ``{"prompt": [user], "answer": answer}`` (for reward functions)
    """
    if kind not in ROW_KINDS:
        raise ValueError(f"unknown row kind {kind!r}; expected one of {ROW_KINDS}")
    problems = make_problems(n, seed=seed, split=split)
    if kind == "prompt_completion":
        return [
            {"prompt": [_user(p.question)], "completion": [_assistant(p.answer)]} for p in problems
        ]
    if kind == "chat":
        return [{"messages": [_user(p.question), _assistant(p.answer)]} for p in problems]
    if kind == "prompt_answer":
        return [{"prompt": [_user(p.question)], "answer": p.answer} for p in problems]
    # A separate stream from the problems' own, so the wrong answers do not shift the problems.
    rng = random.Random(f"arith-wrong-{seed}-{split}")
    return [
        {
            "prompt": [_user(p.question)],
            "chosen": [_assistant(p.answer)],
            "rejected": [_assistant(wrong_answer(p, rng))],
        }
        for p in problems
    ]

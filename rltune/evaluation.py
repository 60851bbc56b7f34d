"""Task evaluation: greedy generation on held-out prompts, scored by the task's checker."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import nn

from rltune.config import ConfigError
from rltune.rollout import generate_greedy

TASKS = {"arith": "rltune.tasks.arith"}
"""Built-in tasks: name -> module with make_problems, is_correct and rows."""


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ConfigError(f"data.task={name!r} is not one of: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def task_accuracy(
    model: nn.Module,
    tokenizer,
    task: ModuleType,
    *,
    n: int,
    seed: int,
    max_new_tokens: int = 16,
    num_samples: int = 4,
) -> tuple[float, list[dict[str, Any]]]:
    """Exact-match accuracy of greedy completions on `n` eval prompts, and a few samples.

    Decoded by `generate`, not by the online algorithms' fast engine (`rollout.engine`): the
    algorithms that call this (SFT, DPO) sample no rollouts, and the fast engine only gains on a
    GPU through its CUDA graph, whose replica of the policy under fp32 master weights (the
    default) is a compute-dtype copy of every weight, kept with the graph's KV cache for the
    rest of the run: memory these runs otherwise never spend, for an eval of a few hundred short
    answers. Its eager decoder is no faster than `generate` (17.3 against 18.7 ms per token,
    benchmarks/README.md)."""
    rows = task.rows("prompt_answer", n, seed=seed, split="eval")
    prompts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    correct = [task.is_correct(c, row["answer"]) for c, row in zip(completions, rows, strict=False)]
    samples = [
        {
            "prompt": row["prompt"][-1]["content"],
            "completion": c,
            "answer": row["answer"],
            "correct": ok,
        }
        for row, c, ok in list(zip(rows, completions, correct, strict=False))[:num_samples]
    ]
    return sum(correct) / max(1, len(correct)), samples

"""Prompts for the online algorithms (GRPO, RLOO, REINFORCE, PPO, rejection sampling) as token
ids: through the chat template for message lists and for every prompt under data.system_prompt,
tokenised as plain text otherwise, and cut from the left so that data.max_new_tokens still fits
in data.max_length. The row's other columns (answer, ...) stay beside them for the reward
functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rltune.config import ConfigError
from rltune.data.formats import DataError, with_system_turn
from rltune.data.loading import Record
from rltune.evaluation import render_prompt

log = logging.getLogger(__name__)

PROMPT_FORMATS = {"prompt_answer", "prompt_completion"}


@dataclass
class Prompt:
    prompt: Any
    """As in the data: a string or a message list (handed to reward functions as is, without
    data.system_prompt's turn)."""
    ids: list[int]
    """Token ids after the chat template (message lists, and every prompt under
    data.system_prompt) or plain tokenisation (strings)."""
    columns: dict[str, Any]
    """The row's other columns (answer, ...), for reward functions."""


def encode_prompts(
    records: list[Record],
    split: str,
    tokenizer: Any,
    *,
    max_length: int,
    max_new_tokens: int,
    system_prompt: str | None,
    model_path: str,
) -> list[Prompt]:
    """The prompts of `records` as the policy reads them, each cut from the left to
    `max_length - max_new_tokens` tokens (counted in one warning). Raises ConfigError when no
    prompt fits beside the completion or a system prompt cannot be rendered, DataError naming
    the row whose prompt the tokenizer rejects."""
    budget = max_length - max_new_tokens
    if budget < 1:
        raise ConfigError(
            f"data.max_length={max_length} leaves no room for a prompt beside "
            f"data.max_new_tokens={max_new_tokens}"
        )
    if system_prompt is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"data.system_prompt is set, but the tokenizer of model.path={model_path} has no "
            "chat template to render it with"
        )
    prompts, truncated = [], 0
    for record in records:
        prompt = record.data["prompt"]
        shown = prompt if system_prompt is None else with_system_turn(prompt, system_prompt)
        # verbose=False: transformers would warn of "indexing errors" for a long prompt,
        # which is cut below and counted in one warning
        try:
            if isinstance(shown, list):
                text = render_prompt(tokenizer, shown)
                ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            else:
                ids = tokenizer(shown, verbose=False)["input_ids"]
        except Exception as err:  # a template that rejects the messages, ...
            if shown is not prompt and _renders(tokenizer, prompt):  # the turn added, not the row
                raise ConfigError(
                    f"data.system_prompt: the chat template of model.path={model_path} cannot "
                    f"render a system turn ({err}); put the instruction in the prompts instead"
                ) from err
            raise DataError(f"{record.where}: {err}") from err
        if len(ids) > budget:
            ids, truncated = ids[-budget:], truncated + 1
        columns = {k: v for k, v in record.data.items() if k != "prompt"}
        prompts.append(Prompt(prompt, list(ids), columns))
    if not prompts:
        raise DataError(f"{split} data: no prompts")
    # what the policy reads, template and all: a wrong template shows here, not in a reward
    first = tokenizer.decode(prompts[0].ids)
    log.info(
        "%s data: %d prompts; the first as the policy reads it: %r", split, len(prompts), first
    )
    if truncated:
        log.warning(
            "%s data: %d prompts cut from the left to data.max_length - data.max_new_tokens "
            "= %d tokens",
            split,
            truncated,
            budget,
        )
    return prompts


def _renders(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> bool:
    """Whether the chat template renders `prompt` (a string as the user's turn)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    try:
        render_prompt(tokenizer, messages)
    except Exception:  # noqa: BLE001 - whatever the template raises
        return False
    return True

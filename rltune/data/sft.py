"""SFT examples: tokenise a row into ``input_ids`` and ``labels``, pack examples, collate batches.

Label rules (``-100`` = no loss):

- ``text``: loss on every token; the document gets EOS and is cut into ``max_length`` chunks
  (continued pretraining), so nothing is thrown away (as in the peers' text grouping, each
  chunk's first token is context only; a last chunk of one token takes the token before it
  as context, so that a document's EOS is always learned).
- ``instruction``, ``prompt_completion``, ``chat``, ``sharegpt``: loss on the completion / assistant
  turns only (``completion_only=True``), or on every token. Conversations are rendered once by the
  tokenizer's chat template and tokenised once, so the ids are exactly what the template produces;
  each assistant turn is located by rendering prefixes (``template(messages[:i], generation
  prompt)`` to ``template(messages[:i + 1])``) and gets loss up to and including its end-of-turn
  token. An ``instruction`` row is the conversation [user: instruction + "\n\n" + input,
  assistant: output] when the tokenizer has a chat template (so it ends with the template's
  end-of-turn token), else plain text. String prompts and completions are plain text:
  ``prompt + completion + EOS``. These examples are cut from the right at ``max_length``.

A text or string completion that already ends with the EOS token gets no second one (as TRL).

An example can end up with no loss token (a prompt longer than ``max_length``, a chat with no
assistant turn). ``encode_sft`` still returns it; ``has_loss_tokens`` tells the caller to drop it,
and ``encode_sft_dataset`` drops and counts them.

Packing: ``pack`` puts several examples in one row with ``position_ids`` restarting at 0 for each.
transformers 5 turns such position ids into a block-diagonal causal mask by itself
(``masking_utils.find_packed_sequence_indices``; tested here for eager and sdpa), but only when the model is called with NO ``attention_mask`` and NO
cache: pass ``use_cache=False`` (configs default to ``use_cache=True``, which creates an empty
cache and silently turns the detection off). ``collate_sft`` leaves ``attention_mask`` out of a
batch that holds packed rows for this reason.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rltune.data.formats import DataError, conversation, to_messages
from rltune.logps import IGNORE_INDEX

SFT_FORMATS = frozenset({"text", "instruction", "prompt_completion", "chat", "sharegpt"})

Example = dict[str, list[int]]


def encode_sft(
    record_data: dict[str, Any],
    fmt: str,
    tokenizer: Any,
    *,
    max_length: int,
    completion_only: bool = True,
) -> list[Example]:
    """Tokenise one validated row into SFT examples ``{"input_ids", "labels"}``.

    Returns one example, or several for a ``text`` row longer than ``max_length``.
    """
    if fmt not in SFT_FORMATS:
        raise ValueError(
            f"format {fmt!r} cannot be used for SFT; expected one of {sorted(SFT_FORMATS)}"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token, which ends each example")
    if fmt == "text":
        ids = _with_eos(_tokenize(tokenizer, record_data["text"], special=True), tokenizer)
        starts = list(range(0, len(ids), max_length))
        if len(starts) > 1 and len(ids) - starts[-1] == 1:  # a lone last token is no target
            starts[-1] -= 1
        return [
            {"input_ids": ids[i : i + max_length], "labels": ids[i : i + max_length]}
            for i in starts
        ]

    if fmt == "instruction":
        prompt = record_data["instruction"]
        if (record_data.get("input") or "").strip():
            prompt += "\n\n" + record_data["input"]
        if _has_chat_template(tokenizer):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": record_data["output"]},
            ]
            ids, labels = _encode_messages(messages, tokenizer, loss_from=1)
        else:
            ids, labels = _encode_plain(prompt + "\n\n", record_data["output"], tokenizer)
    elif fmt == "prompt_completion":
        prompt, completion = record_data["prompt"], record_data["completion"]
        if isinstance(prompt, str):
            ids, labels = _encode_plain(prompt, completion, tokenizer)
        else:
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            messages = to_messages(prompt) + to_messages(completion)
            ids, labels = _encode_messages(messages, tokenizer, loss_from=len(prompt))
    else:  # chat, sharegpt
        ids, labels = _encode_messages(conversation(record_data, fmt), tokenizer, loss_from=0)

    if not completion_only:
        labels = list(ids)
    return [{"input_ids": ids[:max_length], "labels": labels[:max_length]}]


def has_loss_tokens(example: Example) -> bool:
    """Whether any label after the first is trained (the first token is never predicted)."""
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


@dataclass
class EncodeStats:
    """What ``encode_sft_dataset`` did, for the log."""

    records: int = 0
    """Rows read."""
    examples: int = 0
    """Examples (or packed rows) returned."""
    dropped_no_loss: int = 0
    """Examples dropped because no token had loss left (e.g. the prompt filled max_length)."""
    truncated: int = 0
    """Kept non-text examples cut at max_length (one cut down to no loss token is counted as
    dropped only)."""
    tokens: int = 0
    """Tokens in the kept examples."""
    loss_tokens: int = 0
    """Of those, tokens that are trained (labels != -100, first token of each example excluded)."""


def encode_sft_dataset(
    records: Sequence[Any],
    fmt: str,
    tokenizer: Any,
    *,
    max_length: int,
    completion_only: bool = True,
    packing: bool = False,
) -> tuple[list[Example], EncodeStats]:
    """Encode ``Record``s, drop examples with no loss token, optionally pack; count what happened."""
    stats = EncodeStats(records=len(records))
    examples: list[Example] = []
    for record in records:
        try:
            encoded = encode_sft(
                record.data, fmt, tokenizer, max_length=max_length, completion_only=completion_only
            )
        except ValueError as e:
            raise DataError(f"{record.where}: {e}") from e
        cut = (
            fmt != "text"
            and len(encoded[0]["input_ids"]) == max_length
            and _untruncated_length(record.data, fmt, tokenizer) > max_length
        )
        for example in encoded:
            if has_loss_tokens(example):
                examples.append(example)
                stats.truncated += cut
            else:
                stats.dropped_no_loss += 1
    stats.tokens = sum(len(e["input_ids"]) for e in examples)
    stats.loss_tokens = sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in examples)
    if packing:
        examples = pack(examples, max_length)
    stats.examples = len(examples)
    return examples, stats


def _untruncated_length(record_data: dict[str, Any], fmt: str, tokenizer: Any) -> int:
    big = 1 << 30
    return len(encode_sft(record_data, fmt, tokenizer, max_length=big)[0]["input_ids"])


# ----------------------------------------------------------------------------- tokenising


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenize(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    """``ids`` ending with one EOS: text that already ends with the EOS token (data written for
    TRL often does) gets no second one, which would train the model to follow EOS with EOS."""
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def _encode_plain(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``prompt + completion + EOS``, tokenised apart so the loss starts on a token boundary."""
    prompt_ids = _tokenize(tokenizer, prompt, special=True)
    completion_ids = _with_eos(_tokenize(tokenizer, completion, special=False), tokenizer)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _opening(tokenizer: Any, turn: dict[str, Any]) -> str:
    """What the template renders before the words of a conversation's first turn `turn`, when
    that turn is the assistant's (a BOS, a default system prompt, the assistant header): the
    text that `turn` rendered alone shares with it rendered without its content."""
    try:
        alone = _render(tokenizer, [turn], False)
        empty = _render(tokenizer, [{**turn, "content": ""}], False)
    except Exception:  # noqa: BLE001 - a template that rejects such a conversation
        return ""
    return os.path.commonprefix([alone, empty])


def _encode_messages(
    messages: list[dict[str, Any]], tokenizer: Any, *, loss_from: int
) -> tuple[list[int], list[int]]:
    """Chat-template ids of ``messages``, with loss on the assistant turns at index >= loss_from."""
    if not _has_chat_template(tokenizer):
        raise ValueError(
            "message-list data needs a tokenizer with a chat template, and this "
            "one has none (set one on the tokenizer, or use string columns)"
        )
    full = _render(tokenizer, messages, False)
    spans = []  # character spans [start, end) of the trained assistant turns in `full`
    for i in range(loss_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else _opening(tokenizer, messages[0])
        through = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(through)):
            raise ValueError(
                "the chat template renders a conversation's first turns differently "
                "from the whole conversation, so assistant turns cannot be located"
            )
        # Stop at the end-of-turn token: the newline some templates put after it gets no loss.
        spans.append((len(before), len(through.rstrip())))

    try:
        encoding = tokenizer(
            full, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    except NotImplementedError:  # a Python (slow) tokenizer: count the tokens of each prefix
        ids = _tokenize(tokenizer, full, special=False)
        bounds = [
            (
                len(_tokenize(tokenizer, full[:s], special=False)),
                len(_tokenize(tokenizer, full[:e], special=False)),
            )
            for s, e in spans
        ]
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in bounds:
            labels[s:e] = ids[s:e]
        return ids, labels

    labels = [IGNORE_INDEX] * len(ids)
    for k, (tok_start, tok_end) in enumerate(offsets):
        tok_end = max(tok_end, tok_start + 1)  # zero-width tokens count at their position
        if any(tok_start < end and tok_end > start for start, end in spans):
            labels[k] = ids[k]
    return ids, labels


# ----------------------------------------------------------------------------- packing, batches


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Pack examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    Each row gets ``position_ids`` that restart at 0 for every example in it, which is what lets
    attention stay inside each example (see the module docstring).
    """
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length={max_length}")
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
        else:
            space, target = free.pop(slot)
            rows[target].append(i)
            bisect.insort(free, (space - n, target))

    packed = []
    for members in rows:
        row: Example = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            row["input_ids"] += examples[i]["input_ids"]
            row["labels"] += examples[i]["labels"]
            row["position_ids"] += list(range(len(examples[i]["input_ids"])))
        packed.append(row)
    return packed


def collate_sft(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples (packed or not) into a batch.

    Returns ``input_ids``, ``labels`` (``-100`` on padding and on the first token of every packed
    example, which has nothing before it in its own sequence), ``position_ids`` and, unless a row is
    packed, ``attention_mask``. A batch with packed rows has no ``attention_mask``: the model must
    be called with ``use_cache=False`` so transformers builds the block-diagonal mask from
    ``position_ids`` (padding then forms its own block, and with right padding no real token ever
    attends to it).
    """
    lengths = [len(example["input_ids"]) for example in examples]
    batch, width = len(examples), max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)  # [B, T]
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    position_ids = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
    for b, (example, n) in enumerate(zip(examples, lengths, strict=True)):
        input_ids[b, :n] = torch.tensor(example["input_ids"])
        labels[b, :n] = torch.tensor(example["labels"])
        positions = example.get("position_ids")
        position_ids[b, :n] = torch.tensor(positions) if positions is not None else torch.arange(n)
        position_ids[b, n:] = torch.arange(width - n)  # padding is a sequence of its own
        attention_mask[b, :n] = 1
    labels[position_ids == 0] = IGNORE_INDEX  # [B, T]
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    is_packed = ((position_ids[:, 1:] == 0) & (attention_mask[:, 1:] == 1)).any()
    if not is_packed:
        out["attention_mask"] = attention_mask
    return out

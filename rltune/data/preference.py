"""Preference pairs as token ids: one shared prompt, a chosen and a rejected response.

Each side is encoded like an SFT prompt-completion row (chat template for message lists), so
`labels` mark exactly the response tokens. Truncation never cuts a response: when a pair is
longer than data.max_length, the prompt loses tokens from the left; when even the responses do
not fit beside one prompt token, the pair is dropped and counted.
"""

from __future__ import annotations

from typing import Any

from rltune.data.formats import DataError, preference_parts
from rltune.data.loading import Record
from rltune.data.sft import collate_sft, encode_sft
from rltune.losses import IGNORE_INDEX

_NO_LIMIT = 1 << 30


def _prompt_length(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def encode_pair(row: dict[str, Any], tokenizer: Any) -> dict[str, dict[str, list[int]]]:
    """{"chosen": example, "rejected": example}, untruncated."""
    prompt, chosen, rejected = preference_parts(row)
    return {
        name: encode_sft(
            {"prompt": prompt, "completion": response},
            "prompt_completion",
            tokenizer,
            max_length=_NO_LIMIT,
        )[0]
        for name, response in (("chosen", chosen), ("rejected", rejected))
    }


def fit_pair(pair: dict[str, dict[str, list[int]]], max_length: int) -> dict | None:
    """The pair cut to max_length by dropping prompt tokens from the left, or None when the
    responses would not fit beside at least one prompt token."""
    cut = max(len(e["input_ids"]) for e in pair.values()) - max_length
    if cut <= 0:
        return pair
    if cut >= min(_prompt_length(e["labels"]) for e in pair.values()):
        return None
    return {name: {key: ids[cut:] for key, ids in e.items()} for name, e in pair.items()}


def encode_pairs(
    records: list[Record], tokenizer: Any, *, max_length: int
) -> tuple[list[dict], int, int]:
    """(pairs, prompts truncated, pairs dropped). Raises DataError naming the row on bad input."""
    pairs, truncated, dropped = [], 0, 0
    for record in records:
        try:
            pair = encode_pair(record.data, tokenizer)
        except ValueError as err:
            raise DataError(f"{record.file}, row {record.index}: {err}") from err
        fitted = fit_pair(pair, max_length)
        if fitted is None:
            dropped += 1
            continue
        truncated += fitted is not pair
        if record.data.get("margin") is not None:  # optional reward-model margin column
            try:
                fitted = {**fitted, "margin": float(record.data["margin"])}
            except (TypeError, ValueError):
                raise DataError(
                    f"{record.file}, row {record.index}: margin {record.data['margin']!r} is not a number"
                ) from None
        pairs.append(fitted)
    return pairs, truncated, dropped


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict[str, Any]:
    """One batch of 2B rows: the B chosen sides, then the B rejected sides (one forward pass)."""
    return collate_sft([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_token_id)

"""Preference pairs as token ids: one shared prompt, a chosen and a rejected response.

Each side is encoded like an SFT prompt-completion row (chat template for message lists), so
`labels` mark exactly the response tokens. Truncation never cuts a response: when a pair is
longer than data.max_length, the prompt loses tokens from the left; when even the responses do
not fit beside one prompt token, the pair is dropped and counted.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rltune.data.formats import DataError, preference_parts
from rltune.data.loading import Record
from rltune.data.sft import collate_sft, encode_sft
from rltune.logps import IGNORE_INDEX
from rltune.prefix import PAD, branch_attention_mask

log = logging.getLogger(__name__)

_NO_LIMIT = 1 << 30
SIDES = ("chosen", "rejected")


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
    """(pairs, prompts truncated, pairs dropped). Raises DataError naming the row on bad input;
    warns about pairs whose two responses are the same (they carry no preference), and raises
    when every pair is so."""
    pairs, truncated, dropped, ties = [], 0, 0, []
    for record in records:
        try:
            pair = encode_pair(record.data, tokenizer)
        except ValueError as err:
            raise DataError(f"{record.where}: {err}") from err
        if pair["chosen"]["input_ids"] == pair["rejected"]["input_ids"]:
            ties.append(record)
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
                    f"{record.where}: margin {record.data['margin']!r} is not a number"
                ) from None
        pairs.append(fitted)
    if ties and len(ties) == len(records):
        raise DataError(
            f"all {len(records)} preference pairs have the same chosen and rejected response "
            f"(first: {ties[0].where}): there is no preference to learn"
        )
    if ties:
        log.warning(
            "%d preference pairs have the same chosen and rejected response (first: %s): they "
            "teach nothing (DPO's loss is log 2 with no gradient there)",
            len(ties),
            ties[0].where,
        )
    return pairs, truncated, dropped


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict[str, Any]:
    """One batch of 2B rows: the B chosen sides, then the B rejected sides (one forward pass)."""
    return collate_sft([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_token_id)


def shared_prompt(pair: dict) -> int | None:
    """The length of the prompt that the pair's two sides begin with, or None when their
    prompt tokens differ (then the pair needs a row per side)."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    p = _prompt_length(chosen["labels"])
    if (
        p != _prompt_length(rejected["labels"])
        or chosen["input_ids"][:p] != rejected["input_ids"][:p]
    ):
        return None
    return p


def pair_tokens(pair: dict) -> int:
    """Tokens of an encoded pair, both sides (its prompt counted twice, as a row per side has it)."""
    return sum(len(pair[side]["input_ids"]) for side in SIDES)


def collate_shared(pairs: list[dict], pad_token_id: int) -> dict[str, Any]:
    """One row per pair: its prompt once, then the chosen, then the rejected response, so the
    prompt is computed once instead of twice. Every pair must have a `shared_prompt`.

    With p, c, r the three lengths, row b holds [prompt | chosen | rejected | padding] and:
        position_ids    0..p-1, then p..p+c-1, then p..p+r-1 (the rejected side restarts where
                        the prompt ends, as in its own row)
        attention_mask  4-D boolean [B, 1, T, T] (rltune.prefix.branch_attention_mask):
                        causal, except that rejected tokens do not see chosen ones, and nothing
                        sees padding
        chosen_index    [B, Cmax] the position whose logits predict each chosen token (p-1+k)
        rejected_index  [B, Rmax] the same for rejected tokens (p-1, then p+c+k-1)
        chosen_ids, rejected_ids   [B, Cmax] / [B, Rmax] the tokens after the prompt
        chosen_mask, rejected_mask 1 where a token is labelled (the response; not, e.g., the
                                   template's newline after EOS)
    """
    rows, labelled = [], []
    for pair in pairs:
        p = shared_prompt(pair)
        assert p is not None, "collate_shared needs pairs whose sides share their prompt"
        prompt = pair["chosen"]["input_ids"][:p]
        rows.append((prompt, pair["chosen"]["input_ids"][p:], pair["rejected"]["input_ids"][p:]))
        labelled.append(
            [[label != IGNORE_INDEX for label in pair[side]["labels"][p:]] for side in SIDES]
        )
    batch = len(rows)
    width = max(len(a) + len(c) + len(r) for a, c, r in rows)
    c_max, r_max = max(len(c) for _, c, _ in rows), max(len(r) for _, _, r in rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)  # [B, T]
    position_ids = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
    segment = torch.full((batch, width), PAD, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected
    out = {
        name: torch.zeros((batch, n), dtype=torch.long)
        for name, n in (
            ("chosen_index", c_max),
            ("chosen_ids", c_max),
            ("chosen_mask", c_max),
            ("rejected_index", r_max),
            ("rejected_ids", r_max),
            ("rejected_mask", r_max),
        )
    }
    for b, (prompt, chosen, rejected) in enumerate(rows):
        p, c, r = len(prompt), len(chosen), len(rejected)
        input_ids[b, : p + c + r] = torch.tensor(prompt + chosen + rejected)
        position_ids[b, : p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        segment[b, :p], segment[b, p : p + c], segment[b, p + c : p + c + r] = 0, 1, 2
        out["chosen_index"][b, :c] = torch.arange(p - 1, p + c - 1)
        out["rejected_index"][b, :r] = torch.cat(
            [torch.tensor([p - 1]), torch.arange(p + c, p + c + r - 1)]
        )
        out["chosen_ids"][b, :c], out["rejected_ids"][b, :r] = (
            torch.tensor(chosen),
            torch.tensor(rejected),
        )
        out["chosen_mask"][b, :c] = torch.tensor(labelled[b][0])
        out["rejected_mask"][b, :r] = torch.tensor(labelled[b][1])
    out.update(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=branch_attention_mask(segment),  # [B, 1, T, T]
    )
    return out

"""Shared-prefix rows: a prompt computed once for several continuations of it.

A DPO pair (one prompt, two responses) and a GRPO group (one prompt, group_size completions)
both spend most of a forward pass on the prompt when every continuation gets a row of its
own. Here they share one row, [prompt | continuation 1 | continuation 2 | ...], and a 4-D
attention mask keeps the continuations apart: each one sees the prompt and its own earlier
tokens, never another continuation. With position ids that restart where the prompt ends for
every continuation, each continuation's logits are those of a row of its own (tested in
tests/test_prefix.py and tests/test_dpo_rm_e2e.py).

Only attention kernels that take an arbitrary 4-D mask can run such rows: transformers' `sdpa`
and `eager` (`mask_for` gives each its form), and only models whose layers all attend in full
(a 4-D mask replaces transformers' sliding-window masks). Others keep a row per continuation
(`takes_4d_mask`).
"""

from __future__ import annotations

import torch
from torch import nn

PAD = -1
"""Segment id of padding: no token attends to it."""


def _attention(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def full_attention_only(model: nn.Module) -> bool:
    """Whether every layer of `model` attends to the whole sequence. transformers uses a 4-D
    mask as it is given, so under one a sliding-window (or chunked) layer would silently see
    too far back; rltune.decoders' static cache assumes full layers too."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    window = getattr(config, "sliding_window", None)
    return window is None or not getattr(config, "use_sliding_window", True)


def takes_4d_mask(model: nn.Module) -> bool:
    """Whether shared-prefix rows can run on `model`: its attention implementation accepts an
    arbitrary 4-D mask (`sdpa`, `eager`) and all its layers attend in full. Otherwise (or when
    the model does not say) every continuation gets its own row."""
    return _attention(model) in ("sdpa", "eager") and full_attention_only(model)


def mask_for(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean 4-D mask in the form `model`'s attention takes it: boolean for `sdpa`;
    additive (0 where allowed, the fp32 minimum elsewhere) for `eager`, which adds the mask to
    the attention scores."""
    if _attention(model) != "eager":
        return allowed
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )


def branch_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask (True = may attend) from segment ids [B, T]: 0 for the shared
    prompt, k >= 1 for continuation k, `PAD` for padding.

    A token attends causally to the prompt and to its own segment. A padding position attends
    only to itself, so no query row is fully masked (SDPA would return NaN there); nothing
    attends to padding, so those outputs never reach a real token.
    """
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()  # [T, T]
    query, key = segment[:, :, None], segment[:, None, :]  # [B, T, 1], [B, 1, T]
    allowed = causal & (query != PAD) & (key != PAD) & ((key == 0) | (key == query))  # [B, T, T]
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)
    return allowed[:, None]


def group_rows(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One row per group: its prompt once, then each completion in a slot of its own.

    prompt_ids, prompt_mask          [n, P] left-padded, one per group
    completion_ids, completion_mask  [n, G, C] right-padded, G completions per group

    Row k is [prompt (P) | slot 1 (C) | ... | slot G (C)], L = P + G * C tokens, with:
        attention_mask  [n, 1, L, L] from `branch_attention_mask` (slot j is segment j)
        position_ids    [n, L] the prompt's as `generate` numbered it; slot tokens p, p+1, ...
                        where p is the group's prompt length, as in a row of their own
        logits_index    [G * C] the positions whose logits predict each completion token, slot
                        by slot: the prompt's last position, then the slot's own positions.
                        The prompt is right-aligned, so every row shares this index, and
                        `model(..., logits_to_keep=logits_index).logits` views as [n * G, C, V]
        completion_ids  [n * G, C] (the rows of the rollout, in order)
    """
    n, width = prompt_ids.shape
    _, g, c = completion_ids.shape
    device = prompt_ids.device
    prompt_len = prompt_mask.sum(-1)  # [n]
    slot_segment = torch.arange(1, g + 1, device=device)[None, :, None].expand(n, g, c)  # [n, G, C]
    segment = torch.cat(
        [
            torch.where(prompt_mask.bool(), 0, PAD),  # [n, P]
            torch.where(completion_mask.bool(), slot_segment, PAD).flatten(1),  # [n, G*C]
        ],
        dim=1,
    )  # [n, L]
    prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # [n, P]
    slot_positions = prompt_len[:, None] + torch.arange(c, device=device)  # [n, C]
    position_ids = torch.cat([prompt_positions, slot_positions.repeat(1, g)], dim=1)  # [n, L]
    steps = torch.arange(c, device=device)  # [C]
    starts = width + torch.arange(g, device=device)[:, None] * c  # [G, 1]
    logits_index = torch.where(steps == 0, width - 1, starts + steps - 1)  # [G, C]
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids.flatten(1)], dim=1),  # [n, L]
        "attention_mask": branch_attention_mask(segment),
        "position_ids": position_ids,
        "logits_index": logits_index.flatten(),
        "completion_ids": completion_ids.flatten(0, 1),  # [n*G, C]
    }

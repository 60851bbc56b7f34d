"""Generation with the policy.

For now: batched greedy decoding through `generate`, used by evaluation. Sampling with groups,
stop strings and faster engines arrive with the RL algorithms behind the same narrow interface:
prompts (token ids) in, completions (token ids and text) out.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions (text, special tokens removed) of already-templated prompts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = tokenizer(prompts[start : start + batch_size], add_special_tokens=False)[
                "input_ids"
            ]
            # Left padding, done here rather than by the tokenizer: a padded tokenizer call leaves
            # padding switched on in its backend, and save_pretrained would persist it.
            width = max(len(x) for x in ids)
            input_ids = torch.tensor(
                [[pad] * (width - len(x)) + x for x in ids], device=device
            )  # [b, width]
            attention_mask = torch.tensor(
                [[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device
            )
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )  # [b, width + new]
            completions.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return completions

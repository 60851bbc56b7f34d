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
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at the edge
    device = next(model.parameters()).device
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # [b, prompt + new]
            new = out[:, enc["input_ids"].shape[1] :]  # [b, new]
            completions.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions

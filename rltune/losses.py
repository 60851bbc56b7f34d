"""Losses as pure tensor functions: tensors and keyword hyperparameters in, tensors out.

They never see a config, a model or a tokenizer. Shapes are noted on each line; `B` is the batch,
`T` the sequence length, `V` the vocabulary. Label value -100 marks a position without loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t's logits predict token t+1."""
    # [B, T] -> [B, T]; the last position predicts nothing
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and how many there are.

    `logits` [B, T, V] predict the *next* token; `labels` [B, T] are the input ids with -100
    where no loss is wanted (the shift happens here). The caller divides by the number of loss
    tokens of the whole optimizer step, so every token weighs the same however the step is split
    into micro-batches.
    """
    targets = shift_labels(labels)  # [B, T]
    nll = F.cross_entropy(
        logits.float().flatten(0, 1),  # [B*T, V]
        targets.flatten(),  # [B*T]
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, (targets != IGNORE_INDEX).sum()


def token_accuracy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labelled next tokens the argmax of `logits` [B, T, V] gets right."""
    targets = shift_labels(labels)  # [B, T]
    mask = targets != IGNORE_INDEX  # [B, T]
    return ((logits.argmax(-1) == targets) & mask).sum()

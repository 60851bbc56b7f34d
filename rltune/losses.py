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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    `logits` [B, T, V] predict the next token; `labels` [B, T] as in `token_nll_sum`. Computed
    row by row so only one row's fp32 log-softmax exists at a time.
    """
    targets = shift_labels(labels)  # [B, T]
    mask = targets != IGNORE_INDEX  # [B, T]
    safe = targets.clamp(min=0)  # [B, T]; masked positions gather any id, then count zero
    rows = []
    for b in range(logits.shape[0]):
        logp = torch.log_softmax(logits[b].float(), dim=-1)  # [T, V]
        rows.append(logp.gather(-1, safe[b].unsqueeze(-1)).squeeze(-1))  # [T]
    token_logps = torch.stack(rows) * mask  # [B, T]
    return token_logps.sum(-1), mask.sum(-1)  # [B], [B]


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and the implicit rewards of each response.

    Inputs are sequence log-probs [B] (summed over response tokens; for `ipo` pass them averaged
    per token, as IPO's length-normalised objective wants). With
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):

        sigmoid  -(1 - ε) log σ(β h) - ε log σ(-β h)          DPO; ε > 0 is conservative DPO
        robust   (-(1 - ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε)   unbiased under flip rate ε
        ipo      (h - 1 / (2β))²                               IPO (β plays the role of τ)
        hinge    max(0, 1 - β h)                               SLiC

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]) with reward = β (policy - ref).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # [B]
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()  # [B]
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()  # [B]
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Reward-model loss per pair: -log σ(r_chosen - r_rejected - margin), scores [B]."""
    diff = chosen_scores - rejected_scores  # [B]
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)  # [B]

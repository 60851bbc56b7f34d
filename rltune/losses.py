"""Losses as pure tensor functions: tensors and keyword hyperparameters in, tensors out.

They never see a config, a model or a tokenizer. Shapes are noted on each line; `B` is the batch,
`T` the sequence length, `V` the vocabulary. Label value -100 marks a position without loss.
The log-probs they take come from `rltune.logps`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rltune.logps import IGNORE_INDEX, sequence_logps, shift_labels


def token_nll_sum(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_above: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and how many there are.

    `logits` [B, T, V] predict the *next* token; `labels` [B, T] are the input ids with -100
    where no loss is wanted (the shift happens here). The caller divides by the number of loss
    tokens of the whole optimizer step, so every token weighs the same however the step is split
    into micro-batches. Logits of more than `chunk_above` elements (256 MiB in fp32) never get a
    whole fp32 copy: the log-softmax runs a chunk of positions at a time (`logps.token_logps`).
    """
    if logits.numel() > chunk_above:
        logps, count = sequence_logps(logits, labels)  # [B], [B]
        return -logps.sum(), count.sum()
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

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]) with reward = β (policy - ref)
    of the inputs (for `ipo`, of the per-token averages).
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


REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")


def simpo_loss(
    chosen_avg: torch.Tensor,
    rejected_avg: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): DPO without a reference, on length-normalised log-probs.

    Inputs are each response's log-prob divided by its number of tokens, [B]. With
    z = β (chosen_avg - rejected_avg) - γ:

        -(1 - ε) log σ(z) - ε log σ(-z)

    γ is the target reward margin. ε = 0 is the paper's loss; ε > 0 smooths the labels as
    conservative DPO does (as SimPO's own code and TRL's CPO trainer allow).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]) with SimPO's implicit reward
    β x average log-prob.
    """
    z = beta * (chosen_avg - rejected_avg) - gamma  # [B]
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # [B]
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, elementwise: log(-expm1(x)) above -ln 2 and log1p(-exp(x))
    below, each where it keeps its precision (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ORPO's odds need P < 1. An average log-prob of exactly 0 (every token certain, which fp32
# reaches once a logit leads by ~17) makes log(1 - P) -inf, the log odds ratio inf - inf and the
# gradient NaN; the average is capped just below 0 for the odds (P <= 1 - 1e-6), with no
# gradient where it is capped. TRL's ORPO trainer has no such guard.
_MAX_AVG_LOGP = -1e-6


def orpo_loss(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, *, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024): the chosen response's NLL plus an odds-ratio penalty, with no
    reference.

    Inputs are each response's log-prob divided by its number of tokens, [B] (the paper's
    P(y|x) is the length-normalised likelihood). With odds(y) = P / (1 - P):

        log odds(y)    = avg - log(1 - exp(avg))
        log_odds_ratio = log odds(chosen) - log odds(rejected)
        losses         = -chosen_avg - λ log σ(log_odds_ratio)

    Returns (losses [B], nll [B] = -chosen_avg, log_odds_ratio [B]).
    """
    chosen_odds = chosen_avg.clamp(max=_MAX_AVG_LOGP)  # [B]
    rejected_odds = rejected_avg.clamp(max=_MAX_AVG_LOGP)  # [B]
    log_odds_ratio = (chosen_odds - log1mexp(chosen_odds)) - (
        rejected_odds - log1mexp(rejected_odds)
    )  # [B]
    nll = -chosen_avg  # [B]
    return nll - lam * F.logsigmoid(log_odds_ratio), nll, log_odds_ratio


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Reward-model loss per pair: -log σ(r_chosen - r_rejected - margin), scores [B]."""
    diff = chosen_scores - rejected_scores  # [B]
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)  # [B]


# ----------------------------------------------------------------------------- policy gradient


def kl_k3(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate k3 = exp(ref - logp) - (ref - logp) - 1
    (Schulman's unbiased, always non-negative estimator), [B, T] -> [B, T]. Positions outside
    `mask` [B, T] give 0: their difference is zeroed before the exp, so a large one there (the
    log-probs of padding are anything) cannot overflow into inf x 0 = NaN in the loss or its
    gradient."""
    delta = ref_logps - logps
    if mask is not None:
        delta = delta * mask
    return torch.exp(delta) - delta - 1


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    importance_level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective as a per-token loss, and where clipping was active.

    logps, old_logps, mask [B, T]; advantages [B] (one per completion, GRPO) or [B, T] (one per
    token, PPO). The importance ratio is

        token     r_t = exp(logp_t - old_t)                          (PPO, GRPO)
        sequence  r   = exp(mean_t (logp_t - old_t)), one per row    (GSPO)

    loss_t = -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A); epsilon_high > epsilon_low
    is DAPO's clip-higher. Returned flags [B, T] (bool): `low` where the ratio is below 1 - ε_low
    with A < 0, `high` where it is above 1 + ε_high with A > 0 (the tokens whose gradient the
    clip removes).
    """
    log_ratio = (logps - old_logps) * mask  # [B, T]; 0 outside the mask: no overflow there
    if importance_level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(
            min=1
        )  # [B, 1]
        log_ratio = log_ratio.expand_as(logps)  # [B, T]
    elif importance_level != "token":
        raise ValueError(f"importance_level must be token or sequence, got {importance_level!r}")
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    flags = {
        "low": (ratio < 1 - epsilon_low) & (adv < 0) & mask.bool(),
        "high": (ratio > 1 + epsilon_high) & (adv > 0) & mask.bool(),
    }
    return loss, flags


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def loss_denominator(masks: list[torch.Tensor], mode: str, *, max_tokens: int) -> float:
    """The step-level denominator of `aggregate_loss`, from every micro-batch's mask [b, T]:

    token_mean               completion tokens in the step              (DAPO)
    seq_mean_token_mean      completions in the step                    (GRPO)
    seq_mean_token_sum_norm  completions in the step x max_tokens       (Dr. GRPO)

    Counted on this rank's rows; the trainer makes it global (`shared_denominator`).
    """
    if mode == "token_mean":
        total = sum(float(m.sum()) for m in masks)
    elif mode == "seq_mean_token_mean":
        total = float(sum(m.shape[0] for m in masks))
    elif mode == "seq_mean_token_sum_norm":
        total = float(sum(m.shape[0] for m in masks) * max_tokens)
    else:
        raise ValueError(f"unknown loss_agg {mode!r}; expected one of {LOSS_AGGREGATIONS}")
    return total


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, denominator: float
) -> torch.Tensor:
    """This micro-batch's share of the step loss; per_token and mask [b, T], `denominator` from
    `loss_denominator` over the whole step, so splitting a step into micro-batches never changes
    its gradient. seq_mean_token_mean averages each completion over its own tokens first."""
    masked = per_token * mask  # [b, T]
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / denominator
    if mode in ("token_mean", "seq_mean_token_sum_norm"):
        return masked.sum() / denominator
    raise ValueError(f"unknown loss_agg {mode!r}; expected one of {LOSS_AGGREGATIONS}")


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token [B, T] and where the clipped branch was taken:
    0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange, cliprange)
    plain_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(plain_sq, clipped_sq), clipped_sq > plain_sq

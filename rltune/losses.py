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


def token_nll_sum(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_above: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and how many there are.

    `logits` [B, T, V] predict the *next* token; `labels` [B, T] are the input ids with -100
    where no loss is wanted (the shift happens here). The caller divides by the number of loss
    tokens of the whole optimizer step, so every token weighs the same however the step is split
    into micro-batches. Logits of more than `chunk_above` elements (256 MiB in fp32) never get a
    whole fp32 copy: the log-softmax runs a chunk of positions at a time (`token_logps`).
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


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of `targets` [N] under softmax(hidden [N, H] @ weight [V, H]^T), and how many
    the argmax gets right, `chunk` rows at a time. The gradients are worked out chunk by chunk
    in the forward pass (dNLL/dlogits = softmax - onehot), so no [N, V] logits outlive a chunk
    and nothing is recomputed in backward, which only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        w = weight.to(hidden.dtype)  # the compute dtype (bf16 under autocast)
        grad_hidden = torch.empty_like(hidden)
        need_weight = ctx.needs_input_grad[1]  # not for a frozen head (LoRA)
        grad_weight = torch.zeros(
            weight.shape if need_weight else (0,), dtype=torch.float32, device=weight.device
        )
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]  # [n, H], [n]
            logits = (h @ w.T).float()  # [n, V], the chunk's one fp32 buffer
            rows = torch.arange(len(t), device=t.device)
            correct += (logits.argmax(-1) == t).sum()
            picked = logits[rows, t]  # [n]
            m = logits.amax(-1, keepdim=True)  # [n, 1]
            e = logits.sub_(m).exp_()  # in place of the logits
            sums = e.sum(-1, keepdim=True)
            nll += (m + sums.log()).squeeze(-1).sub_(picked).sum()  # per row, then summed
            probs = e.div_(sums)  # the softmax
            probs[rows, t] -= 1.0  # dNLL/dlogits
            g = probs.to(hidden.dtype)
            del logits, e, probs  # free before the next chunk allocates
            grad_hidden[s : s + chunk] = g @ w
            if need_weight:  # the product in the compute dtype, summed in fp32
                grad_weight.add_(g.T @ h)
            del g
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    def backward(ctx, grad_nll, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = grad_weight * grad_nll if ctx.needs_input_grad[1] else None
        return grad_hidden * grad_nll, grad_weight, None, None


def linear_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_nll_sum` and `token_accuracy_sum` from the last hidden states [B, T, H] and the
    output layer's weight [V, H] instead of logits: only the labelled positions go through the
    output layer, `chunk_size` at a time, so the [B, T, V] logits never exist. Returns (summed
    NLL, labelled tokens, correctly predicted tokens)."""
    targets = shift_labels(labels).flatten()  # [B*T]
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # [N]
    nll, correct = _LinearCrossEntropy.apply(
        hidden.flatten(0, 1)[keep], weight, targets[keep], chunk_size
    )
    return nll, keep.new_tensor(len(keep)), correct


def token_accuracy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labelled next tokens the argmax of `logits` [B, T, V] gets right."""
    targets = shift_labels(labels)  # [B, T]
    mask = targets != IGNORE_INDEX  # [B, T]
    return ((logits.argmax(-1) == targets) & mask).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    `logits` [B, T, V] predict the next token; `labels` [B, T] as in `token_nll_sum`. The fp32
    log-softmax is computed in chunks (see `token_logps`), never for the whole batch at once.
    """
    targets = shift_labels(labels)  # [B, T]
    mask = targets != IGNORE_INDEX  # [B, T]
    safe = targets.clamp(min=0)  # [B, T]; masked positions gather any id, then count zero
    token = token_logps(logits, safe) * mask  # [B, T]
    return token.sum(-1), mask.sum(-1)  # [B], [B]


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


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Reward-model loss per pair: -log σ(r_chosen - r_rejected - margin), scores [B]."""
    diff = chosen_scores - rejected_scores  # [B]
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)  # [B]


# ----------------------------------------------------------------------------- policy gradient


# Log-probs and entropies a chunk of positions at a time. With x = logits / T, logp = x -
# logsumexp(x), p = softmax(x) and H = -sum p logp: dlogp_t/dx = onehot(t) - p and
# dH/dx = -p (logp + H), each divided by T for the logits. The autograd Functions below save the
# log-normalisers and recompute each chunk's softmax in backward, writing its gradient into one
# preallocated tensor, so no [N, V] fp32 tensor outlives a chunk in either pass (and no chunk's
# gradient is padded out to the whole [N, V], as slicing a tensor under autograd would).


def _chunk_stats(x: torch.Tensor, t: torch.Tensor, entropy: torch.Tensor | None):
    """Of fp32 logits / T `x` [n, V] (overwritten), and targets `t` [n]: the targets' log-probs
    [n] and the log-normalisers [n]; the entropies [n] go into `entropy` when it is given.

    Written in place of `x`, so that a chunk holds one [n, V] fp32 buffer: with m = max x and
    e = exp(x - m), s = sum e, the log-normaliser is m + log s and the entropy
    log s - sum e log e / s."""
    picked = x.gather(-1, t[:, None]).squeeze(-1)  # [n]
    m = x.amax(-1, keepdim=True)  # [n, 1]
    e = x.sub_(m).exp_()  # x is spent
    sums = e.sum(-1)
    log_s = sums.log()
    if entropy is not None:
        entropy.copy_(log_s - e.xlogy_(e).sum(-1) / sums)  # xlogy: 0 log 0 = 0
    norm = m.squeeze(-1) + log_s
    return picked - norm, norm


def _chunk_grad(x, t, norm, entropy, g, g_h) -> torch.Tensor:
    """The gradient for the logits of a chunk, in place of its fp32 logits / T `x` [n, V], given
    the log-normalisers `norm` [n], the entropies [n], and the loss's gradients for the targets'
    log-probs `g` [n, 1] and for the entropies `g_h` [n, 1] (None: no entropy term), both
    already divided by T. One [n, V] buffer without the entropy term, two with it."""
    logp = x.sub_(norm[:, None])  # [n, V]
    if g_h is None:  # p (-g)
        grad = logp.exp_().mul_(-g)
    else:  # p (-g_H (logp + H) - g)
        p = logp.exp()
        grad = p.mul_(logp.add_(entropy[:, None]).mul_(-g_h).sub_(g))
    grad[torch.arange(len(t), device=t.device), t] += g.squeeze(-1)  # the onehot term
    return grad


class _LogitsLogps(torch.autograd.Function):
    """log p(target) and the entropy per position under softmax(logits [N, V] / temperature),
    `chunk` rows at a time (see the note above `_chunk_stats`)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, chunk: int, with_entropy: bool):
        n, device = logits.shape[0], logits.device
        logps = torch.empty(n, dtype=torch.float32, device=device)
        norms = torch.empty(n, dtype=torch.float32, device=device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):
            for s in range(0, n, chunk):
                x = logits[s : s + chunk].float() / temperature  # a fresh [n, V] tensor
                part = entropy[s : s + chunk] if with_entropy else None
                logps[s : s + chunk], norms[s : s + chunk] = _chunk_stats(
                    x, targets[s : s + chunk], part
                )
                del x  # free before the next chunk allocates
        ctx.save_for_backward(logits, targets, norms, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an unused entropy's gradient stays None, not zeros
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        logits, targets, norms, entropy = ctx.saved_tensors
        use_entropy = grad_entropy is not None and entropy.numel() > 0
        if grad_logps is None:
            grad_logps = torch.zeros_like(norms)
        grad_logits = torch.empty_like(logits)
        inv_t, c = 1.0 / ctx.temperature, ctx.chunk
        with torch.autocast(logits.device.type, enabled=False):
            for s in range(0, logits.shape[0], c):
                x = logits[s : s + c].float() * inv_t
                g_h = grad_entropy[s : s + c, None] * inv_t if use_entropy else None
                grad_logits[s : s + c] = _chunk_grad(
                    x,
                    targets[s : s + c],
                    norms[s : s + c],
                    entropy[s : s + c] if use_entropy else None,
                    grad_logps[s : s + c, None] * inv_t,
                    g_h,
                )
                del x  # free before the next chunk allocates
        return grad_logits, None, None, None, None


def logits_token_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) per position under softmax(logits / temperature), and the entropy when
    asked; logits [..., V] (any dtype), targets [...] -> fp32 [...] and [...] (or None). The fp32
    softmax exists `chunk_size` positions at a time, in the forward pass and in backward; the
    autograd graph keeps only the logits themselves and a log-normaliser per position."""
    shape = targets.shape
    logps, ent = _LogitsLogps.apply(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), temperature, chunk_size, entropy
    )
    return logps.view(shape), ent.view(shape) if entropy else None


def token_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log p(target) per position under softmax(logits / temperature); logits [B, T, V] (any
    dtype), targets [B, T] -> [B, T] fp32, a chunk of positions at a time
    (`logits_token_logps`)."""
    logps, _ = logits_token_logps(logits, targets, temperature=temperature, chunk_size=chunk_size)
    return logps


def token_entropy(
    logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, [B, T, V] -> [B, T] fp32, a chunk
    of positions at a time, with its gradient (an entropy bonus) when the logits have one."""
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, ent = logits_token_logps(
        logits, targets, temperature=temperature, chunk_size=chunk_size, entropy=True
    )
    return ent


class _LinearLogps(torch.autograd.Function):
    """log p(target) and the entropy per position under softmax(hidden [N, H] @ weight [V, H]^T
    / temperature), `chunk` rows at a time: no [N, V] logits outlive a chunk. Backward recomputes
    each chunk's logits (one more output-layer matmul, as activation checkpointing would) from
    the saved hidden states and log-normalisers (see the note above `_chunk_stats`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int, with_entropy: bool):
        device = hidden.device
        dtype = (  # the matmul's dtype: autocast's when it is on, the hidden states' otherwise
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else hidden.dtype
        )
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=device)
        norms = torch.empty(n, dtype=torch.float32, device=device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=device)
        w = weight.to(dtype)
        with torch.autocast(device.type, enabled=False):
            for s in range(0, n, chunk):
                h = hidden[s : s + chunk].to(dtype)  # [n, H]
                x = (h @ w.T).float().div_(temperature)  # [n, V]
                part = entropy[s : s + chunk] if with_entropy else None
                logps[s : s + chunk], norms[s : s + chunk] = _chunk_stats(
                    x, targets[s : s + chunk], part
                )
                del x  # free before the next chunk allocates
        ctx.save_for_backward(hidden, weight, targets, norms, entropy)
        ctx.dtype, ctx.temperature, ctx.chunk = dtype, temperature, chunk
        ctx.set_materialize_grads(False)  # an unused entropy's gradient stays None, not zeros
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, targets, norms, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        use_entropy = grad_entropy is not None and entropy.numel() > 0
        if grad_logps is None:
            grad_logps = torch.zeros_like(norms)
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        inv_t, c = 1.0 / ctx.temperature, ctx.chunk
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], c):
                h = hidden[s : s + c].to(ctx.dtype)
                g_h = grad_entropy[s : s + c, None] * inv_t if use_entropy else None
                grad_x = _chunk_grad(
                    (h @ w.T).float().mul_(inv_t),  # [n, V]
                    targets[s : s + c],
                    norms[s : s + c],
                    entropy[s : s + c] if use_entropy else None,
                    grad_logps[s : s + c, None] * inv_t,
                    g_h,
                ).to(ctx.dtype)
                if need_hidden:
                    grad_hidden[s : s + c] = grad_x @ w
                if need_weight:  # the product in the compute dtype, summed in fp32
                    grad_weight.add_(grad_x.T @ h)
                del grad_x  # free before the next chunk allocates
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logps` (and `token_entropy` when asked) from the last hidden states [..., H] and
    the output layer's weight [V, H] instead of logits [..., V]: the output layer runs
    `chunk_size` positions at a time and the logits never exist whole, in the forward pass or
    in backward. Returns fp32 log-probs [...] and entropies [...] (None unless `entropy`); both
    carry gradients (the entropy's serves an entropy bonus)."""
    shape = targets.shape
    logps, ent = _LinearLogps.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        temperature,
        chunk_size,
        entropy,
    )
    return logps.view(shape), ent.view(shape) if entropy else None


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

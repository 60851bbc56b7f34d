"""Log-probabilities of tokens as pure tensor functions, from logits or from the last hidden
states and the output layer's weight, a chunk of positions at a time, so that no whole fp32 copy
of the logits ever exists. The losses in `rltune.losses` take what these return.

They never see a config, a model or a tokenizer. Shapes are noted on each line; `B` is the batch,
`T` the sequence length, `V` the vocabulary, `H` the hidden size. Label value -100
(`IGNORE_INDEX`) marks a position without loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t's logits predict token t+1."""
    # [B, T] -> [B, T]; the last position predicts nothing
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


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
    """`losses.token_nll_sum` and `losses.token_accuracy_sum` from the last hidden states
    [B, T, H] and the output layer's weight [V, H] instead of logits: only the labelled positions
    go through the output layer, `chunk_size` at a time, so the [B, T, V] logits never exist.
    Returns (summed NLL, labelled tokens, correctly predicted tokens)."""
    targets = shift_labels(labels).flatten()  # [B*T]
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # [N]
    nll, correct = _LinearCrossEntropy.apply(
        hidden.flatten(0, 1)[keep], weight, targets[keep], chunk_size
    )
    return nll, keep.new_tensor(len(keep)), correct


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    `logits` [B, T, V] predict the next token; `labels` [B, T] as in `losses.token_nll_sum`. The
    fp32 log-softmax is computed in chunks (see `token_logps`), never for the whole batch at once.
    """
    targets = shift_labels(labels)  # [B, T]
    mask = targets != IGNORE_INDEX  # [B, T]
    safe = targets.clamp(min=0)  # [B, T]; masked positions gather any id, then count zero
    token = token_logps(logits, safe) * mask  # [B, T]
    return token.sum(-1), mask.sum(-1)  # [B], [B]


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

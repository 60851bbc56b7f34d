"""Advantages as pure tensor functions: rewards in, one advantage per completion out.

A reward of NaN means "no reward" (the reward function returned None, raised, or timed out). Such
a completion is left out of its group's statistics and gets advantage 0, so it neither pushes
nor pulls the policy.
"""

from __future__ import annotations

import torch

SCALINGS = ("group", "batch", "none")

STD_EPS = 1e-4
"""Added to the std before dividing, so a group whose rewards are all equal gets advantage 0."""


def group_stats(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of `group_size` adjacent completions: (mean [G], std [G]) over the rewards that
    exist (NaN skipped; std is the unbiased one, 0 when fewer than two rewards exist)."""
    grouped = rewards.view(-1, group_size)  # [G, k]
    valid = ~grouped.isnan()
    count = valid.sum(-1)  # [G]
    values = grouped.nan_to_num(0.0)
    mean = values.sum(-1) / count.clamp(min=1)  # [G]
    sq = ((values - mean.unsqueeze(-1)) ** 2 * valid).sum(-1)  # [G]
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return mean, std


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's group-relative advantages [N] from rewards [N] (NaN = none):

        A_i = (r_i - mean of its group) / (s + 1e-4)

    with s the std of its group (`group`, the GRPO paper), of every reward in the batch
    (`batch`, more robust when groups are small), or 1 with no epsilon (`none`: Dr. GRPO, which
    argues the division biases toward easy and hard prompts).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    mean, std = group_stats(rewards, group_size)
    centred = rewards - mean.repeat_interleave(group_size)  # [N]
    if scale == "group":
        adv = centred / (std.repeat_interleave(group_size) + STD_EPS)
    elif scale == "batch":
        present = rewards[~rewards.isnan()]
        batch_std = present.std() if present.numel() > 1 else torch.zeros(())
        adv = centred / (batch_std + STD_EPS)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}; expected one of {SCALINGS}")
    return adv.nan_to_num(0.0)  # no reward -> no advantage


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G] bool: groups whose existing rewards are all equal (they carry no learning signal)."""
    _, std = group_stats(rewards, group_size)
    return std < 1e-6


def rloo_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize: bool = False
) -> torch.Tensor:
    """RLOO: each completion's baseline is the mean reward of the *other* completions of its
    prompt: A_i = r_i - (sum_group - r_i) / (k - 1), which equals k / (k - 1) (r_i - mean).
    NaN rewards are left out of the baselines and get advantage 0, as does the one reward of a
    group with no other (no baseline). `normalize` then whitens the advantages over the batch,
    over the completions that have one: a completion without an advantage counted as a 0 would
    shrink the batch std and inflate every other advantage."""
    grouped = rewards.view(-1, group_size)  # [G, k]
    valid = ~grouped.isnan()
    count = valid.sum(-1, keepdim=True)  # [G, 1]
    values = grouped.nan_to_num(0.0)
    others = (values.sum(-1, keepdim=True) - values) / (count - 1).clamp(min=1)  # [G, k]
    adv = torch.where(valid & (count > 1), values - others, float("nan")).view(-1)  # [N]
    return batch_whiten(adv) if normalize else adv.nan_to_num(0.0)


def reinforce_advantages(
    rewards: torch.Tensor, baseline: float, *, normalize: bool = False
) -> torch.Tensor:
    """REINFORCE with a baseline: A_i = r_i - baseline (a running mean of past rewards, or the
    batch mean). `normalize` then whitens them over the batch (REINFORCE++'s global
    normalisation). NaN rewards get 0."""
    adv = rewards - baseline
    return batch_whiten(adv) if normalize else adv.nan_to_num(0.0)


def batch_whiten(advantages: torch.Tensor) -> torch.Tensor:
    """(A - batch mean) / batch std over the advantages that exist (NaN -> 0)."""
    present = advantages[~advantages.isnan()]
    if present.numel() > 1:
        advantages = (advantages - present.mean()) / (present.std() + STD_EPS)
    return advantages.nan_to_num(0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, reduce=None
) -> torch.Tensor:
    """(x - mean) / std over the positions where mask is 1 (population variance); padding stays
    0. With shift_mean=False the mean is added back: (x - mean) / std + mean, the spread scaled
    to 1 and the mean kept (TRL's shift_mean=False). `reduce` sums a tensor over processes, for
    statistics over every rank's positions."""
    reduce = reduce or (lambda t: t)
    count, total = reduce(torch.stack([mask.sum(), (x * mask).sum()]))
    mean = total / count.clamp(min=1)
    var = reduce(((x - mean) ** 2 * mask).sum()) / count.clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def sequence_scores(
    scores: torch.Tensor,
    truncated: torch.Tensor,
    *,
    clip: float | None = None,
    missing_eos_penalty: float | None = None,
) -> torch.Tensor:
    """PPO's score per completion [B] from the reward [B]: clipped to [-clip, clip]
    (OpenRLHF's reward_clip_range, which clips the reward model's score), then
    missing_eos_penalty subtracted where `truncated` [B] (TRL's: cut at max_new_tokens, never
    finished). The penalty comes after the clip so that it survives a score at the bound: a cut
    completion always scores below the same one finished, and the result lies in
    [-clip - missing_eos_penalty, clip]. None turns either off."""
    if clip is not None:
        scores = scores.clamp(-clip, clip)  # [B]
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * truncated.to(scores.dtype)  # [B]
    return scores


def kl_shaped_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """PPO's per-token rewards [B, T]: -kl_coef (logp - ref_logp) on every completion token, plus
    the sequence score [B] on each completion's last real token (InstructGPT's shaping)."""
    rewards = -kl_coef * (logps - ref_logps) * mask  # [B, T]
    last = (mask.sum(-1) - 1).clamp(min=0).long()  # [B] index of the last real token
    return rewards.scatter_add(1, last.unsqueeze(-1), scores.unsqueeze(-1).to(rewards.dtype))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens, [B, T] each -> (advantages,
    returns = advantages + values). mask marks real tokens (a prefix of each row); past a
    completion's last token the value and the advantage are 0, so a completion that ends early
    bootstraps from nothing:

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv
    return advantages, advantages + values


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target) over masked positions: 1 is a perfect critic,
    0 no better than a constant, negative worse."""
    var = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    diff = target - predicted
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_diff / var) if var > 0 else float("nan")

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

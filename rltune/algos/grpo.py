"""GRPO: group-relative policy optimisation, with the DAPO, Dr. GRPO and GSPO variants.

One optimizer step (with algo.num_iterations = mu, a rollout serves mu steps):

    prompts  = train.batch_size / group_size prompts from the data
    rollout  = group_size sampled completions per prompt                 (rltune.rollout)
    rewards  = weighted sum of reward.funcs (+ reward.model_path)         (rltune.rewards)
    A_i      = (r_i - mean of its group) / std                            (rltune.advantages)
    loss     = clipped surrogate on exp(logp - old_logp), + kl_coef * k3 KL to the reference,
               aggregated per algo.loss_agg                               (rltune.losses)

Batch semantics: train.batch_size counts completions (prompts per step x group_size), split
into micro-batches of train.micro_batch_size completions; both the global batch and each
process's share must be multiples of group_size (a group never straddles processes).

Layout: with algo.share_prompt each micro-batch holds whole groups, one row per group with the
prompt once and each completion in its own masked slot (rltune.prefix.group_rows); otherwise a
row per completion. Either way micro-batches are sorted by length and cut to their own widest
prompt and completion, and every loss is a sum over completions with step-level denominators,
so the layout leaves the step's gradient as it is.

With mu = 1 the policy that sampled is the policy being updated, so the ratio is exactly 1 and
old log-probs are the current ones, detached: no extra forward pass. With mu > 1 the rollout's
log-probs are computed once after sampling and reused by the mu steps. Log-probs use the
sampling temperature (logits / T), as the sampler did.

Logged metrics (TRL's names): reward, reward_std (mean of the groups' std), rewards/<fn>/mean,
rewards/<fn>/errors, rewards/<fn>/batch_failures (1 when the call on the whole batch failed and the
function was called per sample), frac_reward_zero_std, filtered_groups (with filter_zero_std), loss,
kl (kl_coef > 0), entropy, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean,
completions/mean_length, completions/min_length, completions/max_length, completions/clipped_ratio,
time/generate, time/reward, time/train; at eval steps eval/reward (greedy completions of held-out
prompts), eval/rewards/<fn>/mean, eval/rewards/<fn>/errors and eval/accuracy (built-in task).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rltune.advantages import (
    group_advantages,
    group_stats,
    reinforce_advantages,
    rloo_advantages,
    zero_std_groups,
)
from rltune.algos import BuildContext
from rltune.algos.online import OnlineAlgorithm
from rltune.config import ConfigError, GRPOConfig
from rltune.data.stream import length_sorted
from rltune.distributed import all_gather_cat, shared_denominator
from rltune.losses import (
    aggregate_loss,
    clipped_surrogate,
    kl_k3,
    loss_denominator,
)
from rltune.prefix import takes_4d_mask

log = logging.getLogger(__name__)


class GRPO(OnlineAlgorithm):
    def __init__(self, cfg: GRPOConfig, ctx: BuildContext):
        if cfg.filter_zero_std and ctx.world_size > 1:
            raise ConfigError(
                "algo.filter_zero_std=true with several processes is not supported yet: ranks "
                "would train on different numbers of micro-batches"
            )
        self.logprob_chunk_size = cfg.logprob_chunk_size
        super().__init__(cfg, ctx)
        self.buffer: list[dict[str, Any]] = []
        self.buffer_uses = 0
        self.baseline: float | None = None  # algo.estimator=reinforce's running mean
        self._log_layout()

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """One advantage per completion of this rank's rollout [N] (NaN: none), per
        algo.estimator and algo.scale_rewards. With several processes the rewards of every
        rank are gathered first, so batch statistics are global (groups never straddle ranks)."""
        n = len(rewards)
        everyone = all_gather_cat(rewards.to(self.ctx.device)).cpu()  # [N x world]
        start = self.ctx.rank * n
        return self._advantages(everyone)[start : start + n]

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        g, scale = self.cfg.group_size, self.cfg.scale_rewards
        if self.cfg.estimator == "grpo":
            return group_advantages(rewards, g, scale)
        if self.cfg.estimator == "rloo":
            return rloo_advantages(rewards, g, normalize=scale == "batch")
        # reinforce: the baseline is a running mean of the rewards of earlier batches
        present = rewards[~rewards.isnan()]
        batch_mean = present.mean().item() if present.numel() else 0.0
        baseline = self.baseline if self.baseline is not None else batch_mean
        m = self.cfg.baseline_momentum
        self.baseline = m * baseline + (1 - m) * batch_mean
        return reinforce_advantages(rewards, baseline, normalize=scale == "batch")

    def _rollout_step(self, num_completions: int, micro_batch_size: int) -> list[dict[str, Any]]:
        g = self.cfg.group_size
        prompts, rollout, scores, timing = self.sample_prompts(num_completions // g)
        rewards_t = scores.total  # [N], NaN = no reward
        advantages = self.advantages(rewards_t)  # [N]
        zero_std = zero_std_groups(rewards_t, g)  # [N / g]
        keep = torch.ones(len(rewards_t), dtype=torch.bool)
        if self.cfg.filter_zero_std:
            keep = ~zero_std.repeat_interleave(g)
        loss_mask = rollout.completion_mask.clone()  # [N, C]
        if self.cfg.mask_truncated:
            loss_mask[rollout.truncated] = 0

        kept = keep.nonzero().squeeze(-1).tolist()
        if self.shares_prompt(micro_batch_size):
            chunks = self.groups_sorted(rollout, kept, micro_batch_size, g)
            inputs = [self.shared_rows(rollout, rows, g) for rows in chunks]
        else:
            c_len = rollout.completion_mask.sum(-1).tolist()
            p_len = rollout.prompt_mask.sum(-1).tolist()
            chunks = length_sorted(kept, micro_batch_size, key=lambda i: (c_len[i], p_len[i]))
            inputs = [self.trimmed_rows(rollout, rows) for rows in chunks]
        batches = [
            self._micro_batch(batch, rows, loss_mask, advantages)
            for batch, rows in zip(inputs, chunks, strict=True)
        ]
        denominator = loss_denominator(
            [b["loss_mask"] for b in batches], self.cfg.loss_agg, max_tokens=self.max_new_tokens
        )
        # per-token metrics divide by the step's tokens over all ranks, so that their mean over
        # ranks is the whole step's mean, not a mean of each rank's mean
        step_tokens = shared_denominator(
            sum(float(b["loss_mask"].sum()) for b in batches), self.ctx.device
        )
        for b in batches:
            b["denominator"], b["step_tokens"] = denominator, step_tokens

        _, group_std = group_stats(rewards_t, g)
        metrics = self.rollout_metrics(rollout, scores) | timing
        if g > 1:
            metrics.update(
                reward_std=group_std.mean().item(),
                frac_reward_zero_std=zero_std.float().mean().item(),
            )
        if self.cfg.filter_zero_std:
            metrics["filtered_groups"] = float(zero_std.sum())
        samples = self.samples(
            prompts, rollout, rewards_t, advantages, g, serves=self.cfg.num_iterations
        )
        self._report = (metrics, samples)
        return batches

    def _log_layout(self) -> None:
        m = self.ctx.plan.micro_batch_size
        if self.shares_prompt(m):
            log.info("training rows: one per group, the prompt once (algo.share_prompt)")
        elif self.cfg.share_prompt and self.cfg.group_size > 1:
            log.info(
                "training rows: one per completion (algo.share_prompt needs micro_batch_size %d "
                "to be a multiple of group_size %d, sdpa or eager attention, and no "
                "sliding-window layers)",
                m,
                self.cfg.group_size,
            )

    def shares_prompt(self, micro_batch_size: int) -> bool:
        """Whether micro-batches hold whole groups as one row each (algo.share_prompt)."""
        g = self.cfg.group_size
        return (
            self.cfg.share_prompt
            and g > 1
            and micro_batch_size % g == 0
            and takes_4d_mask(self.policy)
        )

    def _micro_batch(
        self,
        batch: dict[str, Any],
        rows: list[int],
        loss_mask: torch.Tensor,
        advantages: torch.Tensor,
    ) -> dict[str, Any]:
        """The model inputs of `rows` (`shared_rows` or `trimmed_rows`) with their loss mask,
        advantages and the log-probs that stay fixed during the update (reference; old ones
        when mu > 1)."""
        width = batch["completion_ids"].shape[1]
        idx = torch.tensor(rows, device=loss_mask.device)
        batch["loss_mask"] = loss_mask[idx, :width].float()
        batch["advantages"] = advantages.to(self.ctx.device)[torch.tensor(rows)]
        if self.cfg.num_iterations > 1:  # the sampling policy's log-probs, for mu steps
            batch["old_logps"] = self.logps(self.policy, batch)
        if self.reference is not None:
            batch["ref_logps"] = self.reference_logps(batch)
        return batch

    # --- the Algorithm protocol -------------------------------------------------------------

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[dict[str, Any]]:
        self.steps += 1
        if self.buffer_uses and self.buffer_uses < self.cfg.num_iterations:
            self.buffer_uses += 1
            self._report = ({}, [])
            return self.buffer
        self.buffer = self._rollout_step(num_micro * micro_batch_size, micro_batch_size)
        self.buffer_uses = 1
        return self.buffer

    def loss(
        self, batch: dict[str, Any], normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logps, entropy = self.policy_logps(batch)  # [b, C] each
        old = batch.get("old_logps", logps.detach())
        mask = batch["loss_mask"]  # [b, C]
        eps = self.cfg.epsilon
        per_token, clipped = clipped_surrogate(
            logps,
            old,
            batch["advantages"],
            mask,
            epsilon_low=eps,
            epsilon_high=self.cfg.epsilon_high if self.cfg.epsilon_high is not None else eps,
            importance_level=self.cfg.importance_level,
        )
        metrics: dict[str, float] = {}
        tokens = batch["step_tokens"]
        if "ref_logps" in batch:
            kl = kl_k3(logps, batch["ref_logps"], mask)  # [b, C]
            per_token = per_token + self.cfg.kl_coef * kl
            metrics["kl"] = (kl.detach() * mask).sum().item() / tokens
        loss = aggregate_loss(per_token, mask, self.cfg.loss_agg, normaliser)
        low, high = (clipped[k].sum().item() / tokens for k in ("low", "high"))
        metrics.update(
            {
                "loss": loss.item(),
                "entropy": (entropy.detach() * mask).sum().item() / tokens,
                "clip_ratio/low_mean": low,
                "clip_ratio/high_mean": high,
                "clip_ratio/region_mean": low + high,
                "num_tokens": batch["num_tokens"],
            }
        )
        return loss, metrics

    def state_dict(self) -> dict[str, Any]:
        # inside a rollout's mu steps the rollout itself is state: a resumed run reuses it
        inside = 0 < self.buffer_uses < self.cfg.num_iterations
        return super().state_dict() | {
            "baseline": self.baseline,
            "buffer": self.buffer if inside else [],
            "buffer_uses": self.buffer_uses if inside else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.baseline = state.get("baseline")
        self.buffer, self.buffer_uses = state.get("buffer", []), state.get("buffer_uses", 0)

"""PPO with the four-model pipeline (InstructGPT's RLHF).

    prompts ──► policy (trained) ──► completions ──► reward model / reward functions ──► score
                    │                                                                      │
                    ├──► reference (frozen)   per-token KL penalty  ─────────────┐         │
                    │                                                           ▼         ▼
                    └──► value model (trained) ──► V(s_t) ──► GAE over completion tokens ◄─ rewards
                                                                   │
                         ppo_epochs x minibatches of: clipped policy loss + vf_coef x clipped value loss

Per rollout (train.batch_size x algo.num_minibatches completions, algo.group_size per prompt):
the sequence score is clipped to [-algo.reward_clip, algo.reward_clip] (OpenRLHF) and then
lowered by algo.missing_eos_penalty where a completion was cut (TRL); token rewards are
-kl_coef (logp - ref_logp) on every completion token plus that score on the last one, scaled to
std 1 with their mean kept under algo.whiten_rewards (TRL); GAE (algo.gamma, algo.lam) gives
advantages and returns = advantages + values, advantages are whitened, and the rollout then
serves algo.ppo_epochs x algo.num_minibatches optimizer steps. Each step is one minibatch,
split into micro-batches. A sample that has no reward (its function failed) is left out of the
loss.

The value model is a sequence-classification model (a transformer with a scalar head) read at
every completion position, initialised from the reward model or the policy's base
(algo.critic_init), and trained beside the policy at algo.critic_lr.

Logged: reward (before the clip and the penalty), rewards/<fn>/mean, rewards/<fn>/errors,
rewards/<fn>/batch_failures, rewards/clipped_frac (with algo.reward_clip: the share of scores
outside the bounds), kl (per completion, summed over its tokens), kl_coef, returns/mean,
advantages/mean (before whitening), value/explained_var, completions/*, time/*, and per step loss,
ppo/policy_loss, ppo/value_loss, ppo/clipfrac, ppo/approx_kl, value/clipfrac, entropy; eval/reward,
eval/rewards/<fn>/mean, eval/rewards/<fn>/errors and eval/accuracy at eval steps.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from rltune.advantages import (
    explained_variance,
    gae,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
    sequence_scores,
)
from rltune.algos import BuildContext
from rltune.algos.online import OnlineAlgorithm
from rltune.config import ConfigError, PPOConfig
from rltune.distributed import all_reduce_sum, all_reduce_tensor
from rltune.losses import (
    aggregate_loss,
    clipped_surrogate,
    clipped_value_loss,
    loss_denominator,
)
from rltune.models import autocast, load_value_model
from rltune.rollout import position_ids

log = logging.getLogger(__name__)


def token_values(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """V(s_t) [b, C]: the scalar head read at the position before each completion token."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state  # [b, P + C, H]
    width = batch["completion_ids"].shape[1]
    return model.score(hidden[:, -width - 1 : -1]).squeeze(-1).float()  # [b, C]


class PPO(OnlineAlgorithm):
    def __init__(self, cfg: PPOConfig, ctx: BuildContext):
        self.logprob_chunk_size = cfg.logprob_chunk_size
        reward_cfg = ctx.cfg.reward
        source = cfg.critic_init
        if source == "auto":
            source = "reward" if reward_cfg.model_path is not None else "policy"
        if source == "reward" and reward_cfg.model_path is None:
            raise ConfigError("algo.critic_init=reward needs reward.model_path")
        super().__init__(cfg, ctx)
        model_cfg = ctx.cfg.model
        if source == "reward":
            # the critic reads the policy's token ids: a reward model of another vocabulary
            # (which scores text re-encoded with its own tokenizer) cannot start it
            scorer = next(f.fn for f in self.reward_fns if f.model)
            if scorer.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                if cfg.critic_init == "reward":
                    raise ConfigError(
                        f"algo.critic_init=reward: reward.model_path={reward_cfg.model_path} has "
                        f"another tokenizer than model.path={model_cfg.path}, and the value "
                        "model reads the policy's tokens; use algo.critic_init=policy"
                    )
                log.warning(
                    "reward.model_path=%s has another tokenizer than the policy: the value model "
                    "starts from the policy instead (algo.critic_init=auto)",
                    reward_cfg.model_path,
                )
                source = "policy"
            else:  # the policy's revision names a commit of the policy's repository only
                model_cfg = dataclasses.replace(model_cfg, revision=None)
        path = reward_cfg.model_path if source == "reward" else model_cfg.path
        self.critic = load_value_model(
            path, model_cfg, device=ctx.device, pad_token_id=self.tokenizer.pad_token_id
        )
        self.kl_coef = cfg.kl_coef
        self.queue: list[list[dict[str, Any]]] = []  # minibatches left from the current rollout
        self.last_approx_kl = 0.0
        rm = [f.name for f in self.reward_fns if f.model]
        funcs = [f.name for f in self.reward_fns if not f.model]
        ref = (
            "frozen copy"
            if self.reference and self.reference.copy is not None
            else ("adapter-disabled policy" if self.reference else "none (algo.kl_coef=0)")
        )
        log.info(
            "ppo pipeline: policy (trained) | reference: %s | value model (trained, from %s) | "
            "reward: %s%s",
            ref,
            f"reward model {path}" if source == "reward" else f"{path} with a new head",
            "reward model" if rm else "no reward model",
            f" + functions {funcs}" if funcs else "",
        )

    # --- rollout ----------------------------------------------------------------------------

    @torch.no_grad()
    def _values(self, batch: dict[str, Any]) -> torch.Tensor:
        was_training = self.critic.training
        self.critic.eval()
        with autocast(self.ctx.device, self.ctx.dtype):
            values = token_values(self.critic, batch)
        self.critic.train(was_training)
        return values

    def _new_rollout(self, num_completions: int, micro_batch_size: int) -> None:
        g = self.cfg.group_size
        prompts, rollout, scores, timing = self.sample_prompts(num_completions // g)
        device = self.ctx.device
        mask = rollout.completion_mask.float()  # [N, C]
        no_reward = scores.total.isnan().to(device)
        mask[no_reward] = 0  # a failed reward: nothing to learn from this sample
        attention_mask = rollout.attention_mask
        full = {
            "input_ids": rollout.input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids(attention_mask),
            "completion_ids": rollout.completion_ids,
            "loss_mask": mask,
        }
        parts = {"old_logps": [], "ref_logps": [], "old_values": []}
        for start in range(0, len(mask), micro_batch_size):
            b = {k: v[start : start + micro_batch_size] for k, v in full.items()}
            parts["old_logps"].append(self.logps(self.policy, b))
            if self.reference is not None:
                parts["ref_logps"].append(self.reference_logps(b))
            parts["old_values"].append(self._values(b))
        old_logps = torch.cat(parts["old_logps"])  # [N, C]
        ref_logps = torch.cat(parts["ref_logps"]) if parts["ref_logps"] else old_logps
        old_values = torch.cat(parts["old_values"]) * mask  # [N, C]
        raw_score = scores.total.nan_to_num(0.0).to(device)  # [N]
        score = sequence_scores(  # [N]
            raw_score,
            rollout.truncated.to(device),
            clip=self.cfg.reward_clip,
            missing_eos_penalty=self.cfg.missing_eos_penalty,
        )

        token_rewards = kl_shaped_rewards(score, old_logps, ref_logps, mask, self.kl_coef)
        if self.cfg.whiten_rewards:  # over every rank's tokens, as one process would
            # the mean is kept (TRL's shift_mean=False): removed, it would put -mean on every
            # token, and a completion's return would grow or shrink with its length
            token_rewards = masked_whiten(
                token_rewards, mask, shift_mean=False, reduce=all_reduce_tensor
            )
        advantages, returns = gae(
            token_rewards, old_values, mask, gamma=self.cfg.gamma, lam=self.cfg.lam
        )
        raw_adv_mean = masked_mean(advantages, mask).item()
        if self.cfg.whiten_advantages:  # over every rank's tokens, as one process would
            advantages = masked_whiten(advantages, mask, reduce=all_reduce_tensor)
        kl_per_seq = ((old_logps - ref_logps) * mask).sum(-1)[~no_reward]  # [scored]
        clipped = 0  # scored completions whose score the clip moved
        if self.cfg.reward_clip is not None:
            clipped = (raw_score[~no_reward].abs() > self.cfg.reward_clip).sum().item()
        # over every rank's completions, as one process would see them: the controller below
        # must take the same step on every rank
        total = all_reduce_sum(
            {
                "kl": kl_per_seq.sum().item(),
                "n": len(kl_per_seq),
                "rows": len(score),
                "clipped": clipped,
            },
            device,
        )
        kl = total["kl"] / total["n"] if total["n"] else 0.0

        metrics = self.rollout_metrics(rollout, scores) | timing
        metrics.update(
            {
                "kl": kl,
                "kl_coef": self.kl_coef,
                "returns/mean": masked_mean(returns, mask).item(),
                "advantages/mean": raw_adv_mean,
                "value/explained_var": explained_variance(old_values, returns, mask),
            }
        )
        if self.cfg.reward_clip is not None:  # of every rank's scored completions
            metrics["rewards/clipped_frac"] = total["clipped"] / total["n"] if total["n"] else 0.0
        serves = self.cfg.ppo_epochs * self.cfg.num_minibatches
        # the samples' rewards as the functions gave them (NaN: none), like the `reward` metric
        samples = self.samples(prompts, rollout, scores.total, advantages[:, 0], g, serves=serves)
        self._report = (metrics, samples)
        if self.cfg.adaptive_kl:  # proportional controller (Ziegler et al. 2019)
            error = max(-0.2, min(0.2, kl / self.cfg.target_kl - 1))
            self.kl_coef *= 1 + error * total["rows"] / self.cfg.kl_horizon

        full.update(
            old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns
        )
        n, per_step = len(score), num_completions // self.cfg.num_minibatches
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, device=device)
            for mb in range(self.cfg.num_minibatches):
                rows = order[mb * per_step : (mb + 1) * per_step]
                micro = [
                    {k: v[rows[s : s + micro_batch_size]] for k, v in full.items()}
                    for s in range(0, len(rows), micro_batch_size)
                ]
                denominator = loss_denominator(
                    [b["loss_mask"] for b in micro], "token_mean", max_tokens=0
                )
                for b in micro:
                    b["denominator"] = denominator
                self.queue.append(micro)

    # --- the Algorithm protocol -------------------------------------------------------------

    def extra_trained(self, lr: float) -> dict[str, tuple[torch.nn.Module, float]]:
        critic_lr = self.cfg.critic_lr
        if critic_lr is None:
            c = self.ctx.cfg
            # the value model is trained whole: under LoRA the policy's lr is an adapter's,
            # ten times or more a full fine-tuning lr, so it takes the full fine-tuning default
            full = c.peft.method == "none"
            critic_lr = lr if full else c.model.lrs.get(self.cfg.name, self.cfg.lr)
        return {"value": (self.critic, critic_lr)}

    def models(self) -> dict[str, torch.nn.Module]:
        return super().models() | {"value": self.critic}

    @property
    def steps_per_rollout(self) -> int:
        return self.cfg.ppo_epochs  # each minibatch is a step, ppo_epochs times over

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[dict[str, Any]]:
        self.steps += 1
        bound = self.cfg.max_approx_kl
        if self.ctx.world_size > 1:  # one decision for all ranks: they must sample together
            total = all_reduce_sum({"kl": self.last_approx_kl}, self.ctx.device)["kl"]
            self.last_approx_kl = total / self.ctx.world_size
        if self.queue and bound is not None and self.last_approx_kl > bound:
            log.info(
                "approx KL %.4f > algo.max_approx_kl=%g: %d minibatches of this rollout skipped",
                self.last_approx_kl,
                bound,
                len(self.queue),
            )
            self.queue = []
        self._report = ({}, [])
        if not self.queue:
            per_step = num_micro * micro_batch_size
            self._new_rollout(per_step * self.cfg.num_minibatches, micro_batch_size)
        self.last_approx_kl = 0.0
        return self.queue.pop(0)

    def loss(
        self, batch: dict[str, Any], normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logps, entropy = self.policy_logps(batch)  # [b, C] each
        mask = batch["loss_mask"]
        pg, clipped = clipped_surrogate(
            logps,
            batch["old_logps"],
            batch["advantages"],
            mask,
            epsilon_low=self.cfg.epsilon,
            epsilon_high=self.cfg.epsilon,
        )
        values = token_values(self.critic, batch)
        vf, v_clipped = clipped_value_loss(
            values, batch["old_values"], batch["returns"], cliprange=self.cfg.cliprange_value
        )
        policy_terms = pg
        if self.cfg.entropy_coef:  # the bonus: entropy carries its gradient
            policy_terms = pg - self.cfg.entropy_coef * entropy
        # one loss per trained model (DeepSpeed runs an engine for each); they add up to the total
        policy_loss = aggregate_loss(policy_terms, mask, "token_mean", normaliser)
        value_loss = aggregate_loss(self.cfg.vf_coef * vf, mask, "token_mean", normaliser)
        share = lambda x: (x.detach().float() * mask).sum().item() / normaliser  # noqa: E731
        approx_kl = share(0.5 * (logps - batch["old_logps"]) ** 2)
        self.last_approx_kl += approx_kl
        metrics = {
            "loss": policy_loss.item() + value_loss.item(),
            "ppo/policy_loss": share(pg),
            "ppo/value_loss": share(vf),
            "ppo/clipfrac": share(clipped["low"] | clipped["high"]),
            "ppo/approx_kl": approx_kl,
            "value/clipfrac": share(v_clipped),
            "entropy": share(entropy),
            "num_tokens": float(batch["attention_mask"].sum()),
        }
        return {"policy": policy_loss, "value": value_loss}, metrics

    def state_dict(self) -> dict[str, Any]:
        # the rollout's minibatches still to train on: a resumed run goes on with them
        return super().state_dict() | {
            "kl_coef": self.kl_coef,
            "queue": self.queue,
            "last_approx_kl": self.last_approx_kl,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl_coef = state["kl_coef"]
        self.queue = state.get("queue", [])
        self.last_approx_kl = state.get("last_approx_kl", 0.0)

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

With mu = 1 the policy that sampled is the policy being updated, so the ratio is exactly 1 and
old log-probs are the current ones, detached: no extra forward pass. With mu > 1 the rollout's
log-probs are computed once after sampling and reused by the mu steps. Log-probs use the
sampling temperature (logits / T), as the sampler did.

Logged metrics (TRL's names): reward, reward_std (mean of the groups' std), rewards/<fn>/mean,
rewards/<fn>/errors, frac_reward_zero_std, filtered_groups (with filter_zero_std), loss, kl
(kl_coef > 0), entropy, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean,
completions/mean_length, completions/min_length, completions/max_length,
completions/clipped_ratio, time/generate, time/reward, time/train; at eval steps eval/reward
(greedy completions of held-out prompts) and eval/accuracy (built-in task).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from rltune import rewards
from rltune.advantages import group_advantages, group_stats, zero_std_groups
from rltune.algos import BuildContext
from rltune.config import ConfigError, GRPOConfig
from rltune.data import DataError
from rltune.data.source import split_records
from rltune.data.stream import IndexStream
from rltune.evaluation import get_task, render_prompt
from rltune.losses import (
    aggregate_loss,
    clipped_surrogate,
    kl_k3,
    loss_denominator,
    token_entropy,
    token_logps,
)
from rltune.models import Reference, autocast, load_policy, load_tokenizer
from rltune.rollout import Rollout, SamplingParams, generate_greedy, position_ids, sample

log = logging.getLogger(__name__)

PROMPT_FORMATS = {"prompt_answer", "prompt_completion"}
NUM_SAMPLES = 4
"""Prompts whose completions go to samples.jsonl each time samples are logged."""


@dataclass
class Prompt:
    prompt: Any
    """As in the data: a string or a message list (handed to reward functions as is)."""
    ids: list[int]
    """Token ids after the chat template (message lists) or plain tokenisation (strings)."""
    columns: dict[str, Any]
    """The row's other columns (answer, ...), for reward functions."""


class GRPO:
    def __init__(self, cfg: GRPOConfig, ctx: BuildContext):
        self.cfg = cfg
        self.ctx = ctx
        c = ctx.cfg
        self.max_new_tokens = c.data.max_new_tokens
        self.params = SamplingParams(
            max_new_tokens=c.data.max_new_tokens,
            temperature=c.rollout.temperature,
            top_p=c.rollout.top_p,
            top_k=c.rollout.top_k,
            min_p=c.rollout.min_p,
            stop=tuple(c.rollout.stop),
        )
        # Everything checkable is checked before any model loads.
        self.reward_fns = rewards.resolve(c.reward, max_new_tokens=c.data.max_new_tokens)
        self._check_batch()
        (train, _), eval_part = split_records(
            c.data,
            eval_n=c.train.eval_samples,
            task_kind="prompt_answer",
            allowed=PROMPT_FORMATS,
            algo="grpo",
        )
        self.task = get_task(c.data.task) if c.data.path is None else None

        self.tokenizer = load_tokenizer(c.model)
        self.prompts = self._encode(train, "train")
        self.eval_prompts = self._encode(eval_part[0], "eval") if eval_part else []
        self.policy = load_policy(
            c.model,
            c.peft,
            dtype=ctx.dtype,
            device=ctx.device,
            gradient_checkpointing=c.train.gradient_checkpointing,
        )
        self.reference: Reference | None = None
        if cfg.kl_coef > 0:
            self.reference = Reference(self.policy, c.model, device=ctx.device)
            log.info("reference: %s", self.reference.description)
        else:
            log.info("reference: none (algo.kl_coef=0)")
        if c.reward.model_path is not None:
            weight = c.reward.weights[-1] if c.reward.weights is not None else 1.0
            self.reward_fns.append(
                rewards.load_model_reward(c.reward, weight, device=ctx.device, dtype=ctx.dtype)
            )
        log.info(
            "rewards: %s",
            ", ".join(f"{f.name} (weight {f.weight:g})" for f in self.reward_fns),
        )
        self.stream = IndexStream(
            len(self.prompts), seed=c.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )
        self.buffer: list[dict[str, Any]] = []
        self.buffer_uses = 0
        self.steps = 0
        self._report: tuple[dict[str, float], list[dict[str, Any]]] = ({}, [])

    # --- setup ----------------------------------------------------------------------------

    def _check_batch(self) -> None:
        plan, g = self.ctx.plan, self.cfg.group_size
        per_process = plan.micro_batch_size * plan.grad_accum
        if plan.batch_size % g or per_process % g:
            raise ConfigError(
                f"train.batch_size={plan.batch_size} counts completions: it must be a multiple of "
                f"algo.group_size={g}, and so must each process's share ({per_process} = "
                f"micro_batch_size {plan.micro_batch_size} x grad_accum {plan.grad_accum}); e.g. "
                f"train.batch_size={g * max(1, plan.batch_size // g)}"
            )
        log.info(
            "grpo batch: %d prompts x %d completions = %d completions per step",
            plan.batch_size // g,
            g,
            plan.batch_size,
        )

    def _encode(self, records, split: str) -> list[Prompt]:
        budget = self.ctx.cfg.data.max_length - self.max_new_tokens
        if budget < 1:
            raise ConfigError(
                f"data.max_length={self.ctx.cfg.data.max_length} leaves no room for a prompt "
                f"beside data.max_new_tokens={self.max_new_tokens}"
            )
        prompts, truncated = [], 0
        for record in records:
            prompt = record.data["prompt"]
            try:
                if isinstance(prompt, list):
                    text = render_prompt(self.tokenizer, prompt)
                    ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                else:
                    ids = self.tokenizer(prompt)["input_ids"]
            except Exception as err:  # a template that rejects the messages, ...
                raise DataError(f"{record.file}, row {record.index}: {err}") from err
            if len(ids) > budget:
                ids, truncated = ids[-budget:], truncated + 1
            columns = {k: v for k, v in record.data.items() if k != "prompt"}
            prompts.append(Prompt(prompt, list(ids), columns))
        log.info("%s data: %d prompts", split, len(prompts))
        if truncated:
            log.warning(
                "%s data: %d prompts cut from the left to data.max_length - data.max_new_tokens "
                "= %d tokens",
                split,
                truncated,
                budget,
            )
        if not prompts:
            raise DataError(f"{split} data: no prompts")
        return prompts

    # --- rollout ----------------------------------------------------------------------------

    def _score(self, prompts: list[Prompt], rollout: Rollout, group_size: int):
        names = sorted({k for p in prompts for k in p.columns})
        columns: dict[str, list[Any]] = {
            k: [p.columns.get(k) for p in prompts for _ in range(group_size)] for k in names
        }
        lengths = rollout.completion_mask.sum(-1).tolist()
        columns["completion_ids"] = [
            ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), lengths, strict=True)
        ]
        columns["truncated"] = rollout.truncated.tolist()
        return rewards.score(
            self.reward_fns,
            [p.prompt for p in prompts for _ in range(group_size)],
            rollout.completions,
            columns,
            timeout_s=self.ctx.cfg.reward.timeout_s,
        )

    def _forward_logits(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Logits [b, C, V] that predict the completion tokens (only those are computed)."""
        width = batch["completion_ids"].shape[1]
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
            logits_to_keep=width + 1,
        )
        return out.logits[:, :-1]  # position P-1+t predicts completion token t

    @torch.no_grad()
    def _logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with autocast(self.ctx.device, self.ctx.dtype):
            logits = self._forward_logits(model, batch)
            return token_logps(
                logits,
                batch["completion_ids"],
                temperature=self.params.temperature,
                chunk_size=self.cfg.logprob_chunk_size,
            )

    def _rollout_step(self, num_completions: int, micro_batch_size: int) -> list[dict[str, Any]]:
        g = self.cfg.group_size
        prompts = [self.prompts[i] for i in self.stream.take(num_completions // g)]
        started = time.perf_counter()
        with autocast(self.ctx.device, self.ctx.dtype):
            rollout = sample(
                self.policy,
                self.tokenizer,
                [p.ids for p in prompts],
                self.params,
                group_size=g,
                batch_size=self.ctx.cfg.rollout.batch_size,
            )
        generated = time.perf_counter()
        scores = self._score(prompts, rollout, g)
        scored = time.perf_counter()

        rewards_t = scores.total  # [N], NaN = no reward
        advantages = group_advantages(rewards_t, g, self.cfg.scale_rewards)  # [N]
        zero_std = zero_std_groups(rewards_t, g)  # [N / g]
        keep = torch.ones(len(rewards_t), dtype=torch.bool)
        if self.cfg.filter_zero_std:
            keep = ~zero_std.repeat_interleave(g)
        loss_mask = rollout.completion_mask.clone()  # [N, C]
        if self.cfg.mask_truncated:
            loss_mask[rollout.truncated] = 0

        device = self.ctx.device
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        kept = keep.nonzero().squeeze(-1).tolist()
        batches = []
        for start in range(0, len(kept), micro_batch_size):
            rows = torch.tensor(kept[start : start + micro_batch_size], device=device)
            mask = attention_mask[rows]
            batches.append(
                {
                    "input_ids": input_ids[rows],
                    "attention_mask": mask,
                    "position_ids": position_ids(mask),
                    "completion_ids": rollout.completion_ids[rows],
                    "loss_mask": loss_mask[rows].float(),
                    "advantages": advantages.to(device)[rows],
                }
            )
        denominator = loss_denominator(
            [b["loss_mask"] for b in batches], self.cfg.loss_agg, max_tokens=self.max_new_tokens
        )
        step_tokens = max(1.0, sum(float(b["loss_mask"].sum()) for b in batches))
        for b in batches:
            b["denominator"], b["step_tokens"] = denominator, step_tokens
            if self.cfg.num_iterations > 1:  # the sampling policy's log-probs, for mu steps
                b["old_logps"] = self._logps(self.policy, b)
            if self.reference is not None:
                with self.reference.active() as ref:
                    b["ref_logps"] = self._logps(ref, b)

        self._report = (
            self._rollout_metrics(rollout, scores, zero_std, g)
            | {"time/generate": generated - started, "time/reward": scored - generated},
            self._samples(prompts, rollout, rewards_t, advantages, g),
        )
        return batches

    def _rollout_metrics(self, rollout: Rollout, scores, zero_std: torch.Tensor, g: int):
        r = scores.total
        present = r[~r.isnan()]
        _, group_std = group_stats(r, g)
        lengths = rollout.completion_mask.sum(-1).float()
        metrics = {
            "reward": present.mean().item() if present.numel() else float("nan"),
            "reward_std": group_std.mean().item(),
            "frac_reward_zero_std": zero_std.float().mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": rollout.truncated.float().mean().item(),
        }
        if self.cfg.filter_zero_std:
            metrics["filtered_groups"] = float(zero_std.sum())
        for name, values in scores.values.items():
            got = [v for v in values if v is not None]
            if got:
                metrics[f"rewards/{name}/mean"] = sum(got) / len(got)
            metrics[f"rewards/{name}/errors"] = float(scores.errors[name])
        return metrics

    def _samples(self, prompts, rollout, rewards_t, advantages, g: int) -> list[dict[str, Any]]:
        every = self.cfg.sample_every
        if not every or self.steps % every:
            return []
        out = []
        for i in range(min(NUM_SAMPLES, len(prompts))):
            p = prompts[i].prompt
            out.append(
                {
                    "prompt": p if isinstance(p, str) else p[-1]["content"],
                    "completion": rollout.completions[i * g],
                    "reward": float(rewards_t[i * g]),
                    "advantage": float(advantages[i * g]),
                }
            )
        return out

    # --- the Algorithm protocol -------------------------------------------------------------

    @property
    def trained(self) -> torch.nn.Module:
        return self.policy

    def default_lr(self) -> float:
        return self.cfg.lora_lr if self.ctx.cfg.peft.method == "lora" else self.cfg.lr

    def models(self) -> dict[str, torch.nn.Module]:
        copy = self.reference.copy if self.reference is not None else None
        return {"policy": self.policy} | ({"reference": copy} if copy is not None else {})

    def examples_per_epoch(self) -> int:
        return len(self.prompts) * self.cfg.group_size  # completions

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[dict[str, Any]]:
        self.steps += 1
        if self.buffer_uses and self.buffer_uses < self.cfg.num_iterations:
            self.buffer_uses += 1
            self._report = ({}, [])
            return self.buffer
        self.buffer = self._rollout_step(num_micro * micro_batch_size, micro_batch_size)
        self.buffer_uses = 1
        return self.buffer

    def report(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        return self._report

    def normaliser(self, batches: list[dict[str, Any]]) -> float:
        return batches[0]["denominator"] if batches else 1.0

    def loss(
        self, batch: dict[str, Any], normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self._forward_logits(self.policy, batch)  # [b, C, V]
        t = self.params.temperature
        logps = token_logps(
            logits, batch["completion_ids"], temperature=t, chunk_size=self.cfg.logprob_chunk_size
        )  # [b, C]
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
            kl = kl_k3(logps, batch["ref_logps"])  # [b, C]
            per_token = per_token + self.cfg.kl_coef * kl
            metrics["kl"] = (kl.detach() * mask).sum().item() / tokens
        loss = aggregate_loss(per_token, mask, self.cfg.loss_agg, normaliser)
        entropy = token_entropy(
            logits.detach(), temperature=t, chunk_size=self.cfg.logprob_chunk_size
        )
        low, high = (clipped[k].sum().item() / tokens for k in ("low", "high"))
        metrics.update(
            {
                "loss": loss.item(),
                "entropy": (entropy * mask).sum().item() / tokens,
                "clip_ratio/low_mean": low,
                "clip_ratio/high_mean": high,
                "clip_ratio/region_mean": low + high,
                "num_tokens": float(batch["attention_mask"].sum()),
            }
        )
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        n = min(len(self.eval_prompts), self.ctx.cfg.train.eval_samples)
        if not n:
            return {}, []
        prompts = self.eval_prompts[:n]
        completions = generate_greedy(
            self.policy,
            self.tokenizer,
            [p.ids for p in prompts],
            max_new_tokens=self.max_new_tokens,
        )
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        names = sorted({k for p in prompts for k in p.columns})
        columns = {k: [p.columns.get(k) for p in prompts] for k in names}
        columns.update(completion_ids=ids, truncated=[len(i) >= self.max_new_tokens for i in ids])
        scores = rewards.score(
            self.reward_fns,
            [p.prompt for p in prompts],
            completions,
            columns,
            timeout_s=self.ctx.cfg.reward.timeout_s,
        )
        present = scores.total[~scores.total.isnan()]
        metrics = {"eval/reward": present.mean().item() if present.numel() else float("nan")}
        if self.task is not None:
            answers = columns.get("answer", [None] * n)
            correct = [
                a is not None and self.task.is_correct(c, str(a))
                for c, a in zip(completions, answers, strict=True)
            ]
            metrics["eval/accuracy"] = sum(correct) / n
        samples = [
            {
                "prompt": p.prompt if isinstance(p.prompt, str) else p.prompt[-1]["content"],
                "completion": c,
                "reward": float(r),
            }
            for p, c, r in list(zip(prompts, completions, scores.total, strict=True))[:NUM_SAMPLES]
        ]
        return metrics, samples

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.steps = state["steps"]
        if self.cfg.num_iterations > 1 and self.steps % self.cfg.num_iterations:
            log.warning(
                "resumed inside a rollout's %d iterations: the next step samples a new rollout",
                self.cfg.num_iterations,
            )

"""What the online algorithms (GRPO, RLOO, REINFORCE, PPO, rejection sampling) share: prompts
from the data (as token ids: `rltune.data.prompts`), the policy, an optional reference, reward
functions, sampling, log-probs of completions, and evaluation by greedy decoding. Each algorithm
subclasses `OnlineAlgorithm` and adds its own batches and loss.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rltune import rewards
from rltune.algos import AlgorithmBase, BuildContext
from rltune.config import check_groups
from rltune.data.prompts import PROMPT_FORMATS, Prompt, encode_prompts
from rltune.data.source import split_records
from rltune.data.stream import IndexStream
from rltune.decode import fast_sample
from rltune.distributed import all_reduce_sum
from rltune.evaluation import get_task
from rltune.hidden_states import HiddenStateHead, last_hidden
from rltune.logps import linear_token_logps, token_entropy, token_logps
from rltune.models import Reference, autocast, load_policy, load_tokenizer
from rltune.prefix import group_rows, mask_for
from rltune.profiling import cuda_peak_gib
from rltune.rollout import Rollout, SamplingParams, greedy_rollout, position_ids, sample

log = logging.getLogger(__name__)

NUM_SAMPLES = 4
"""Prompts whose completions go to samples.jsonl each time samples are logged."""


class OnlineAlgorithm(AlgorithmBase):
    """Subclasses set `cfg.group_size` (completions per prompt) and may set `cfg.kl_coef`
    (a reference model is built when it is above 0), and implement the Algorithm protocol's
    `next_batches`, `normaliser` and `loss`."""

    logprob_chunk_size = 1024

    def __init__(self, cfg: Any, ctx: BuildContext):
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
        self.check_batch()
        (train, _), eval_part = split_records(
            c.data,
            eval_n=c.train.eval_samples,
            task_kind="prompt_answer",
            allowed=PROMPT_FORMATS,
            algo=cfg.name,
        )
        self.task = get_task(c.data.task) if c.data.path is None else None

        self.tokenizer = load_tokenizer(c.model)
        self.prompts = self._encode(train, "train")
        where = f"data.path={c.data.path}" if c.data.path else f"data.task={c.data.task}"
        rewards.check_columns(self.reward_fns, [p.columns for p in self.prompts], where)
        self.reward_watch = rewards.FailureWatch()
        self.eval_prompts = self._encode(eval_part[0], "eval") if eval_part else []
        scored = self.eval_prompts[: c.train.eval_samples]  # the rows `evaluate` scores
        if scored:  # else eval/reward is NaN all run, from a column the eval rows lack
            eval_where = (
                f"data.eval_path={c.data.eval_path}"
                if c.data.path is not None and c.data.eval_path is not None
                else f"the eval rows of {where}"
            )
            rewards.check_columns(self.reward_fns, [p.columns for p in scored], eval_where)
        self.policy = load_policy(
            c.model,
            c.peft,
            dtype=ctx.dtype,
            device=ctx.device,
            gradient_checkpointing=c.train.gradient_checkpointing,
        )
        self.hidden_head = HiddenStateHead("algo.fused_logps", cfg.fused_logps)
        self.reference: Reference | None = None
        if getattr(cfg, "kl_coef", 0) > 0:
            self.reference = Reference(self.policy, c.model, device=ctx.device)
            log.info("reference: %s", self.reference.description)
        else:
            log.info("reference: none (algo.kl_coef=0)")
        if c.reward.model_path is not None:
            weight = c.reward.weights[-1] if c.reward.weights is not None else 1.0
            scorer = rewards.load_model_reward(
                c.reward,
                weight,
                device=ctx.device,
                dtype=ctx.dtype,
                system_prompt=c.data.system_prompt,
            )
            scorer.fn.check_prompt(self.prompts[0].prompt, where)
            self.reward_fns.append(scorer)
        log.info(
            "rewards: %s",
            ", ".join(f"{f.name} (weight {f.weight:g})" for f in self.reward_fns),
        )
        self.stream = IndexStream(
            len(self.prompts), seed=c.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )
        self.steps = 0
        self._report: tuple[dict[str, float], list[dict[str, Any]]] = ({}, [])

    # --- setup ----------------------------------------------------------------------------

    def check_batch(self) -> None:
        """train.batch_size counts completions and must hold whole groups."""
        plan, g = self.ctx.plan, self.cfg.group_size
        check_groups(plan, g, explicit_accum=self.ctx.cfg.train.grad_accum is not None)
        log.info(
            "%s batch: %d prompts x %d completions = %d completions per step",
            self.cfg.name,
            plan.batch_size // g,
            g,
            plan.batch_size,
        )

    def _encode(self, records, split: str) -> list[Prompt]:
        c = self.ctx.cfg
        return encode_prompts(
            records,
            split,
            self.tokenizer,
            max_length=c.data.max_length,
            max_new_tokens=self.max_new_tokens,
            system_prompt=c.data.system_prompt,
            model_path=c.model.path,
        )

    # --- rollouts -------------------------------------------------------------------------

    def sample_prompts(
        self, num_prompts: int
    ) -> tuple[list[Prompt], Rollout, Any, dict[str, float]]:
        """(prompts, rollout of group_size completions each, reward scores, timing metrics)."""
        g = self.cfg.group_size
        prompts = [self.prompts[i] for i in self.stream.take(num_prompts)]
        started = time.perf_counter()
        rollout = self.generate([p.ids for p in prompts], group_size=g)
        generated = time.perf_counter()
        peak = cuda_peak_gib(self.ctx.device)  # the step's peak so far: its rollout's
        scores = self._score(prompts, rollout, g)
        failed = rewards.failed_everywhere(scores, len(rollout.completions))
        if self.ctx.world_size > 1:  # every rank stops, or none: the next step is collective
            failed = all_reduce_sum(failed, self.ctx.device)
        self.reward_watch.update(
            {name: v == self.ctx.world_size for name, v in failed.items()}, scores.last_error
        )
        timing = {
            "time/generate": generated - started,
            "time/reward": time.perf_counter() - generated,
        }
        if peak is not None:
            timing["memory/generate_peak_gib"] = peak
        return prompts, rollout, scores, timing

    def generate(
        self, ids: list[list[int]], *, group_size: int = 1, greedy: bool = False
    ) -> Rollout:
        """`group_size` completions of each prompt (token ids) by the policy, sampled (training)
        or greedy (evaluation), with the configured engine (`rollout.engine`), at most
        `rollout.batch_size` rows at a time. Evaluation goes through the same engine as the
        rollouts: on a GPU the fast one's CUDA graph decodes a token in a quarter of
        `generate`'s time."""
        rc = self.ctx.cfg.rollout
        with autocast(self.ctx.device, self.ctx.dtype):
            if rc.engine == "hf" and greedy:
                return greedy_rollout(
                    self.policy,
                    self.tokenizer,
                    ids,
                    max_new_tokens=self.max_new_tokens,
                    stop=self.params.stop,
                    batch_size=rc.batch_size,
                )
            if rc.engine == "hf":
                return sample(
                    self.policy,
                    self.tokenizer,
                    ids,
                    self.params,
                    group_size=group_size,
                    batch_size=rc.batch_size,
                )
            params = self.params
            if greedy:  # the argmax of the raw logits (temperature 1), as `generate` picks it
                params = SamplingParams(self.max_new_tokens, stop=self.params.stop)
            rollout, _ = fast_sample(
                self.policy,
                self.tokenizer,
                ids,
                params,
                group_size=group_size,
                batch_size=rc.batch_size,
                greedy=greedy,
                decoder="auto" if rc.cuda_graphs else "dynamic",
                dtype=self.ctx.dtype,
                compile=rc.compile,
            )
        return rollout

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

    def completion_logps(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        *,
        entropy: bool = False,
        temperature: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs [b, C] of the completion tokens at the sampling temperature (or the one
        given), and their entropies [b, C] when asked, from either row layout; both carry
        gradients when grad is enabled. With algo.fused_logps and a plain output layer they come
        from the last hidden states a chunk at a time, and no [b, C, V] logits exist."""
        width = batch["completion_ids"].shape[1]
        shared = "logits_index" in batch  # a row per group (rltune.prefix.group_rows)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        kwargs = {
            "temperature": self.params.temperature if temperature is None else temperature,
            "chunk_size": self.logprob_chunk_size,
        }
        head = self.hidden_head(
            model, "log-probs" if model is self.policy else "reference log-probs"
        )
        if head is not None:
            hidden = last_hidden(model, **inputs, use_cache=False)  # [rows, T, H]
            # the positions that predict completion tokens: slot by slot, or the last C + 1 but one
            picked = hidden[:, batch["logits_index"]] if shared else hidden[:, -width - 1 : -1]
            picked = picked.reshape(-1, width, hidden.shape[-1])  # [b, C, H]
            return linear_token_logps(
                picked, head.weight, batch["completion_ids"], entropy=entropy, **kwargs
            )
        logits = model(
            **inputs,
            use_cache=False,
            logits_to_keep=batch["logits_index"] if shared else width + 1,
        ).logits
        # [n, G*C, V] -> [n*G, C, V]; or position P-1+t predicts completion token t
        logits = logits.reshape(-1, width, logits.shape[-1]) if shared else logits[:, :-1]
        logps = token_logps(logits, batch["completion_ids"], **kwargs)
        return logps, token_entropy(logits, **kwargs) if entropy else None

    @torch.no_grad()
    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Completion-token log-probs [b, C] at the sampling temperature, without gradients."""
        with autocast(self.ctx.device, self.ctx.dtype):
            return self.completion_logps(model, batch)[0]

    @staticmethod
    def groups_sorted(rollout: Rollout, rows: list[int], size: int, g: int) -> list[list[int]]:
        """`rows` (whole groups of `g` adjacent rows) in micro-batches of `size` rows, groups
        ordered by their longest completion then their prompt length (as
        `rltune.data.stream.length_sorted` orders rows)."""
        c_len = rollout.completion_mask.sum(-1).tolist()
        p_len = rollout.prompt_mask.sum(-1).tolist()
        starts = rows[::g]
        assert rows == [s + j for s in starts for j in range(g)], "rows must be whole groups"
        order = sorted(starts, key=lambda s: (max(c_len[s : s + g]), p_len[s]))
        flat = [s + j for s in order for j in range(g)]
        return [flat[s : s + size] for s in range(0, len(flat), size)]

    def shared_rows(self, rollout: Rollout, rows: list[int], g: int) -> dict[str, Any]:
        """The model inputs of `rows` (whole groups of `g`) with each group's prompt computed
        once (`rltune.prefix.group_rows`), cut to the groups' widest prompt and completion."""
        idx = torch.tensor(rows, device=rollout.prompt_ids.device)
        heads = idx[::g]
        prompt_mask, completion_mask = rollout.prompt_mask[heads], rollout.completion_mask[idx]
        p = int(prompt_mask.sum(-1).max())
        c = max(1, int(completion_mask.sum(-1).max()))
        width = prompt_mask.shape[1]
        n = len(heads)
        batch = group_rows(
            rollout.prompt_ids[heads, width - p :],
            prompt_mask[:, width - p :],
            rollout.completion_ids[idx, :c].reshape(n, g, c),
            completion_mask[:, :c].reshape(n, g, c),
        )
        batch["attention_mask"] = mask_for(self.policy, batch["attention_mask"])
        batch["num_tokens"] = float(g * prompt_mask.sum() + completion_mask.sum())
        return {k: v.to(self.ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def trimmed_rows(self, rollout: Rollout, rows: list[int]) -> dict[str, Any]:
        """The model inputs of `rows` of a rollout without the columns that are padding in
        every one of them (prompts are left-padded, completions right-padded)."""
        device = self.ctx.device
        idx = torch.tensor(rows, device=rollout.prompt_ids.device)
        prompt_mask, completion_mask = rollout.prompt_mask[idx], rollout.completion_mask[idx]
        p = int(prompt_mask.sum(-1).max())
        c = max(1, int(completion_mask.sum(-1).max()))
        width = prompt_mask.shape[1]
        ids = torch.cat([rollout.prompt_ids[idx, width - p :], rollout.completion_ids[idx, :c]], 1)
        mask = torch.cat([prompt_mask[:, width - p :], completion_mask[:, :c]], 1)
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": position_ids(mask).to(device),
            "completion_ids": rollout.completion_ids[idx, :c].to(device),
            "num_tokens": float(mask.sum()),
        }

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.reference is not None
        with self.reference.active() as ref:
            return self.logps(ref, batch)

    def rollout_metrics(self, rollout: Rollout, scores: rewards.RewardScores) -> dict[str, float]:
        r = scores.total
        present = r[~r.isnan()]
        lengths = rollout.completion_mask.sum(-1).float()
        metrics = {
            "reward": present.mean().item() if present.numel() else float("nan"),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": rollout.truncated.float().mean().item(),
        }
        metrics |= function_means(scores, "rewards")
        for name in scores.values:
            metrics[f"rewards/{name}/errors"] = float(scores.errors[name])
            metrics[f"rewards/{name}/batch_failures"] = float(scores.batch_failures[name])
        return metrics

    def samples(
        self, prompts, rollout, rewards_t, advantages, g: int, *, serves: int = 1
    ) -> list[dict[str, Any]]:
        """A few of this rollout's samples when one of the `serves` steps it is trained in
        (from this one) is a multiple of sample_every: a rollout every 4 steps would otherwise
        never land on step 50."""
        every = self.cfg.sample_every
        if not every or all((self.steps + i) % every for i in range(serves)):
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

    # --- the Algorithm protocol (shared part) ------------------------------------------------

    def models(self) -> dict[str, torch.nn.Module]:
        copy = self.reference.copy if self.reference is not None else None
        roles = {"policy": self.policy} | ({"reference": copy} if copy is not None else {})
        for f in self.reward_fns:
            if f.model:
                roles["reward_model"] = f.fn.model
        return roles

    def examples_per_epoch(self) -> int:
        # completions, each trained on in `steps_per_rollout` steps
        return len(self.prompts) * self.cfg.group_size * self.steps_per_rollout

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps that one step's worth of completions is trained in."""
        return getattr(self.cfg, "num_iterations", 1)

    def report(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        return self._report

    def normaliser(self, batches: list[dict[str, Any]]) -> float:
        """The step denominator each micro-batch carries (set when the batches are built)."""
        return batches[0]["denominator"] if batches else 0.0

    def policy_logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion-token log-probs [b, C] at the sampling temperature, their entropies
        [b, C]), with gradients: the start of every online loss."""
        logps, entropy = self.completion_logps(self.policy, batch, entropy=True)
        assert entropy is not None
        return logps, entropy

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        n = min(len(self.eval_prompts), self.ctx.cfg.train.eval_samples)
        if not n:
            return {}, []
        prompts = self.eval_prompts[:n]
        # ended as training's samples are, and scored the same way
        rollout = self.generate([p.ids for p in prompts], greedy=True)
        completions = rollout.completions
        scores = self._score(prompts, rollout, 1)
        present = scores.total[~scores.total.isnan()]
        metrics = {"eval/reward": present.mean().item() if present.numel() else float("nan")}
        metrics |= function_means(scores, "eval/rewards")
        # eval/reward averages the samples that were scored: say how many were not
        for name in scores.values:
            metrics[f"eval/rewards/{name}/errors"] = float(scores.errors[name])
        if self.task is not None:
            answers = [p.columns.get("answer") for p in prompts]
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


def function_means(scores: rewards.RewardScores, prefix: str) -> dict[str, float]:
    """`{prefix}/<fn>/mean` per reward function: the mean of its values where it gave one."""
    means = {}
    for name, values in scores.values.items():
        got = [v for v in values if v is not None]
        if got:
            means[f"{prefix}/{name}/mean"] = sum(got) / len(got)
    return means

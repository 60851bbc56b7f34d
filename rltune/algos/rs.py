"""Rejection-sampling fine-tuning (expert iteration, RAFT): sample, keep the best, fine-tune.

One round samples algo.group_size completions for each of algo.prompts_per_round prompts, scores
them with the reward functions, and keeps each prompt's best completion that finished (was not
truncated) when its reward reaches algo.threshold. The kept (prompt, completion) pairs are trained on with the SFT loss (token NLL
of the completion, normalised by the step's completion tokens) until they run out; then the next
round samples from the improved policy.

Logged: acceptance_rate (share of a round's prompts that kept a completion), reward (mean over every
sample of the round), rewards/<fn>/mean, rewards/<fn>/errors, rewards/<fn>/batch_failures, rounds,
completions/*, time/generate, time/reward at each round; loss and num_tokens per step; eval/reward,
eval/rewards/<fn>/mean, eval/rewards/<fn>/errors and eval/accuracy at eval steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rltune.algos import BuildContext
from rltune.algos.online import NUM_SAMPLES, OnlineAlgorithm
from rltune.config import RSConfig
from rltune.distributed import all_reduce_sum
from rltune.rewards import RewardError
from rltune.rollout import left_pad, position_ids

log = logging.getLogger(__name__)

MAX_EMPTY_ROUNDS = 5
"""Rounds in a row that accept nothing before the run stops with an error."""


class RejectionSampling(OnlineAlgorithm):
    def __init__(self, cfg: RSConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.accepted: list[tuple[list[int], list[int]]] = []  # (prompt ids, completion ids)
        self.rounds = 0
        self.last_samples: list[dict[str, Any]] = []  # a few of the latest round's prompts

    def check_batch(self) -> None:
        log.info(
            "rs: rounds of %d prompts x %d completions; %d accepted examples per step",
            self.cfg.prompts_per_round,
            self.cfg.group_size,
            self.ctx.plan.batch_size,
        )

    def _round(self) -> dict[str, float]:
        g = self.cfg.group_size
        prompts, rollout, scores, timing = self.sample_prompts(self.cfg.prompts_per_round)
        rewards = scores.total.view(-1, g)  # [prompts, g]
        # the best completion that finished: a truncated one is never kept
        finished = ~rollout.truncated.view(-1, g).to(rewards.device)
        eligible = rewards.nan_to_num(float("-inf")).masked_fill(~finished, float("-inf"))
        best = eligible.max(-1)  # values, indices [prompts]
        lengths = rollout.completion_mask.sum(-1).tolist()
        kept = []
        for i, (value, j) in enumerate(
            zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ):
            row = i * g + j
            if value >= self.cfg.threshold:  # -inf (none finished) never reaches it
                completion = rollout.completion_ids[row, : lengths[row]].tolist()
                kept.append((prompts[i].ids, completion))
        self.last_samples = []
        for i in range(min(NUM_SAMPLES, len(prompts))):
            p, row, value = prompts[i].prompt, i * g + best.indices[i].item(), best.values[i].item()
            self.last_samples.append(
                {
                    "prompt": p if isinstance(p, str) else p[-1]["content"],
                    "completion": rollout.completions[row],  # the best finished one
                    "reward": value if value > float("-inf") else None,  # None: none finished
                    "accepted": value >= self.cfg.threshold,
                }
            )
        order = torch.randperm(len(kept)).tolist()
        self.accepted.extend(kept[k] for k in order)
        self.rounds += 1
        metrics = self.rollout_metrics(rollout, scores) | timing
        metrics.update(acceptance_rate=len(kept) / len(prompts), rounds=float(self.rounds))
        return metrics

    def _collate(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        device, pad = self.ctx.device, self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([p for p, _ in examples], pad, device)
        width = max(len(c) for _, c in examples)
        completion_ids = torch.tensor(
            [c + [pad] * (width - len(c)) for _, c in examples], device=device
        )
        completion_mask = torch.tensor(
            [[1] * len(c) + [0] * (width - len(c)) for _, c in examples], device=device
        )
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        return {
            "input_ids": torch.cat([prompt_ids, completion_ids], 1),
            "attention_mask": attention_mask,
            "position_ids": position_ids(attention_mask),
            "completion_ids": completion_ids,
            "loss_mask": completion_mask.float(),
        }

    # --- the Algorithm protocol -------------------------------------------------------------

    def examples_per_epoch(self) -> int:
        # a step trains on batch_size accepted examples, one per prompt at most: train.epochs
        # sets as many steps as if every prompt were accepted (the logged epoch is the real one)
        return len(self.prompts)

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[dict[str, Any]]:
        self.steps += 1
        need = num_micro * micro_batch_size
        rounds: list[dict[str, float]] = []
        empty = 0
        # every rank samples as many rounds as the neediest one: generation is collective under
        # ZeRO-3, so ranks must not sample different numbers of rounds
        while all_reduce_sum({"short": float(len(self.accepted) < need)}, self.ctx.device)["short"]:
            rounds.append(self._round())
            empty = empty + 1 if rounds[-1]["acceptance_rate"] == 0 else 0
            if empty >= MAX_EMPTY_ROUNDS:
                raise RewardError(
                    f"rs: {MAX_EMPTY_ROUNDS} rounds in a row accepted no completion with reward >= "
                    f"algo.threshold={self.cfg.threshold}; lower the threshold or check the rewards"
                )
        # the step's rounds (of equal size) averaged, each key over the rounds that report it
        # (a reward function that scored nothing in a round reports no mean); `rounds` is the
        # count so far
        keys = {k for r in rounds for k in r}
        metrics = {
            k: sum(r[k] for r in rounds if k in r) / sum(k in r for r in rounds) for k in keys
        }
        if rounds:
            metrics["rounds"] = float(self.rounds)
        every = self.cfg.sample_every
        self._report = (metrics, self.last_samples if every and self.steps % every == 0 else [])
        taken, self.accepted = self.accepted[:need], self.accepted[need:]
        return [
            self._collate(taken[s : s + micro_batch_size]) for s in range(0, need, micro_batch_size)
        ]

    def normaliser(self, batches: list[dict[str, Any]]) -> float:
        return sum(float(b["loss_mask"].sum()) for b in batches)

    def loss(
        self, batch: dict[str, Any], normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # [b, C] at temperature 1: the plain SFT loss
        logps, _ = self.completion_logps(self.policy, batch, temperature=1.0)
        loss = -(logps * batch["loss_mask"]).sum() / normaliser
        return loss, {"loss": loss.item(), "num_tokens": float(batch["attention_mask"].sum())}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"accepted": self.accepted, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accepted = [tuple(x) for x in state["accepted"]]
        self.rounds = state["rounds"]

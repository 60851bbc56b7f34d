"""Reward-model training: a Bradley-Terry model of pairwise preferences.

The reward model is `AutoModelForSequenceClassification` with one output, initialised from
model.path (the policy's base; the scalar head starts random). It scores the last token of
prompt + response; the loss per pair is -log σ(r_chosen - r_rejected - margin), where margin
comes from an optional `margin` column (0 without one). `final/` loads with
`AutoModelForSequenceClassification.from_pretrained` and is what PPO and GRPO take as
reward.model_path.

Logged metrics (means over the step's pairs):
    loss            Bradley-Terry loss
    accuracy        share of pairs scored chosen > rejected
    margin          r_chosen - r_rejected
    eval/accuracy   the same share on held-out pairs (eval/loss, eval/margin beside it)
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rltune.algos import AlgorithmBase, BuildContext
from rltune.config import RMConfig
from rltune.data import DataError
from rltune.data.preference import collate_pairs, encode_pairs, pair_tokens
from rltune.data.source import split_records
from rltune.data.stream import IndexStream, length_sorted
from rltune.losses import bradley_terry_loss
from rltune.models import load_reward_model, load_tokenizer

log = logging.getLogger(__name__)


class RewardModelTraining(AlgorithmBase):
    def __init__(self, cfg: RMConfig, ctx: BuildContext):
        self.cfg = cfg
        self.ctx = ctx
        (train, _), eval_part = split_records(
            ctx.cfg.data,
            eval_n=ctx.cfg.train.eval_samples,
            task_kind="preference",
            allowed={"preference"},
            algo="rm",
        )
        self.tokenizer = load_tokenizer(ctx.cfg.model)
        max_length = ctx.cfg.data.max_length
        self.pairs, truncated, dropped = encode_pairs(train, self.tokenizer, max_length=max_length)
        self.eval_pairs = (
            encode_pairs(eval_part[0], self.tokenizer, max_length=max_length)[0]
            if eval_part
            else []
        )
        log.info(
            "train data: %d preference pairs (%d prompts truncated, %d dropped); eval: %d pairs",
            len(self.pairs),
            truncated,
            dropped,
            len(self.eval_pairs),
        )
        if not self.pairs:
            raise DataError(f"train data: no preference pair fits data.max_length={max_length}")
        self.reward_model = load_reward_model(
            ctx.cfg.model,
            ctx.cfg.peft,
            device=ctx.device,
            pad_token_id=self.tokenizer.pad_token_id,
            gradient_checkpointing=ctx.cfg.train.gradient_checkpointing,
        )
        self.stream = IndexStream(
            len(self.pairs), seed=ctx.cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )

    def _collate(self, pairs: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            k: v.to(self.ctx.device)
            for k, v in collate_pairs(pairs, self.tokenizer.pad_token_id).items()
        }
        batch["margin"] = torch.tensor(
            [p.get("margin", 0.0) for p in pairs], device=self.ctx.device
        )  # [B]
        batch["num_tokens"] = sum(pair_tokens(p) for p in pairs)
        return batch

    def scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores [B], rejected scores [B])."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out = self.reward_model(**inputs, use_cache=False).logits.squeeze(-1).float()  # [2B]
        chosen, rejected = out.chunk(2)
        return chosen, rejected

    def _terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.scores(batch)
        losses = bradley_terry_loss(chosen, rejected, batch["margin"])  # [B]
        diff = (chosen - rejected).detach()
        return losses, {"accuracy": (diff > 0).float(), "margin": diff}

    # --- the Algorithm protocol ---------------------------------------------------------

    @property
    def trained(self) -> torch.nn.Module:
        return self.reward_model

    def models(self) -> dict[str, torch.nn.Module]:
        return {"reward_model": self.reward_model}

    def examples_per_epoch(self) -> int:
        return len(self.pairs)

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[dict[str, Any]]:
        step = self.stream.take(num_micro * micro_batch_size)
        return [
            self._collate([self.pairs[i] for i in idx])
            for idx in length_sorted(
                step, micro_batch_size, key=lambda i: pair_tokens(self.pairs[i])
            )
        ]

    def normaliser(self, batches: list[dict[str, Any]]) -> float:
        return float(sum(len(b["margin"]) for b in batches))

    def loss(
        self, batch: dict[str, Any], normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        losses, terms = self._terms(batch)
        loss = losses.sum() / normaliser
        metrics = {k: v.sum().item() / normaliser for k, v in terms.items()}
        metrics.update(loss=loss.item(), num_tokens=float(batch["num_tokens"]))
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        n = min(len(self.eval_pairs), self.ctx.cfg.train.eval_samples)
        if not n:
            return {}, []
        was_training = self.reward_model.training
        self.reward_model.eval()
        totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        mb = self.ctx.cfg.train.micro_batch_size
        for start in range(0, n, mb):
            losses, terms = self._terms(self._collate(self.eval_pairs[start : min(n, start + mb)]))
            for k, v in [("loss", losses), *terms.items()]:
                totals[k] += v.sum().item()
        self.reward_model.train(was_training)
        return {f"eval/{k}": v / n for k, v in totals.items()}, []

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])

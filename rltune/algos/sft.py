"""SFT: supervised fine-tuning with the next-token loss.

Logged metrics (summed/averaged over each optimizer step):
    loss                 mean NLL per loss token (completion/assistant tokens unless
                         algo.completion_only=false; every token for raw text)
    mean_token_accuracy  share of loss tokens the argmax predicts
    num_tokens           tokens processed (non-padding), for throughput
    eval/loss            mean NLL per loss token on the eval examples
    eval/accuracy        greedy exact match on the built-in task's eval prompts (data.task only)

The loss of a step is the sum of token NLLs divided by the loss tokens of the *whole* step, so
every token weighs the same however the step is split into micro-batches (the peers' per-micro
mean gives short examples more weight as accumulation grows).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rltune.algos import AlgorithmBase, BuildContext
from rltune.config import SFTConfig
from rltune.data import SFT_FORMATS, DataError, Record, collate_sft, encode_sft_dataset
from rltune.data.source import split_records
from rltune.data.stream import IndexStream, length_sorted
from rltune.evaluation import get_task
from rltune.hidden_states import HiddenStateHead, last_hidden
from rltune.logps import IGNORE_INDEX, linear_nll_sum, shift_labels
from rltune.losses import token_accuracy_sum, token_nll_sum
from rltune.models import load_policy, load_tokenizer

log = logging.getLogger(__name__)


class SFT(AlgorithmBase):
    def __init__(self, cfg: SFTConfig, ctx: BuildContext):
        self.cfg = cfg
        self.ctx = ctx
        data = ctx.cfg.data
        train_data, eval_data = split_records(
            data,
            eval_n=ctx.cfg.train.eval_samples,
            task_kind="prompt_completion",
            allowed=SFT_FORMATS,
            algo="sft",
        )

        self.tokenizer = load_tokenizer(ctx.cfg.model)
        self.examples = self._encode(*train_data, "train", packing=data.packing)
        self.eval_examples = self._encode(*eval_data, "eval", packing=False) if eval_data else []
        self.task = get_task(data.task) if data.path is None else None

        self.policy = load_policy(
            ctx.cfg.model,
            ctx.cfg.peft,
            dtype=ctx.dtype,
            device=ctx.device,
            gradient_checkpointing=ctx.cfg.train.gradient_checkpointing,
        )
        self.stream = IndexStream(
            len(self.examples), seed=ctx.cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )
        self.head = HiddenStateHead("algo.fused_ce", cfg.fused_ce)

    INPUTS = ("input_ids", "attention_mask", "position_ids")

    def _encode(self, records: list[Record], fmt: str, split: str, *, packing: bool) -> list[dict]:
        max_length = self.ctx.cfg.data.max_length
        examples, stats = encode_sft_dataset(
            records,
            fmt,
            self.tokenizer,
            max_length=max_length,
            completion_only=self.cfg.completion_only,
            packing=packing,
        )
        log.info(
            "%s data: %d rows (%s) -> %d %s, %d tokens, %d with loss",
            split,
            stats.records,
            fmt,
            stats.examples,
            "packed rows" if packing else "examples",
            stats.tokens,
            stats.loss_tokens,
        )
        if stats.truncated or stats.dropped_no_loss:
            log.warning(
                "%s data: %d examples truncated at data.max_length=%d; %d dropped with no loss tokens left",
                split,
                stats.truncated,
                max_length,
                stats.dropped_no_loss,
            )
        if not examples:
            files = sorted({record.file for record in records})
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            trained = (
                "completion or assistant tokens are trained (algo.completion_only=true), so a "
                "chat needs an assistant turn"
                if self.cfg.completion_only
                else "every token is trained"
            )
            raise DataError(
                f"{split} data ({shown}): no usable examples: all {stats.dropped_no_loss} had no "
                f"loss token left at data.max_length={max_length}; {trained}"
            )
        return examples

    # --- the Algorithm protocol ---------------------------------------------------------

    def models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy}

    def examples_per_epoch(self) -> int | None:
        return len(self.examples)

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[dict[str, Any]]:
        batches = []
        step = self.stream.take(num_micro * micro_batch_size)
        for idx in length_sorted(
            step, micro_batch_size, key=lambda i: len(self.examples[i]["input_ids"])
        ):
            rows = [self.examples[i] for i in idx]
            batch: dict[str, Any] = {
                k: v.to(self.ctx.device)
                for k, v in collate_sft(rows, self.tokenizer.pad_token_id).items()
            }
            batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)  # real tokens, no padding
            batches.append(batch)
        return batches

    def normaliser(self, batches: list[dict[str, torch.Tensor]]) -> float:
        return float(sum((shift_labels(b["labels"]) != IGNORE_INDEX).sum().item() for b in batches))

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # no attention_mask for packed rows: transformers then builds block-diagonal attention from
        # position_ids, but only with use_cache=False (see rltune/data/sft.py)
        inputs = {k: batch[k] for k in self.INPUTS if k in batch}
        return self.policy(**inputs, use_cache=False).logits  # [B, T, V]

    def loss(
        self, batch: dict[str, torch.Tensor], normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        head = self.head(self.policy, "loss")
        if head is not None:  # algo.fused_ce: no logits
            inputs = {k: batch[k] for k in self.INPUTS if k in batch}
            hidden = last_hidden(self.policy, **inputs, use_cache=False)  # [B, T, H]
            nll, _, correct = linear_nll_sum(hidden, head.weight, batch["labels"])
        else:
            logits = self._forward(batch)  # [B, T, V]
            nll, _ = token_nll_sum(logits, batch["labels"])
            correct = token_accuracy_sum(logits.detach(), batch["labels"])
        loss = nll / normaliser
        metrics = {
            "loss": loss.item(),
            "mean_token_accuracy": correct.item() / normaliser,
            "num_tokens": float(batch["num_tokens"]),
        }
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        was_training = self.policy.training
        self.policy.eval()
        if self.eval_examples:
            nll_total, tokens = 0.0, 0
            mb = self.ctx.cfg.train.micro_batch_size
            n = min(len(self.eval_examples), self.ctx.cfg.train.eval_samples)
            for start in range(0, n, mb):  # the first train.eval_samples examples, no more
                batch = collate_sft(
                    self.eval_examples[start : min(n, start + mb)], self.tokenizer.pad_token_id
                )
                batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
                nll, count = token_nll_sum(self._forward(batch), batch["labels"])
                nll_total += nll.item()
                tokens += int(count.item())
            metrics["eval/loss"] = nll_total / max(1, tokens)
        self.policy.train(was_training)
        task_metrics, samples = self.task_accuracy()
        return metrics | task_metrics, samples

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])

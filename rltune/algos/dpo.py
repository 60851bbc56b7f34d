"""DPO (and IPO, hinge/SLiC, robust and conservative DPO, RPO's NLL term) on preference pairs,
and the reference-free SimPO and ORPO.

The reference is chosen automatically and logged at start:
    full fine-tuning       a frozen copy of the starting model (eval mode, no gradients)
    peft=lora              the policy itself with its adapters disabled: no second model
    algo.precompute_ref    one pass before training stores the reference log-probs in
                           <run dir>/ref_logps.pt (reused on resume); no reference in memory
    loss_type simpo, orpo  none: no copy, no pass ("reference: none ...")

Policy log-probs of the chosen and rejected responses come from one forward pass. With
algo.share_prompt (the default) a pair is one row, [prompt | chosen | rejected], whose rejected
tokens cannot see the chosen ones, so the prompt is computed once; otherwise the 2B sides are rows
of their own. Either way each side's log-prob is summed over its response tokens, which are also
counted (not the prompt's, not padding): IPO, SimPO and ORPO divide by that count.

SimPO and ORPO follow the papers' losses on those per-token averages (rltune.losses). Where
they depart from TRL: ORPO's NLL is each chosen response's NLL per token, averaged over pairs,
as rltune's RPO term (TRL's ORPOTrainer averages over all tokens of the batch's chosen rows,
prompt included; the prompt's log-probs are not even computed here).

Logged metrics (means over the step's pairs). The rewards are each loss's implicit reward:
    loss                 the loss (+ sft_weight x chosen NLL per token)
    rewards/chosen       beta (log pi(y_c|x) - log ref(y_c|x)); simpo, orpo: beta x the
                         per-token average log pi(y_c|x) (SimPO's reward; TRL's, for ORPO)
    rewards/rejected     the same for the rejected response
    rewards/accuracies   share of pairs with rewards/chosen > rewards/rejected
    rewards/margins      rewards/chosen - rewards/rejected
    logps/chosen         summed log-prob of the chosen response under the policy, for every loss
                         type (TRL's CPO and ORPO log the per-token average under this name)
    logps/rejected       the same for the rejected response
    nll_loss             orpo: the chosen responses' NLL per token
    log_odds_chosen      orpo: log odds(y_c) - log odds(y_r), odds = P / (1 - P) of the average
    log_odds_ratio       orpo: log sigma(log_odds_chosen), the odds-ratio term before lambda
                         (TRL's names and meanings, both)
    eval/loss, eval/rewards/accuracies, eval/rewards/margins   on held-out pairs
    eval/accuracy        greedy exact match on the built-in task (data.task only)
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rltune.algos import AlgorithmBase, BuildContext
from rltune.config import DPOConfig
from rltune.data import DataError
from rltune.data.preference import (
    collate_pairs,
    collate_shared,
    encode_pairs,
    pair_tokens,
    shared_prompt,
)
from rltune.data.source import split_records
from rltune.data.stream import IndexStream, length_sorted
from rltune.evaluation import get_task
from rltune.hidden_states import HiddenStateHead, last_hidden
from rltune.logps import IGNORE_INDEX, linear_token_logps, sequence_logps, shift_labels, token_logps
from rltune.losses import REFERENCE_FREE_LOSS_TYPES, dpo_loss, orpo_loss, simpo_loss
from rltune.models import Reference, autocast, load_policy, load_tokenizer
from rltune.prefix import mask_for, takes_4d_mask

log = logging.getLogger(__name__)

REF_CACHE = "ref_logps.pt"


class DPO(AlgorithmBase):
    def __init__(self, cfg: DPOConfig, ctx: BuildContext):
        self.cfg = cfg
        self.ctx = ctx
        data = ctx.cfg.data
        (train, _), eval_part = split_records(
            data,
            eval_n=ctx.cfg.train.eval_samples,
            task_kind="preference",
            allowed={"preference"},
            algo="dpo",
        )
        self.tokenizer = load_tokenizer(ctx.cfg.model)
        self.pairs = self._encode(train, "train")
        self.eval_pairs = self._encode(eval_part[0], "eval") if eval_part else []
        self.task = get_task(data.task) if data.path is None else None

        self.policy = load_policy(
            ctx.cfg.model,
            ctx.cfg.peft,
            dtype=ctx.dtype,
            device=ctx.device,
            gradient_checkpointing=ctx.cfg.train.gradient_checkpointing,
        )
        self.hidden_head = HiddenStateHead("algo.fused_logps", cfg.fused_logps)
        self.ref_cache: dict[str, torch.Tensor] | None = None
        self.reference: Reference | None = None
        if cfg.loss_type in REFERENCE_FREE_LOSS_TYPES:
            log.info("reference: none (algo.loss_type=%s needs no reference)", cfg.loss_type)
        elif cfg.precompute_ref:
            self.reference = Reference(
                self.policy, ctx.cfg.model, device=ctx.device, untrained_policy=True
            )
            self.ref_cache = self._precomputed_reference(ctx.run_dir / REF_CACHE)
            self.reference = None
            log.info(
                "reference: log-probs precomputed in %s; no reference model in memory",
                ctx.run_dir / REF_CACHE,
            )
        else:
            self.reference = Reference(self.policy, ctx.cfg.model, device=ctx.device)
            log.info("reference: %s", self.reference.description)
        self.stream = IndexStream(
            len(self.pairs), seed=ctx.cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )

    def _encode(self, records, split: str) -> list[dict]:
        max_length = self.ctx.cfg.data.max_length
        pairs, truncated, dropped = encode_pairs(records, self.tokenizer, max_length=max_length)
        log.info("%s data: %d preference pairs", split, len(pairs))
        if truncated or dropped:
            log.warning(
                "%s data: %d prompts truncated from the left to fit data.max_length=%d; "
                "%d pairs dropped because their responses alone do not fit",
                split,
                truncated,
                max_length,
                dropped,
            )
        if not pairs:
            raise DataError(f"{split} data: no preference pair fits data.max_length={max_length}")
        return pairs

    # --- the reference ------------------------------------------------------------------

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """Summed response log-probs [2B] under the reference."""
        assert self.reference is not None
        with self.reference.active() as model:
            logps, _ = self._sides_logps(model, batch)
        return logps

    def _precomputed_reference(self, path: Path) -> dict[str, torch.Tensor]:
        """Reference log-probs of every train and eval pair, [N, 2] (chosen, rejected) each."""
        key = {
            "model": self.ctx.cfg.model.path,
            "pairs": len(self.pairs),
            "eval_pairs": len(self.eval_pairs),
            "max_length": self.ctx.cfg.data.max_length,
            "tokens": pairs_digest(self.pairs + self.eval_pairs),  # same size is not same data
        }
        if path.exists():
            cached = torch.load(path, weights_only=False)
            if cached["key"] == key:
                log.info("reference: reusing %s", path)
                return cached
            log.warning("reference: %s was made for other data or model, recomputing", path)
        cache: dict[str, Any] = {"key": key}
        mb = self.ctx.cfg.train.micro_batch_size
        for split, pairs in (("train", self.pairs), ("eval", self.eval_pairs)):
            out = []
            for start in range(0, len(pairs), mb):
                batch = self._collate(pairs[start : start + mb])
                with autocast(self.ctx.device, self.ctx.dtype):
                    logps = self._reference_logps(batch)  # [2b]
                out.append(torch.stack(logps.float().cpu().chunk(2), dim=1))  # [b, 2]
            cache[split] = torch.cat(out) if out else torch.zeros(0, 2)
        if self.ctx.rank == 0:  # every rank computed the same; one writes
            tmp = path.with_suffix(".tmp")
            torch.save(cache, tmp)
            tmp.replace(path)  # atomic: a crash never leaves a half-written cache to be reused
        return cache

    # --- forward and loss ---------------------------------------------------------------

    def _collate(self, pairs: list[dict]) -> dict[str, Any]:
        shared = (
            self.cfg.share_prompt
            and takes_4d_mask(self.policy)
            and all(shared_prompt(p) is not None for p in pairs)
        )
        collate = collate_shared if shared else collate_pairs
        batch = {
            k: v.to(self.ctx.device) for k, v in collate(pairs, self.tokenizer.pad_token_id).items()
        }
        if shared:
            batch["attention_mask"] = mask_for(self.policy, batch["attention_mask"])
        batch["num_tokens"] = sum(pair_tokens(p) for p in pairs)
        batch["pairs"] = len(pairs)
        return batch

    def _sides_logps(
        self, model: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        what = "log-probs" if model is self.policy else "reference log-probs"
        return response_logps(model, batch, self.hidden_head(model, what))

    def _pair_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses [B] and the per-pair quantities the metrics average."""
        logps, counts = self._sides_logps(self.policy, batch)  # [2B]
        chosen, rejected = logps.chunk(2)  # [B] each
        n_chosen, n_rejected = counts.chunk(2)  # response tokens only: no prompt, no padding
        beta, extra = self.cfg.beta, {}
        if self.cfg.loss_type == "simpo":
            losses, r_chosen, r_rejected = simpo_loss(
                chosen / n_chosen,
                rejected / n_rejected,
                beta=beta,
                gamma=self.cfg.simpo_gamma,
                label_smoothing=self.cfg.label_smoothing,
            )
        elif self.cfg.loss_type == "orpo":
            losses, nll, log_odds_ratio = orpo_loss(
                chosen / n_chosen, rejected / n_rejected, lam=beta
            )
            # TRL's rewards for ORPO: beta x the average log-probs
            r_chosen = beta * (chosen / n_chosen).detach()  # [B]
            r_rejected = beta * (rejected / n_rejected).detach()  # [B]
            extra = {  # TRL's names and meanings
                "nll_loss": nll.detach(),
                "log_odds_ratio": F.logsigmoid(log_odds_ratio).detach(),
                "log_odds_chosen": log_odds_ratio.detach(),
            }
        else:
            if "ref" in batch:
                ref = batch["ref"]  # [B, 2]
                ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
            else:
                ref_chosen, ref_rejected = self._reference_logps(batch).chunk(2)  # [B] each
            if self.cfg.loss_type == "ipo":  # IPO compares per-token averages
                args = (
                    chosen / n_chosen,
                    rejected / n_rejected,
                    ref_chosen / n_chosen,
                    ref_rejected / n_rejected,
                )
            else:
                args = (chosen, rejected, ref_chosen, ref_rejected)
            losses, _, _ = dpo_loss(
                *args,
                beta=beta,
                loss_type=self.cfg.loss_type,
                label_smoothing=self.cfg.label_smoothing,
            )
            # the implicit rewards of whole responses, whatever the loss took (IPO: averages)
            r_chosen = beta * (chosen - ref_chosen).detach()  # [B]
            r_rejected = beta * (rejected - ref_rejected).detach()  # [B]
        if self.cfg.sft_weight:
            losses = losses + self.cfg.sft_weight * (
                -chosen / n_chosen
            )  # RPO: chosen NLL per token
        terms = {
            "rewards/chosen": r_chosen,
            "rewards/rejected": r_rejected,
            "rewards/accuracies": (r_chosen > r_rejected).float(),
            "rewards/margins": r_chosen - r_rejected,
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }
        return losses, terms | extra

    # --- the Algorithm protocol ---------------------------------------------------------

    def models(self) -> dict[str, torch.nn.Module]:
        copy = self.reference.copy if self.reference is not None else None
        return {"policy": self.policy} | ({"reference": copy} if copy is not None else {})

    def examples_per_epoch(self) -> int:
        return len(self.pairs)

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[dict[str, Any]]:
        batches = []
        step = self.stream.take(num_micro * micro_batch_size)
        for idx in length_sorted(step, micro_batch_size, key=lambda i: pair_tokens(self.pairs[i])):
            batch = self._collate([self.pairs[i] for i in idx])
            if self.ref_cache is not None:
                batch["ref"] = self.ref_cache["train"][idx].to(self.ctx.device)  # [B, 2]
            batches.append(batch)
        return batches

    def normaliser(self, batches: list[dict[str, Any]]) -> float:
        return float(sum(b["pairs"] for b in batches))  # pairs in the step

    def loss(
        self, batch: dict[str, Any], normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        losses, terms = self._pair_terms(batch)
        loss = losses.sum() / normaliser
        metrics = {k: v.sum().item() / normaliser for k, v in terms.items()}
        metrics.update(loss=loss.item(), num_tokens=float(batch["num_tokens"]))
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        was_training = self.policy.training
        self.policy.eval()
        n = min(len(self.eval_pairs), self.ctx.cfg.train.eval_samples)
        if n:
            totals: dict[str, float] = {}
            mb = self.ctx.cfg.train.micro_batch_size
            for start in range(0, n, mb):
                batch = self._collate(self.eval_pairs[start : min(n, start + mb)])
                if self.ref_cache is not None:
                    batch["ref"] = self.ref_cache["eval"][start : min(n, start + mb)].to(
                        self.ctx.device
                    )
                losses, terms = self._pair_terms(batch)
                for k, v in [("loss", losses), *terms.items()]:
                    totals[k] = totals.get(k, 0.0) + v.sum().item()
            metrics = {
                f"eval/{k}": v / n
                for k, v in totals.items()
                if k in ("loss", "rewards/accuracies", "rewards/margins")
            }
        self.policy.train(was_training)
        task_metrics, samples = self.task_accuracy()
        return metrics | task_metrics, samples

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


def pairs_digest(pairs: list[dict]) -> str:
    """A hash of the pairs' token ids, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(repr(sorted((k, v) for k, v in pair.items())).encode())
    return digest.hexdigest()


def response_logps(
    model: nn.Module, batch: dict[str, Any], head: nn.Linear | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [2B] (the B chosen, then the B rejected) and response token
    counts [2B], from either batch layout. Given `head`, the model's plain output layer
    (algo.fused_logps), they come from the last hidden states and no [rows, T, V] logits
    exist; otherwise from logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "chosen_index" not in batch:  # a row per side
        if head is None:
            logits = model(**inputs, use_cache=False).logits  # [2B, T, V]
            return sequence_logps(logits, batch["labels"])
        hidden = last_hidden(model, **inputs, use_cache=False)  # [2B, T, H]
        targets = shift_labels(batch["labels"])  # [2B, T]
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # [N] each
        logps, _ = linear_token_logps(hidden[rows, cols], head.weight, targets[rows, cols])
        sums = logps.new_zeros(len(targets)).index_add(0, rows, logps)  # [2B]
        return sums, (targets != IGNORE_INDEX).sum(-1)
    # one row per pair: only positions from the first that predicts a response token
    width = batch["input_ids"].shape[1]
    start = int(batch["chosen_index"][:, 0].min())
    if head is None:
        states = model(**inputs, use_cache=False, logits_to_keep=width - start).logits
    else:
        states = last_hidden(model, **inputs, use_cache=False)[:, start:]  # [B, T - start, H]
    sums, counts = [], []
    for side in ("chosen", "rejected"):
        index = (batch[f"{side}_index"] - start).clamp(min=0)  # [B, n]; padding reads any
        picked = states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))
        mask = batch[f"{side}_mask"]  # [B, n]
        if head is None:  # picked: logits [B, n, V]
            logps = token_logps(picked, batch[f"{side}_ids"])
        else:  # picked: hidden states [B, n, H]
            logps, _ = linear_token_logps(picked, head.weight, batch[f"{side}_ids"])
        sums.append((logps * mask).sum(-1))
        counts.append(mask.sum(-1))
    return torch.cat(sums), torch.cat(counts)

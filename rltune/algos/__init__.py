"""Algorithms are plug-ins of the one trainer loop.

An algorithm is any object with the attributes and methods of `Algorithm` (a Protocol: no base
class). The trainer asks it for the micro-batches of one optimizer step, for the step's loss
normaliser, and for each micro-batch's `(loss, metrics)`; it does the rest (backward,
accumulation, clipping, optimizer, schedule, logging, eval, checkpoints) without knowing which
algorithm it runs.

The contract on numbers: `loss(batch, normaliser)` returns this micro-batch's share of the
step's loss, so summing over the step's micro-batches gives the step loss (e.g. token NLL summed
over the micro-batch divided by the loss tokens of the whole step). Metrics follow the same
rule: the trainer sums each metric over the step's micro-batches, so an algorithm scales a
per-micro-batch mean by its share of the step. The key `num_tokens` (tokens processed) feeds the
throughput metric.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rltune.config import BatchPlan, RLTuneConfig


@dataclass
class BuildContext:
    """What the trainer hands an algorithm when building it."""

    cfg: RLTuneConfig
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    plan: BatchPlan
    """The resolved batch arithmetic (examples per step, micro-batch, accumulation)."""
    rank: int = 0
    world_size: int = 1


class Algorithm(Protocol):
    trained: nn.Module
    """The model the optimizer trains: the policy, or the reward model for algo=rm."""
    tokenizer: Any
    """Its tokenizer (exported with final/)."""

    def default_lr(self) -> float:
        """Learning rate used when train.lr is null and model.lrs has none for this algorithm."""

    def extra_trained(self, lr: float) -> dict[str, tuple[nn.Module, float]]:
        """Models trained beside `trained`, by role, with their learning rate (PPO's value
        model; `lr` is the main model's); the trainer optimises, clips, checkpoints and exports
        them too."""

    def models(self) -> dict[str, nn.Module]:
        """Every model the pipeline holds, by role (policy, reference, ...), for the start log."""

    def examples_per_epoch(self) -> int | None:
        """Training examples in one pass over the data, counted as `train.batch_size` counts a
        step's (a rollout trained on for k steps counts k times), or None when batches are
        generated; it sets the number of steps of `train.epochs`."""

    def epoch(self) -> float:
        """Passes over the training data so far (the data position, fractional)."""

    def next_batches(self, num_micro: int, micro_batch_size: int) -> list[Any]:
        """The micro-batches of the next optimizer step (advances the data position)."""

    def report(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Metrics measured while preparing the last `next_batches` (rewards, generation time)
        and samples for the logger's table; ({}, []) for algorithms that read fixed data."""

    def normaliser(self, batches: list[Any]) -> float:
        """The step-level denominator handed to `loss` for each micro-batch of `batches`."""

    def loss(
        self, batch: Any, normaliser: float
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict[str, float]]:
        """This micro-batch's share of the step loss, and its metric contributions. An algorithm
        that trains models beside the policy returns one loss per role ({"policy": ...,
        "value": ...}); their sum is the step loss."""

    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Eval metrics (`eval/...`) and a few generated samples for the logger's table."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state needed for exact resume (data position, ...)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AlgorithmBase:
    """Defaults most algorithms share; each overrides what differs. The trained model is
    `self.policy`, the default lr comes from algo.lr / algo.lora_lr, nothing is trained beside
    it, and preparing batches measures nothing."""

    cfg: Any
    ctx: BuildContext

    @property
    def trained(self) -> nn.Module:
        return self.policy  # type: ignore[attr-defined]

    def default_lr(self) -> float:
        return self.cfg.lora_lr if self.ctx.cfg.peft.method in ("lora", "qlora") else self.cfg.lr

    def extra_trained(self, lr: float) -> dict[str, tuple[nn.Module, float]]:
        return {}

    def report(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        return {}, []

    def epoch(self) -> float:
        return self.stream.epochs_done  # type: ignore[attr-defined]

    def task_accuracy(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """eval/accuracy of greedy completions on the built-in task (`self.task`), and a few
        samples; nothing without a task or with train.eval_samples=0 (no fake 0.0)."""
        from rltune.evaluation import task_accuracy

        n = self.ctx.cfg.train.eval_samples
        if getattr(self, "task", None) is None or n == 0:
            return {}, []
        accuracy, samples = task_accuracy(
            self.policy,  # type: ignore[attr-defined]
            self.tokenizer,  # type: ignore[attr-defined]
            self.task,  # type: ignore[attr-defined]
            n=n,
            seed=self.ctx.cfg.data.seed,
            max_new_tokens=self.ctx.cfg.data.max_new_tokens,
        )
        return {"eval/accuracy": accuracy}, samples


ALGORITHMS = {
    "sft": "rltune.algos.sft:SFT",
    "dpo": "rltune.algos.dpo:DPO",
    "rm": "rltune.algos.rm:RewardModelTraining",
    "grpo": "rltune.algos.grpo:GRPO",
    "rloo": "rltune.algos.grpo:GRPO",  # GRPO with algo.estimator=rloo (conf/algo/rloo.yaml)
    "reinforce": "rltune.algos.grpo:GRPO",  # GRPO with algo.estimator=reinforce
    "ppo": "rltune.algos.ppo:PPO",
    "rs": "rltune.algos.rs:RejectionSampling",
}
"""Algorithm name -> import path of its class; each class takes (algo_cfg, ctx)."""


def build_algorithm(ctx: BuildContext) -> Algorithm:
    name = ctx.cfg.algo.name
    module_name, _, cls_name = ALGORITHMS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(ctx.cfg.algo, ctx)

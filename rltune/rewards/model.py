"""A trained reward model as a reward function: `reward.model_path`, e.g. an `algo=rm` output.

It scores prompt + completion rendered exactly as reward-model training rendered its pairs (the
chat template for message-list prompts, plain concatenation plus EOS for strings).
"""

from __future__ import annotations

from typing import Any

import torch

from rltune.config import ConfigError


class RewardModelScorer:
    def __init__(self, path: str, *, device: torch.device, dtype: torch.dtype, batch_size: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rltune.models import resolve_path

        folder = resolve_path(path, "reward.model_path")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"reward.model_path={path}: cannot load a reward model: {err}"
            ) from None
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"reward.model_path={path}: the model has {self.model.config.num_labels} outputs; "
                "a reward model has exactly 1 (train one with algo=rm)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the head scores each row's last token that is not the config's pad id: make it the
        # id the batches are padded with
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.path = path

    def check_prompt(self, prompt: Any, where: str) -> None:
        """Raise ConfigError naming reward.model_path when its tokenizer cannot render `prompt`
        (a message list without a chat template, ...): found at start, not at the first
        rollout's scoring."""
        try:
            self._encode(prompt, "")
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(
                f"reward.model_path={self.path}: cannot score a prompt of {where}: {err}"
            ) from None

    def _encode(self, prompt: Any, completion: str) -> list[int]:
        from rltune.data.sft import encode_sft

        response = (
            [{"role": "assistant", "content": completion}]
            if isinstance(prompt, list)
            else completion
        )
        example = encode_sft(
            {"prompt": prompt, "completion": response},
            "prompt_completion",
            self.tokenizer,
            max_length=1 << 30,
        )[0]
        return example["input_ids"]

    @torch.no_grad()
    def __call__(
        self, prompts: list[Any], completions: list[str], **columns: Any
    ) -> list[float | None]:
        from rltune.data.sft import collate_sft

        encoded = [
            {"input_ids": ids, "labels": ids}
            for ids in (self._encode(p, c) for p, c in zip(prompts, completions, strict=True))
        ]
        scores: list[float | None] = []
        for start in range(0, len(encoded), self.batch_size):
            batch = collate_sft(
                encoded[start : start + self.batch_size], self.tokenizer.pad_token_id
            )
            logits = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            ).logits  # [b, 1]
            scores.extend(logits.squeeze(-1).float().tolist())
        return scores

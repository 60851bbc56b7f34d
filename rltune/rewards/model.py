"""A trained reward model as a reward function: `reward.model_path`, e.g. an `algo=rm` output.

It scores prompt + completion rendered exactly as reward-model training rendered its pairs (the
chat template for message-list prompts, plain concatenation plus EOS for strings). Under
data.system_prompt it scores the conversation the policy had: the prompt opened with that system
turn, so a string prompt is the user's turn of a chat, as the policy read it.
"""

from __future__ import annotations

from typing import Any

import torch

from rltune.config import ConfigError
from rltune.data.formats import with_system_turn


class RewardModelScorer:
    def __init__(
        self,
        path: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        system_prompt: str | None = None,
    ):
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
        # data.system_prompt: the policy reads its prompts as chats under that system turn, and
        # an algo=rm model was trained on chats; scored as plain text, a string prompt would be
        # text it never saw. A tokenizer without a chat template was trained on plain text.
        self.system_prompt = system_prompt if self.tokenizer.chat_template else None

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

        if self.system_prompt is not None:
            prompt = with_system_turn(prompt, self.system_prompt)
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

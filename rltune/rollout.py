"""Generation with the policy: sampled rollouts for RL, greedy completions for evaluation.

The interface is narrow on purpose: token ids of already-templated prompts in, a `Rollout` out
(token ids, masks, whether each completion was truncated, and its text). The algorithms never call
`generate` themselves: `sample` here is the reference engine (`rollout.engine=hf`), and
`rltune.decode.fast_sample` the fast one behind the same contract.

Layout of a rollout of N = prompts x group_size rows (the samples of one prompt are adjacent):

    prompt_ids      [N, P]  left-padded (pad, pad, p0, p1, ...)
    completion_ids  [N, C]  right-padded; a completion ends with its EOS (or stop string) token
    completion_mask [N, C]  1 on the completion's own tokens, EOS included; 0 on padding

so `torch.cat([prompt_ids, completion_ids], 1)` is the sequence the policy is trained on, and
position ids come from the attention mask (`position_ids`), as `generate` assigned them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rltune.distributed import gathered


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    """0 disables min-p."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion (kept in it), besides the EOS token(s)."""


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C]
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens before EOS or a stop string
    completions: list[str]  # [N] text of each completion, special tokens removed

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [N, P + C]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # [N, P + C]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as `generate` numbers left-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]


def left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(ids [B, W], mask [B, W]) with each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation EOS
    (chat models often have both, e.g. <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return sorted(ids)


def completion_lengths(
    ids: torch.Tensor,
    tokenizer,
    ends: list[int],
    stop: tuple[str, ...],
    heads: list[list[int]] | None = None,
) -> tuple[list[int], list[bool]]:
    """Per row of generated `ids` [N, C]: the tokens that belong to the completion, through
    whichever comes first, the first EOS or the token that completes a stop string, and
    whether it was truncated (neither came). `heads` [N] are the prompts' last tokens: a stop
    string may start in the prompt's text and end in the completion (as `generate`'s stop
    criterion matches it), but never lie in the prompt alone."""
    lengths, truncated = [], []
    is_end = torch.isin(ids, torch.tensor(ends, device=ids.device))  # [N, C]
    for i, (row, row_end) in enumerate(zip(ids.tolist(), is_end.tolist(), strict=True)):
        length = row_end.index(True) + 1 if any(row_end) else None
        if stop:  # a stop string before the EOS (or where there is none) ends it sooner
            head = heads[i] if heads is not None else []
            cut = _stop_cut(row[: length or len(row)], tokenizer, stop, head)
            if cut is not None:
                length = cut
        truncated.append(length is None)
        lengths.append(length if length is not None else len(row))
    return lengths, truncated


def _stop_cut(row: list[int], tokenizer, stop: tuple[str, ...], head: list[int]) -> int | None:
    """The shortest prefix of `row` after which the text of `head + prefix` holds a stop string
    that ends past `head`'s text (binary search on decodes: holding one is monotone in the
    prefix length), or None."""
    head_text = tokenizer.decode(head, skip_special_tokens=True)

    def contains(k: int) -> bool:
        text = tokenizer.decode(head + row[:k], skip_special_tokens=True)
        return any(text.find(s, max(0, len(head_text) - len(s) + 1)) != -1 for s in stop)

    if not row or not contains(len(row)):
        return None
    lo, hi = 1, len(row)
    while lo < hi:
        mid = (lo + hi) // 2
        if contains(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


STOP_HEAD = 16
"""Prompt tokens kept before a completion when looking for stop strings that span the two."""


def finish(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generated: torch.Tensor,
    tokenizer,
    ends: list[int],
    stop: tuple[str, ...],
) -> Rollout:
    """A Rollout from generated ids [N, C]: where each completion ends, its mask (padding after
    the end set to pad), whether it was truncated, and its text."""
    pad, device = tokenizer.pad_token_id, generated.device
    heads = None
    if stop:
        tails = prompt_ids[:, -STOP_HEAD:].tolist()
        masks = prompt_mask[:, -STOP_HEAD:].tolist()
        heads = [
            [t for t, m in zip(ts, ms, strict=True) if m]
            for ts, ms in zip(tails, masks, strict=True)
        ]
    lengths, truncated = completion_lengths(generated, tokenizer, ends, stop, heads)
    arange = torch.arange(generated.shape[1], device=device)
    completion_mask = (arange < torch.tensor(lengths, device=device).unsqueeze(1)).long()
    completion_ids = generated.masked_fill(completion_mask == 0, pad)
    texts = tokenizer.batch_decode(
        [row[:n] for row, n in zip(completion_ids.tolist(), lengths, strict=True)],
        skip_special_tokens=True,
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=torch.tensor(truncated, device=device),
        completions=texts,
    )


@contextmanager
def bare_generation_config(model: nn.Module) -> Iterator[None]:
    """While generating, the model's own generation_config is a default one. `generate` fills
    every setting a passed GenerationConfig leaves unset from the model's, so a preset's
    repetition penalty, n-gram ban or filters would otherwise shape the tokens: sampling would
    leave the distribution the loss's log-probs assume, and "greedy" would not be greedy."""
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    saved = getattr(base, "generation_config", None)
    if saved is None:
        yield
        return
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # train.compile: see fast_sample
def sample(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    group_size: int = 1,
    batch_size: int = 256,
) -> Rollout:
    """`group_size` sampled completions of each prompt (token ids, already templated), generated
    `batch_size` rows at a time with `generate` (KV cache, left padding, early exit when every
    row has finished)."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ends = eos_ids(model, tokenizer)
    rows = [p for p in prompts for _ in range(group_size)]
    prompt_ids, prompt_mask = left_pad(rows, pad, device)  # [N, P]
    generated: list[torch.Tensor] = []
    # ZeRO-3: whole parameters on every rank while generating, so ranks whose completions end at
    # different lengths never wait on each other's per-layer gathers
    try:
        with gathered(model), bare_generation_config(model):
            for start in range(0, len(rows), batch_size):
                ids = prompt_ids[start : start + batch_size]
                mask = prompt_mask[start : start + batch_size]
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=GenerationConfig(
                        do_sample=True,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k,
                        min_p=params.min_p or None,
                        max_new_tokens=params.max_new_tokens,
                        stop_strings=list(params.stop) or None,
                        eos_token_id=ends,
                        pad_token_id=pad,
                    ),
                    tokenizer=tokenizer if params.stop else None,
                    use_cache=True,
                )  # [b, P + c]
                generated.append(out[:, ids.shape[1] :])
    finally:
        model.train(was_training)
    completion_ids = cat_padded(generated, pad)  # [N, C]
    return finish(prompt_ids, prompt_mask, completion_ids, tokenizer, ends, params.stop)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # train.compile: see fast_sample
def greedy_rollout(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop: tuple[str, ...] = (),
    batch_size: int = 64,
) -> Rollout:
    """Greedy completions of already-templated prompts (token ids) with `generate`, ended like
    sampled ones (EOS or a stop string): what evaluation scores."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ends = eos_ids(model, tokenizer)
    prompt_ids, prompt_mask = left_pad(prompts, pad, device)  # [N, P]
    generated: list[torch.Tensor] = []
    try:
        with gathered(model), bare_generation_config(model):  # ZeRO-3: see sample()
            for start in range(0, len(prompts), batch_size):
                ids = prompt_ids[start : start + batch_size]
                out = model.generate(
                    input_ids=ids,
                    attention_mask=prompt_mask[start : start + batch_size],
                    generation_config=GenerationConfig(
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=ends,
                        pad_token_id=pad,
                        stop_strings=list(stop) or None,
                    ),
                    tokenizer=tokenizer if stop else None,
                    use_cache=True,
                )  # [b, P + c]
                generated.append(out[:, ids.shape[1] :])
    finally:
        model.train(was_training)
    return finish(prompt_ids, prompt_mask, cat_padded(generated, pad), tokenizer, ends, stop)


def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: list[str] | list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions (text, special tokens removed) of already-templated prompts, given as
    text or as token ids."""
    ids = [
        p if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    return greedy_rollout(
        model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size
    ).completions


# ----------------------------------------------------------------------------- merging


def cat_padded(parts: list[torch.Tensor], value, *, left: bool = False) -> torch.Tensor:
    """Concatenate [b_i, T_i] tensors along rows, padding each to the widest with `value`."""
    width = max(p.shape[1] for p in parts)
    pads = [(width - p.shape[1], 0) if left else (0, width - p.shape[1]) for p in parts]
    return torch.cat(
        [torch.nn.functional.pad(p, pad, value=value) for p, pad in zip(parts, pads, strict=True)]
    )


def first_rows(rollout: Rollout, n: int) -> Rollout:
    """The rollout of its first `n` rows."""
    return Rollout(
        prompt_ids=rollout.prompt_ids[:n],
        prompt_mask=rollout.prompt_mask[:n],
        completion_ids=rollout.completion_ids[:n],
        completion_mask=rollout.completion_mask[:n],
        truncated=rollout.truncated[:n],
        completions=rollout.completions[:n],
    )


def merge_rollouts(parts: list[Rollout], pad: int) -> Rollout:
    """One rollout from several (prompts re-padded on the left, completions on the right)."""
    return Rollout(
        prompt_ids=cat_padded([r.prompt_ids for r in parts], pad, left=True),
        prompt_mask=cat_padded([r.prompt_mask for r in parts], 0, left=True),
        completion_ids=cat_padded([r.completion_ids for r in parts], pad),
        completion_mask=cat_padded([r.completion_mask for r in parts], 0),
        truncated=torch.cat([r.truncated for r in parts]),
        completions=[c for r in parts for c in r.completions],
    )

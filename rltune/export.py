"""The trained model written out as a Hugging Face folder that `from_pretrained` loads (the
run's `final/`): LoRA adapters saved as trained and merged into the weights, in the export dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from rltune.lora import is_peft

log = logging.getLogger(__name__)


def export_final(
    model: nn.Module,
    tokenizer,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    *,
    in_place: bool = False,
) -> None:
    """Write a Hugging Face folder that `from_pretrained` loads, its weights in `dtype` (None:
    as they are). With LoRA the adapter goes to `out_dir/adapter/` as trained (fp32) and the
    model merged from it to `out_dir/` itself, while `model` keeps its adapters and dtype,
    unless `in_place` (training is over: the merge needs no second copy of the base, which at
    the end of a long run may not fit on the GPU); without LoRA, `model` itself is cast to
    `dtype`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model) and getattr(model, "is_loaded_in_4bit", False):
        # a 4-bit base cannot be merged without losing the adapter's precision: adapter only
        model.save_pretrained(out_dir / "adapter")
        log.warning("peft=qlora: final/adapter/ holds the adapter; merge it into the bf16 base")
    elif is_peft(model):
        model.save_pretrained(out_dir / "adapter")
        # Merge into a copy so the in-memory policy keeps its adapters (callers may go on).
        import copy

        merged = model if in_place else copy.deepcopy(model)
        dtypes = {p.dtype for p in merged.parameters() if p.is_floating_point()}
        if dtype is not None and not dtypes <= {torch.float32, dtype}:
            # peft adds the fp32 update into the base weights in place, so the sum is rounded
            # once, to the base's dtype: right when that is fp32 or the export dtype, a second
            # rounding otherwise (an fp16 base exported in bf16)
            merged.float()
        _save_model(merged.merge_and_unload(), out_dir, dtype)
    else:
        _save_model(model, out_dir, dtype)
    tokenizer.save_pretrained(out_dir)


def _save_model(model: nn.Module, out_dir: Path, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        model.to(dtype)
    # gradient checkpointing turns the KV cache off for training; whoever loads final/ decodes
    cache_off = getattr(model.config, "use_cache", None) is False
    if cache_off:
        model.config.use_cache = True
    try:
        model.save_pretrained(out_dir)
    finally:
        if cache_off:
            model.config.use_cache = False

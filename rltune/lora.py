"""LoRA adapters (peft=lora, peft=qlora): which layers they go on, checked against the model
before peft wraps it, and the wrapping itself. The models they adapt, QLoRA's 4-bit base among
them, are loaded in `rltune.models`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from rltune.config import ConfigError, PeftConfig

ALL_LINEAR = "all-linear"
PLAIN_NAME = re.compile(r"\w+(\.\w+)*")
"""A module name or dotted name suffix (`q_proj`, `self_attn.o_proj`); any other string in
peft.target_modules is a regular expression that peft matches against whole module names."""


def lora_targets(value: Any) -> str | list[str]:
    """peft.target_modules as peft takes it: `all-linear`, a regular expression, or a list of
    names. A plain name on its own is a one-item list: peft would read it as a regular
    expression that must match a whole module name (`model.layers.0.self_attn.q_proj`), which a
    bare `q_proj` never does."""
    key = "peft.target_modules"
    if isinstance(value, str):
        if value == ALL_LINEAR:
            return value
        if PLAIN_NAME.fullmatch(value):
            return [value]
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{key}={value!r} is not a regular expression: {err}") from None
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            f"{key}={value!r} must be {ALL_LINEAR}, a list of module names or a regular expression"
        )
    bad = [v for v in value if not isinstance(v, str) or not PLAIN_NAME.fullmatch(v)]
    if bad:
        raise ConfigError(f"{key}: {bad[0]!r} is not a module name (like q_proj or mlp.up_proj)")
    return list(value)


def _layer_kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(linear layers, every layer that LoRA adapts)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    linear = (nn.Linear, Conv1D)
    return linear, (*linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_lora_targets(model: nn.Module, targets: str | list[str]) -> None:
    """Before peft wraps `model`: every name in `targets` (from `lora_targets`) is a layer of
    `model` that LoRA can adapt (peft would fail with its own traceback on a name that matches
    nothing, or silently skip it when another name matches), and none is the output layer or
    input embedding of a model that ties the two: merging the adapter into final/ would write
    its update into the one shared matrix, so it would reach the other end too."""
    if targets == ALL_LINEAR:
        return  # peft leaves the output layer out of all-linear
    key = "peft.target_modules"
    linear_kinds, adaptable = _layer_kinds()
    modules = {n: m for n, m in model.named_modules() if n}  # not the model itself
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    ties = output is not None and embedding is not None and output.weight is embedding.weight
    tied = {n: m for n, m in modules.items() if ties and (m is output or m is embedding)}
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, linear_kinds)}
        - {n.rsplit(".", 1)[-1] for n in tied}
    )
    if isinstance(targets, str):
        groups = {targets: [n for n in modules if re.fullmatch(targets, n)]}
    else:
        groups = {t: [n for n in modules if n == t or n.endswith("." + t)] for t in targets}
    for target, names in groups.items():
        if not names:
            raise ConfigError(
                f"{key}: {target!r} matches no module of {type(model).__name__}; its linear "
                f"layers: {', '.join(linear)} (or {ALL_LINEAR})"
            )
        other = next((n for n in names if not isinstance(modules[n], adaptable)), None)
        if other is not None:
            raise ConfigError(
                f"{key}: {target!r} matches {other}, a {type(modules[other]).__name__}, which "
                f"LoRA cannot adapt; its linear layers: {', '.join(linear)} (or {ALL_LINEAR})"
            )
        hit = next((n for n in names if n in tied), None)
        if hit is not None:
            partner = next(n for n, m in tied.items() if m is not tied[hit])
            raise ConfigError(
                f"{key}: {target!r} puts an adapter on {hit}, whose weight {type(model).__name__} "
                f"shares with {partner} (tie_word_embeddings): merged into final/, its update "
                f"would change both. Leave {hit} out ({ALL_LINEAR} does), or train from a copy "
                "of the model saved with tie_word_embeddings=false"
            )


def apply_lora(model: nn.Module, cfg: PeftConfig, *, task_type: str = "CAUSAL_LM") -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(cfg.target_modules)
    check_lora_targets(model, targets)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type=task_type,  # SEQ_CLS also trains (and saves) the new score head in full
    )
    return get_peft_model(model, lora)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")

"""A causal LM split at its output layer, for the losses from the last hidden states
(algo.fused_ce, algo.fused_logps; `rltune.logps` computes them): the decoder stack on its own
(`last_hidden`, and `compile_stack` for train.compile), and the output layer where it is a plain
`nn.Linear` that gives the model's own logits (`plain_output_layer`, looked up per model by
`HiddenStateHead`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rltune.models import OWN_RECOMPILES

log = logging.getLogger(__name__)


NO_LOGITS = torch.zeros(0, dtype=torch.long)
"""`logits_to_keep` that keeps no position: the forward pass stops before the output layer."""


def last_hidden(model: nn.Module, **inputs) -> torch.Tensor:
    """The final (normed) hidden states [B, T, H] of a causal LM, without computing logits:
    from its decoder stack (`get_decoder()`, through PEFT's wrappers too), or else from the
    whole model with `output_hidden_states` (which also keeps every layer's output until it
    returns) and no position kept for logits. `plain_output_layer` checks the result."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        return decoder(**inputs).last_hidden_state
    device = inputs["input_ids"].device
    out = model(**inputs, output_hidden_states=True, logits_to_keep=NO_LOGITS.to(device))
    return out.hidden_states[-1]


def compile_stack(model: nn.Module, **options) -> nn.Module:
    """train.compile: `torch.compile` in place (parameter names unchanged) the part of `model`
    that every loss runs: its decoder stack where it has one, since the losses from hidden
    states (algo.fused_ce, algo.fused_logps) call that stack directly, past the model's own
    forward, which compiling the whole model would leave eager. Else the whole model. The
    output layer stays eager: a matmul gains nothing from fusion. Returns what was compiled."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    target = decoder if isinstance(decoder, nn.Module) and decoder is not model else model
    target.compile(**{**OWN_RECOMPILES, **options})  # each model its own recompile budget
    return target


@torch.compiler.set_stance("force_eager")  # a one-off check of 8 tokens: nothing to compile
def plain_output_layer(model: nn.Module) -> nn.Linear | None:
    """The output layer of `model` when logits are exactly `layer(last_hidden(...))`: a
    bias-free, whole (not ZeRO-3-partitioned, not LoRA-wrapped) `nn.Linear`, checked on a few
    tokens against the model's own logits (architectures that scale or cap logits fail it).
    None otherwise."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id"):
        return None  # ZeRO-3 parameters (ds_id) are whole only inside their module's call
    device = head.weight.device
    ids = torch.arange(3, 11, device=device)[None] % head.weight.shape[0]  # [1, 8]
    was_training = model.training
    model.eval()  # no dropout between the two passes
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            try:
                mine = head(last_hidden(model, input_ids=ids, use_cache=False)).float()
            except Exception as e:  # a decoder stack that cannot run alone: the logits path
                log.debug("last_hidden failed on %s: %r", type(model).__name__, e)
                return None
    finally:
        model.train(was_training)
    return head if torch.allclose(mine, logits, atol=1e-3, rtol=1e-3) else None


class HiddenStateHead:
    """A flag's choice (algo.fused_ce, algo.fused_logps) between losses from the last hidden
    states and losses from logits, made per model at its first use: after DeepSpeed has wrapped
    (and under ZeRO-3 partitioned) it, which is when `plain_output_layer` can tell. Logged once
    per model, as `what: from hidden states ...` or `what: from logits: ...`."""

    def __init__(self, flag: str, enabled: bool):
        self.flag, self.enabled = flag, enabled
        self._heads: dict[int, nn.Linear | None] = {}

    def __call__(self, model: nn.Module, what: str) -> nn.Linear | None:
        """`model`'s plain output layer when the flag is on and it qualifies, else None."""
        if not self.enabled:
            return None
        known = self._heads.get(id(model), False)
        if known is False or (known is not None and hasattr(known.weight, "ds_id")):
            # not seen yet, or ZeRO-3 has partitioned it since (DPO's precompute_ref runs first)
            device = next(model.parameters()).device
            with torch.autocast(device.type, enabled=False):
                head = plain_output_layer(model)
            self._heads[id(model)] = head
            log.info(
                "%s: %s",
                what,
                f"from hidden states, no logits ({self.flag})"
                if head is not None
                else f"from logits: {self.flag} needs a plain, whole output layer that gives "
                "the model's own logits",
            )
        return self._heads[id(model)]

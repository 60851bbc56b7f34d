"""The fast rollout engine (`rollout.engine=fast`): rltune's own decode loop behind the contract
of `rltune.rollout.sample` (and, with `greedy`, of `greedy_rollout`, for evaluation).

Each prompt is prefilled once and its KV cache shared by its `group_size` samples, tokens are
drawn on the device, and the loop stops once every row has ended. Two decoders, in
`rltune.decoders`, run the steps:

- `DynamicDecoder`: transformers' `DynamicCache`, one eager forward per token. Used on CPU, under
  ZeRO-3 (whose parameters are gathered per call) and with `rollout.cuda_graphs=false`.
- `StaticDecoder`: a KV cache of fixed shape [rows, heads, prompt width + max_new_tokens, dim], so
  every decode step has the same shapes and addresses. On CUDA the whole step (every layer) is
  captured once in a CUDA graph and replayed per token: one launch instead of ~40 per layer. The
  graph reads the trained weights themselves where they are in the compute dtype, else a copy
  in that dtype refreshed in place before each rollout (`_Replica`), so one capture serves
  every later rollout of the same shape. The replica keeps a decoder per row count, so
  training's rollouts and evaluation's (another row count) each keep theirs.

With `rollout.compile`, the static decoder's step is compiled by torch.compile (inductor fuses
the elementwise work between the matmuls) and the compiled step is what the graph captures; the
draw from its logits is compiled too. Each decoder compiles its own (`decoders._compile`).

Between steps the host only enqueues work: the early-exit test (`finished.all()`, a sync) runs
every `SYNC_EVERY` tokens on CUDA.
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from contextlib import nullcontext

import torch
from torch import nn

from rltune.decoders import DynamicDecoder, StaticDecoder, compiled_draws
from rltune.distributed import gathered
from rltune.prefix import full_attention_only
from rltune.rollout import (
    Rollout,
    SamplingParams,
    cat_padded,
    eos_ids,
    finish,
    first_rows,
    left_pad,
    merge_rollouts,
)

SYNC_EVERY = 16
"""Decode steps between early-exit checks on CUDA (each check waits for the GPU)."""
WIDTH_STEP = 32
"""Prompt widths are left-padded up to a multiple of this, so rollouts whose longest prompt
differs by a few tokens reuse one captured graph."""
MAX_DECODERS = 2
"""Static decoders a policy's replica keeps, one per row count: training's rollouts and
evaluation's. Each holds a KV cache of rows x (prompt width + max_new_tokens) positions and, on
CUDA, a captured graph with its memory pool, so the bound is also one on memory."""


class _Replica:
    """The policy as the graph reads it: tensors that never move, in the compute dtype.

    Where the trained weights are already in that dtype (`model.dtype=bf16`), the graph reads
    them: the optimizer updates them in place, and `refresh` checks that none has moved (a
    moved one means a new capture). Otherwise (fp32 master weights under autocast, which would
    be cast anew into temporary tensors that a graph cannot hold on to) the graph reads a copy
    (`_graph_copy`) whose weights in another dtype are copies in the compute dtype, refreshed in
    place from the trained weights before each rollout; the frozen ones already in that dtype (a
    LoRA base) are the policy's own. It keeps a `StaticDecoder` per row count, the
    `MAX_DECODERS` last used (`decoder_for`)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        floating = [p for p in model.parameters() if p.is_floating_point()]
        self.shared = all(p.dtype == dtype for p in floating)
        if self.shared:  # a proxy: the entry in _REPLICAS must not keep its key alive
            self.model = weakref.proxy(model)
            self.pairs = []
        else:
            self.model = _graph_copy(model, dtype)
            self.pairs = [
                (r, p)
                for r, p in zip(self.model.parameters(), model.parameters(), strict=True)
                if r is not p
            ]
        # what the decoders run: the module itself (dynamo cannot trace a call through a proxy)
        self.module = weakref.ref(model if self.shared else self.model)
        self.dtype = dtype
        self.pointers = self._pointers()
        self.decoders: dict[int, StaticDecoder] = {}  # by row count, the last used last

    def _pointers(self) -> list[int]:
        return [p.data_ptr() for p in self.model.parameters()]

    def refresh(self) -> None:
        if self.pairs:
            with torch.no_grad():
                torch._foreach_copy_([r for r, _ in self.pairs], [p for _, p in self.pairs])
        pointers = self._pointers()
        if pointers != self.pointers:  # a weight the graph reads was replaced, not updated
            traced = any(d.compiled for d in self.decoders.values())
            self.decoders, self.pointers = {}, pointers
            if traced:  # as in `decoder_for`
                gc.collect()

    def decoder_for(self, rows: int, width: int, room: int, compile: bool) -> StaticDecoder:
        """A decoder for `rows` rows of prompts up to `width` wide and `room` new tokens.

        One is kept per row count, so evaluation's greedy rollouts (eval prompts x 1 rows)
        neither evict training's (prompts x group_size) nor capture and compile a decoder of
        their own anew at every eval. A kept decoder is reused where it fits (narrower prompts
        are left-padded to its width), so prompt widths that vary from rollout to rollout
        capture and compile once, at the widest; a wider one replaces it. Past `MAX_DECODERS`
        row counts, the least recently used decoder is dropped."""
        d = self.decoders.pop(rows, None)
        if (
            d is not None
            and d.compiled == compile
            and d.width >= width
            and d.length - d.width >= room
        ):
            self.decoders[rows] = d  # now the last used
            return d
        if d is not None:
            width, room = max(width, d.width), max(room, d.length - d.width)
        # free the replaced cache and graph, and the oldest past the bound, before the new one
        traced = d is not None and d.compiled
        d = None
        while len(self.decoders) >= MAX_DECODERS:
            traced |= self.decoders.pop(next(iter(self.decoders))).compiled
        if traced:  # dynamo's tracing of a compiled step left cycles that still hold its cache
            gc.collect()
        cuda = next(self.model.parameters()).is_cuda
        self.decoders[rows] = StaticDecoder(
            self.module(), rows, width, width + room, capture=cuda, compile=compile
        )
        return self.decoders[rows]


def _graph_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` in `dtype`, in eval mode and frozen, for the graph decoder. What a cast would
    leave as it is, it shares with `model` instead of copying: frozen parameters (a LoRA base:
    the bulk of the model, 14 GiB of a 7B model in bf16, which a full copy would also refresh
    before every rollout) and buffers, where they are in `dtype` already or not floating-point.
    Only the rest is copied and cast: the trained weights (LoRA's fp32 adapters).

    Rotary embeddings keep their buffers as they are (fp32 `inv_freq`, as transformers loads
    them even for a bf16 model): they compute their angles in fp32 and return cos and sin in
    the activations' dtype, and autocast's training forward uses the fp32 frequencies. Cast to
    bf16 (as `nn.Module.to` would), the frequencies are off by up to 2^-9, so the angle at
    position p by up to p x 2^-9 rad: the sampled distribution drifts from the trained one
    along the completion (tiny model, 400 new tokens, against autocast's log-probs: mean error
    0.012 rather than 0.007 past token 150, largest 1.66 rather than 0.40)."""
    keep = [p for p in model.parameters() if not p.requires_grad and _as_is(p, dtype)]
    keep += [b for b in model.buffers() if _as_is(b, dtype)]
    keep += [
        b
        for m in model.modules()
        if type(m).__name__.endswith("RotaryEmbedding")
        for b in m.buffers(recurse=False)
    ]
    replica = copy.deepcopy(model, {id(t): t for t in keep})
    shared = {id(t) for t in keep}
    with torch.no_grad():
        for param in replica.parameters():
            if id(param) not in shared:
                param.data = param.data.to(dtype)
        for module in replica.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and id(buffer) not in shared:
                    module._buffers[name] = buffer.to(dtype)
    return replica.eval().requires_grad_(False)


def _as_is(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether casting `tensor` to `dtype` (as `nn.Module.to` does) leaves it unchanged."""
    return tensor.dtype == dtype or not tensor.is_floating_point()


_REPLICAS: weakref.WeakKeyDictionary[nn.Module, _Replica] = weakref.WeakKeyDictionary()


def _replica(model: nn.Module, dtype: torch.dtype) -> _Replica:
    replica = _REPLICAS.get(model)
    if replica is None or replica.dtype != dtype:
        replica = _REPLICAS[model] = _Replica(model, dtype)
    replica.refresh()
    return replica


def is_partitioned(model: nn.Module) -> bool:
    """ZeRO-3: parameters are gathered per call, so no fixed addresses to capture."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


# ----------------------------------------------------------------------------- sampling


def static_cache_fits(model: nn.Module) -> bool:
    """Whether `StaticDecoder` can run `model`: its parameters are whole (not ZeRO-3 shards)
    and every layer attends in full (the static cache and its 4-D mask assume that; a
    sliding-window layer would see too far back)."""
    return not is_partitioned(model) and full_attention_only(model)


def auto_decoder(model: nn.Module, compile: bool = False) -> str:
    """`graph` where `static_cache_fits`, on CUDA or to be compiled; else `dynamic`."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return "graph" if (on_cuda or compile) and static_cache_fits(model) else "dynamic"


@torch.no_grad()
# train.compile compiles for the training shapes; decoding changes shape every token, so it runs
# the models uncompiled, except for the step that rollout.compile compiles for its fixed shapes
@torch.compiler.set_stance("force_eager")
def fast_sample(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    group_size: int = 1,
    batch_size: int = 256,
    greedy: bool = False,
    decoder: str = "auto",
    dtype: torch.dtype | None = None,
    compile: bool = False,
) -> tuple[Rollout, torch.Tensor]:
    """`group_size` completions of each prompt, `batch_size` rows (whole groups) at a time; also
    returns the sampled tokens' log-probs [N, C] under softmax(logits / temperature), the
    distribution the loss uses.

    `decoder`: auto (`auto_decoder`: graph on CUDA or with `compile` for most models, else
    dynamic), graph (the replica and its `StaticDecoder` for this many rows, reused; captured
    on CUDA only), static (a fresh `StaticDecoder` on the model itself, never captured, and
    compiled anew each call), or dynamic. `dtype`: the compute dtype for the graph (default:
    the parameters' own). `compile` (`rollout.compile`): the static decoders' step is compiled
    by torch.compile, which fuses the norms, rotary embeddings and activations that otherwise
    run as separate kernels, before it is captured; each decoder compiles once (tens of seconds
    on a GPU), and the dynamic decoder ignores it. `greedy`: the most likely token at each step,
    as `generate` without sampling (evaluation); the log-probs are still under the
    temperature."""
    if decoder == "auto":
        decoder = auto_decoder(model, compile)
    # calls of equal size where the prompts divide evenly (12 rows in calls of at most 8: 6 + 6,
    # not 8 + 4), so one static decoder, captured and compiled once, serves them all
    calls = math.ceil(len(prompts) / max(1, batch_size // group_size))
    per_call = math.ceil(len(prompts) / calls)
    parts = []
    for s in range(0, len(prompts), per_call):
        chunk = prompts[s : s + per_call]
        # where they do not (5 prompts in calls of at most 4: 3 + 2), the graph's short last call
        # is filled up with copies of a prompt and their completions dropped, so the decoder
        # made for the others serves it too
        fill = per_call - len(chunk) if decoder == "graph" else 0
        rollout, logps = _fast_sample(
            model,
            tokenizer,
            chunk + [chunk[0]] * fill,
            params,
            group_size=group_size,
            greedy=greedy,
            decoder=decoder,
            dtype=dtype,
            compile=compile,
        )
        if fill:
            kept = len(chunk) * group_size
            rollout, logps = first_rows(rollout, kept), logps[:kept]
        parts.append((rollout, logps))
    if len(parts) == 1:
        return parts[0]
    pad = tokenizer.pad_token_id
    return merge_rollouts([r for r, _ in parts], pad), cat_padded([lp for _, lp in parts], 0.0)


def _fast_sample(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    group_size: int,
    greedy: bool,
    decoder: str,
    dtype: torch.dtype | None,
    compile: bool,
) -> tuple[Rollout, torch.Tensor]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ends = torch.tensor(eos_ids(model, tokenizer), device=device)
    prompt_ids, prompt_mask = left_pad(prompts, pad, device)  # [n, P], one row per prompt
    rows, new = len(prompts) * group_size, params.max_new_tokens
    try:
        with gathered(model):
            if decoder == "dynamic":
                dec, ids, mask = DynamicDecoder(model), prompt_ids, prompt_mask
            else:
                width = math.ceil(prompt_ids.shape[1] / WIDTH_STEP) * WIDTH_STEP
                # a cache length that is a multiple of 8 keeps SDPA on its fused kernels
                room = math.ceil(new / 8) * 8
                if decoder == "graph":
                    replica = _replica(model, dtype or next(model.parameters()).dtype)
                    dec = replica.decoder_for(rows, width, room, compile)
                else:
                    dec = StaticDecoder(
                        model, rows, width, width + room, capture=False, compile=compile
                    )
                ids = nn.functional.pad(prompt_ids, (dec.width - prompt_ids.shape[1], 0), value=pad)
                mask = nn.functional.pad(prompt_mask, (dec.width - prompt_mask.shape[1], 0))
            # the graph's replica already computes in its dtype: autocast would only add casts
            no_autocast = torch.autocast(device.type, enabled=False)
            with no_autocast if decoder == "graph" else nullcontext():
                tokens, logps = _decode(dec, ids, mask, group_size, params, greedy, ends, pad)
    finally:
        model.train(was_training)
    rollout = finish(
        prompt_ids.repeat_interleave(group_size, 0),
        prompt_mask.repeat_interleave(group_size, 0),
        tokens,
        tokenizer,
        ends.tolist(),
        params.stop,
    )
    return rollout, logps * rollout.completion_mask


def _decode(dec, prompt_ids, prompt_mask, group_size, params, greedy, ends, pad):
    """The decode loop shared by every decoder: (tokens [N, C], log-probs [N, C])."""
    logits = dec.prefill(prompt_ids, prompt_mask, group_size)
    check_every = SYNC_EVERY if prompt_ids.device.type == "cuda" else 1
    finished = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    tokens, logps = [], []
    for step in range(params.max_new_tokens):
        with compiled_draws(dec.compiled):  # rollout.compile: the draw's passes fused too
            token, logp = dec.draw(logits, params, greedy)
        token = token.masked_fill(finished, pad)
        tokens.append(token)
        logps.append(logp)
        finished |= torch.isin(token, ends)
        last = step == params.max_new_tokens - 1
        if last or ((step + 1) % check_every == 0 and bool(finished.all())):
            break
        logits = dec.step(token)
    return torch.stack(tokens, 1), torch.stack(logps, 1)

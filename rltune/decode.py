"""The fast rollout engine (`rollout.engine=fast`): rltune's own decode loop behind the contract
of `rltune.rollout.sample` (and, with `greedy`, of `greedy_rollout`, for evaluation).

Each prompt is prefilled once and its KV cache shared by its `group_size` samples, tokens are
drawn on the device, and the loop stops once every row has ended. Two decoders run the steps:

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
draw from its logits is compiled too. Each decoder compiles its own (`_compile`).

Between steps the host only enqueues work: the early-exit test (`finished.all()`, a sync) runs
every `SYNC_EVERY` tokens on CUDA.
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from rltune.distributed import gathered
from rltune.models import OWN_RECOMPILES
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
    position_ids,
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


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Top-k, top-p and min-p as -inf masks on fp32 logits [B, V] (already divided by the
    temperature; log-probs do as well, as every filter is unchanged by a shift per row)."""
    x = logits
    if params.top_k > 0:
        kth = x.topk(min(params.top_k, x.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        cumulative = sorted_x.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_x.softmax(-1) > params.top_p  # keep the token that crosses p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return x


def draw(
    logits: torch.Tensor, params: SamplingParams, greedy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], its log-prob [B] under softmax(logits / temperature)) from logits [B, V].

    One fp32 copy of the logits and one log-softmax serve both the token and its log-prob, and
    the token is drawn by an exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i
    is i with probability p_i (as torch.multinomial draws one sample), here in log space as
    argmax_i (log p_i - log E_i) over the filtered log-probs. No pass renormalises them, and
    nothing waits for the device."""
    scaled = logits.float()
    if params.temperature != 1.0:
        scaled = scaled / params.temperature
    logp = scaled.log_softmax(-1)  # [B, V]
    if greedy:
        token = scaled.argmax(-1)  # generate's argmax: near-ties as in the raw logits
    else:
        filtering = params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
        race = filter_logits(logp, params) if filtering else logp
        # E = 0 would win whatever its token's probability: clamp it to the smallest normal
        noise = torch.empty_like(race).exponential_().clamp_min_(torch.finfo(race.dtype).tiny)
        token = (race - noise.log_()).argmax(-1)
    return token, logp.gather(-1, token[:, None])[:, 0]


def _compile(fn):
    """`fn` compiled for one static decoder, at its fixed shapes (rollout.compile), with a
    recompile budget of its own (`OWN_RECOMPILES`): every decoder runs the same code, and a run
    whose prompts grow wider makes a new decoder per `WIDTH_STEP`, so on a shared budget the
    ninth would decode uncompiled for the rest of the run. Dynamo keeps a replaced decoder's
    compiled code (not its cache) until `torch._dynamo.reset`; its `accumulated_recompile_limit`
    (256 compiles of one code object, all budgets together) still holds."""
    return torch.compile(fn, dynamic=False, **OWN_RECOMPILES)


# ----------------------------------------------------------------------------- decoders


@contextmanager
def _quiet():
    # `past_key_values` is being renamed `cache` in transformers 5.2x; both still work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _compiled(compiled: bool):
    """Lifts `fast_sample`'s force-eager stance for what `rollout.compile` compiled: the static
    decoder's step and the draw."""
    return torch.compiler.set_stance("default") if compiled else nullcontext()


class DynamicDecoder:
    """Eager steps on a `DynamicCache` that grows by one position per token."""

    compiled = False  # its shapes change every step: rollout.compile leaves it eager
    draw = staticmethod(draw)

    def __init__(self, model: nn.Module):
        self.model = model

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
        """Logits [n * group_size, V] after the prompts ids [n, P] (left-padded, `mask`)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        with _quiet():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids(mask),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if group_size > 1:  # the prompt's cache, shared by its samples
            self.cache.batch_repeat_interleave(group_size)
        self.mask = mask.repeat_interleave(group_size, 0)  # [N, P]
        self.next_pos = self.mask.sum(-1, keepdim=True)  # [N, 1]
        return out.logits[:, -1].repeat_interleave(group_size, 0)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] after appending `token` [N]."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        with _quiet():
            logits = self.model(
                input_ids=token[:, None],
                attention_mask=self.mask,
                position_ids=self.next_pos,
                past_key_values=self.cache,
                use_cache=True,
            ).logits[:, -1]
        self.next_pos = self.next_pos + 1
        return logits


class StaticDecoder:
    """Steps of fixed shape on a `StaticCache` of `rows` x `length` positions; with `capture`
    (CUDA), each step is one replay of a CUDA graph.

    The attention mask is a 4-D boolean [rows, 1, 1, length] buffer that transformers passes to
    attention as is: the prompt's real tokens, then each generated position as it is written.
    Positions past the current one hold stale or zero keys and stay masked."""

    def __init__(
        self,
        model: nn.Module,
        rows: int,
        width: int,
        length: int,
        *,
        capture: bool,
        compile: bool = False,
    ) -> None:
        from transformers import StaticCache

        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        text = model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # weak: a replica's decoder must not keep the policy (its key in _REPLICAS) alive
        self.model = weakref.ref(model)
        self.rows, self.width, self.length = rows, width, length
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.cache.early_initialization(
            batch_size=rows,
            num_heads=text.num_key_value_heads,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
        )
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device=device)
        self.capture, self.compiled = capture, compile
        # the fused step, compiled once for this decoder's shapes; and the draw from its logits,
        # once per sampling setting: the log-softmax, the race and the gather in a few fused
        # kernels rather than one pass over [rows, vocabulary] each
        # (the function, not a bound method: that would make a cycle that keeps a replaced
        # decoder's cache and graph until the garbage collector runs)
        self._step = _compile(StaticDecoder._forward) if compile else StaticDecoder._forward
        self.draw = _compile(draw) if compile else draw
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
        """As `DynamicDecoder.prefill`; `ids` [n, width] with n * group_size == rows. The prompts
        run once through a dynamic cache whose keys and values are then copied, repeated per
        sample, into the static one."""
        from transformers import DynamicCache

        assert ids.shape == (self.rows // group_size, self.width), (ids.shape, self.rows)
        model = self.model()
        dynamic = DynamicCache(config=model.config)
        with _quiet():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids(mask),
                past_key_values=dynamic,
                use_cache=True,
                logits_to_keep=1,
            )
        for static, layer in zip(self.cache.layers, dynamic.layers, strict=True):
            static.keys[:, :, : self.width].copy_(layer.keys.repeat_interleave(group_size, 0))
            static.values[:, :, : self.width].copy_(layer.values.repeat_interleave(group_size, 0))
            static.cumulative_length.fill_(self.width)
        rows_mask = mask.repeat_interleave(group_size, 0).bool()  # [N, width]
        self.mask.zero_()
        self.mask[:, 0, 0, : self.width] = rows_mask
        self.pos.copy_(rows_mask.sum(-1, keepdim=True))
        self.t = self.width  # the cache position the next token is written to
        return out.logits[:, -1].repeat_interleave(group_size, 0)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [rows, V] after appending `token` [rows]; the view is overwritten by the next
        step (copy it to keep it)."""
        self.ids.copy_(token[:, None])
        self.mask[:, 0, 0, self.t] = True
        if not self.capture:
            with _quiet(), _compiled(self.compiled):
                logits = self._step(self, self.model())
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.pos += 1
        self.t += 1
        return logits

    def _forward(self, model: nn.Module) -> torch.Tensor:
        # `_quiet` is the caller's: dynamo gives up on a frame that enters `catch_warnings`, and
        # then compiles the model's forward instead, whose code every model shares
        return model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.pos,
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1]

    def _capture(self) -> None:
        """Record one step. Warm-up runs on a side stream first (as CUDA graphs require); it
        writes keys at the current position, which the first replay overwrites, and advances
        the cache's length counters, which are put back."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), _quiet(), _compiled(self.compiled):
            for _ in range(2):  # the first call compiles (rollout.compile)
                self._step(self, self.model())
        torch.cuda.current_stream().wait_stream(stream)
        for layer, n in zip(self.cache.layers, lengths, strict=True):
            layer.cumulative_length.copy_(n)
        self.graph = torch.cuda.CUDAGraph()
        with _quiet(), _compiled(self.compiled), torch.cuda.graph(self.graph):  # its own pool
            self.logits = self._step(self, self.model())


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
        with _compiled(dec.compiled):  # rollout.compile: the draw's passes fused too
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

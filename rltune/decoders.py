"""The decoders that `rltune.decode.fast_sample` runs, and the draw of each token from their
logits. A decoder prefills the prompts (`prefill`), then gives the logits that follow each drawn
token (`step`); `draw` picks the token. `rltune.decode` says which decoder serves when.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from rltune.models import OWN_RECOMPILES
from rltune.rollout import SamplingParams, position_ids


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
    whose prompts grow wider makes a new decoder per `decode.WIDTH_STEP`, so on a shared budget the
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


def compiled_draws(compiled: bool):
    """Lifts `decode.fast_sample`'s force-eager stance for what `rollout.compile` compiled: the
    static decoder's step and the draw."""
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
        # weak: a replica's decoder must not keep the policy (its key in decode._REPLICAS) alive
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
            with _quiet(), compiled_draws(self.compiled):
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
        with torch.cuda.stream(stream), _quiet(), compiled_draws(self.compiled):
            for _ in range(2):  # the first call compiles (rollout.compile)
                self._step(self, self.model())
        torch.cuda.current_stream().wait_stream(stream)
        for layer, n in zip(self.cache.layers, lengths, strict=True):
            layer.cumulative_length.copy_(n)
        self.graph = torch.cuda.CUDAGraph()
        with _quiet(), compiled_draws(self.compiled), torch.cuda.graph(self.graph):  # its own pool
            self.logits = self._step(self, self.model())

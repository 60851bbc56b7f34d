"""Sampling rollouts with the tiny model: layout, masks, truncation, stop strings, and log-probs
of left-padded rows that match an unpadded forward pass."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rltune.evaluation import render_prompt
from rltune.logps import token_logps
from rltune.models import SHIPPED
from rltune.rollout import SamplingParams, completion_lengths, position_ids, sample


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED["tiny"])
    model = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"], dtype=torch.float32)
    return model, tokenizer


def _prompt_ids(tokenizer, questions):
    return [
        tokenizer(
            render_prompt(tokenizer, [{"role": "user", "content": q}]), add_special_tokens=False
        )["input_ids"]
        for q in questions
    ]


def test_groups_masks_and_eos(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    prompts = _prompt_ids(tokenizer, ["12+7=", "3*4=", "100-1="])  # different lengths
    out = sample(
        model, tokenizer, prompts, SamplingParams(max_new_tokens=8), group_size=4, batch_size=5
    )
    assert out.prompt_ids.shape[0] == out.completion_ids.shape[0] == 12
    # the 4 samples of a prompt are adjacent and share its (left-padded) ids
    for i, p in enumerate(prompts):
        for row in out.prompt_ids[4 * i : 4 * i + 4].tolist():
            assert row[len(row) - len(p) :] == p
    lengths = out.completion_mask.sum(-1)
    eos = tokenizer.eos_token_id
    for row, n, trunc in zip(
        out.completion_ids.tolist(), lengths.tolist(), out.truncated.tolist(), strict=True
    ):
        if not trunc:  # ends with its EOS, and nothing real after it
            assert row[n - 1] == eos
        assert all(t == tokenizer.pad_token_id for t in row[n:])
    # the mask is a prefix of ones
    assert torch.equal(out.completion_mask.cummin(-1).values, out.completion_mask)
    assert len(out.completions) == 12 and all(isinstance(c, str) for c in out.completions)


def test_truncation_is_flagged(tiny):
    model, tokenizer = tiny
    prompts = _prompt_ids(tokenizer, ["12+7="])
    out = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=1), group_size=2)
    assert out.truncated.tolist() == [True, True]  # an answer plus EOS never fits in 1 token
    assert out.completion_mask.sum().item() == 2


def test_stop_string_ends_a_completion(tiny):
    _, tokenizer = tiny
    ids = tokenizer("12 + 34 = 46 and more", add_special_tokens=False)["input_ids"]
    lengths, truncated = completion_lengths(
        torch.tensor([ids]), tokenizer, [tokenizer.eos_token_id], ("= 4",)
    )
    # the shortest prefix whose text holds the stop string
    assert "= 4" in tokenizer.decode(ids[: lengths[0]])
    assert "= 4" not in tokenizer.decode(ids[: lengths[0] - 1])
    assert truncated == [False]
    lengths, truncated = completion_lengths(
        torch.tensor([ids]), tokenizer, [tokenizer.eos_token_id], ()
    )
    assert lengths == [len(ids)] and truncated == [True]


def test_left_padded_logps_equal_unpadded_forward(tiny):
    """Position ids from the mask make a left-padded row compute exactly what it computes alone."""
    model, tokenizer = tiny
    torch.manual_seed(1)
    prompts = _prompt_ids(tokenizer, ["5+5=", "99*9="])
    out = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=6), group_size=1)
    mask = out.attention_mask
    with torch.no_grad():
        logits = model(
            input_ids=out.input_ids, attention_mask=mask, position_ids=position_ids(mask)
        ).logits
        width = out.completion_ids.shape[1]
        batched = token_logps(logits[:, -width - 1 : -1], out.completion_ids)
        for b in range(2):
            n = int(out.completion_mask[b].sum())
            ids = out.input_ids[b][mask[b].bool()][None]  # the row without padding
            alone = model(input_ids=ids).logits
            solo = token_logps(alone[:, -n - 1 : -1] if n else alone[:, :0], ids[:, -n:])
            torch.testing.assert_close(batched[b, :n], solo[0], atol=1e-5, rtol=1e-5)


def _arith_prompts(tokenizer, n):
    from rltune.tasks.arith import rows

    return [
        tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]
        for r in rows("prompt_answer", n, seed=0, split="eval")
    ]


def _fresh_logps(model, rollout):
    """Log-probs of the rollout's completion tokens from one plain forward pass."""
    mask = rollout.attention_mask
    with torch.no_grad():
        logits = model(
            input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids(mask)
        ).logits
    width = rollout.completion_ids.shape[1]
    return token_logps(logits[:, -width - 1 : -1].float(), rollout.completion_ids)


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_fast_engine_greedy_equals_generate_and_logps_match_a_fresh_forward(tiny, decoder):
    """The fast decode loop is correct before it is fast: greedy output token for token equal
    to `generate`, and the log-probs it returns equal to a fresh forward pass (fp32, 1e-5).
    `static` is the CUDA-graph decoder's fixed-shape cache and 4-D mask, without the capture."""
    from rltune.decode import fast_sample
    from rltune.rollout import generate_greedy

    model, tokenizer = tiny
    prompts = _arith_prompts(tokenizer, 24)
    expected = generate_greedy(model, tokenizer, prompts, max_new_tokens=16)
    rollout, logps = fast_sample(
        model,
        tokenizer,
        prompts,
        SamplingParams(max_new_tokens=16),
        greedy=True,
        batch_size=10,
        decoder=decoder,
    )  # 3 calls of 10, 10 and 4 prompts, merged
    assert rollout.completions == expected
    fresh = _fresh_logps(model, rollout) * rollout.completion_mask
    torch.testing.assert_close(logps, fresh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_fast_engine_samples_groups_from_one_prefill(tiny, decoder):
    from rltune.decode import fast_sample

    model, tokenizer = tiny
    torch.manual_seed(0)
    prompts = _prompt_ids(tokenizer, ["12+7=", "3*4=", "100-1="])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=5, top_p=0.9)
    out, logps = fast_sample(model, tokenizer, prompts, params, group_size=4, decoder=decoder)
    assert out.completion_ids.shape[0] == 12 and logps.shape == out.completion_ids.shape
    for i, p in enumerate(prompts):  # the samples of a prompt are adjacent, on its ids
        for row in out.prompt_ids[4 * i : 4 * i + 4].tolist():
            assert row[len(row) - len(p) :] == p
    assert torch.equal(out.completion_mask.cummin(-1).values, out.completion_mask)
    assert (logps <= 0).all() and (logps[out.completion_mask == 0] == 0).all()
    fresh = _fresh_logps(model, out) * out.completion_mask
    torch.testing.assert_close(logps, fresh, atol=1e-5, rtol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


devices = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", devices)
def test_graph_decoder_equals_generate_reuses_its_graph_and_follows_weight_updates(tiny, device):
    """The graph decoder (captured on CUDA; the same replica and fixed shapes uncaptured on CPU)
    replays the tiny model's greedy decode exactly (fp32); a second rollout of the same shape
    reuses the decoder, and still matches after the weights change in place, because the
    replica is refreshed before each rollout."""
    from rltune.decode import _REPLICAS, fast_sample
    from rltune.rollout import generate_greedy

    cpu_model, tokenizer = tiny
    model = type(cpu_model)(cpu_model.config).to(device)
    model.load_state_dict(cpu_model.state_dict())
    prompts = _arith_prompts(tokenizer, 16)
    params = SamplingParams(max_new_tokens=16)

    def check():
        rollout, logps = fast_sample(
            model, tokenizer, prompts, params, greedy=True, decoder="graph"
        )
        assert rollout.completions == generate_greedy(model, tokenizer, prompts, max_new_tokens=16)
        fresh = _fresh_logps(model, rollout) * rollout.completion_mask
        torch.testing.assert_close(logps, fresh, atol=1e-4, rtol=1e-4)
        return _REPLICAS[model].decoders[16]

    first = check()
    assert (first.graph is not None) == (device == "cuda")
    with torch.no_grad():  # an optimizer step, in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert check() is first  # same decoder (and graph), new weights
    # the weights are in the compute dtype (fp32 here): the graph reads them, no copy
    assert _REPLICAS[model].shared and _REPLICAS[model].pairs == []
    model.lm_head.weight.data = model.lm_head.weight.data.clone() * 1.1  # a weight moved
    assert check() is not first  # a new decoder (and capture) on the new addresses


def test_graph_decoder_reuses_a_wider_decoder_and_grows_for_wider_prompts(tiny):
    """Prompt widths vary between rollouts: narrower prompts are left-padded into the last
    decoder (no new cache, capture or compile) and still decode exactly; wider ones replace it
    with one at least as wide and as long as both."""
    from rltune.decode import _REPLICAS, WIDTH_STEP, fast_sample
    from rltune.rollout import generate_greedy

    cpu_model, tokenizer = tiny
    model = type(cpu_model)(cpu_model.config)
    model.load_state_dict(cpu_model.state_dict())
    prompts = _arith_prompts(tokenizer, 8)
    long = [p + p[-WIDTH_STEP:] for p in prompts]  # one width step wider

    def decode(rows, new=12):
        out, _ = fast_sample(
            model, tokenizer, rows, SamplingParams(max_new_tokens=new), greedy=True, decoder="graph"
        )
        assert out.completions == generate_greedy(model, tokenizer, rows, max_new_tokens=new)
        return _REPLICAS[model].decoders[8]

    wide = decode(long)
    assert decode(prompts) is wide and decode(prompts, new=4) is wide
    grown = decode(prompts, new=40)  # more new tokens than it has room for
    assert grown is not wide and grown.width == wide.width and grown.length >= wide.width + 40
    assert decode(long) is grown


@pytest.mark.parametrize("device", devices)
def test_compiled_decode_step_equals_generate_compiles_once_and_is_reused(tiny, device):
    """rollout.compile: the static decoder's step compiled by inductor (C++ on CPU; Triton and
    then a CUDA graph on GPU), and the draw from its logits, give `generate`'s greedy tokens and
    a fresh forward's log-probs (fp32, 1e-5); each is traced as one graph without breaks, and a
    second rollout that fits the decoder compiles nothing."""
    from torch._dynamo.utils import counters

    from rltune.decode import _REPLICAS, fast_sample
    from rltune.rollout import generate_greedy

    cpu_model, tokenizer = tiny
    model = type(cpu_model)(cpu_model.config).to(device)
    model.load_state_dict(cpu_model.state_dict())
    prompts = _arith_prompts(tokenizer, 6)
    params = SamplingParams(max_new_tokens=16)
    counters.clear()
    rollout, logps = fast_sample(
        model, tokenizer, prompts, params, greedy=True, group_size=2, compile=True
    )  # decoder=auto: the static decoder, because it is compiled
    decoder = _REPLICAS[model].decoders[12]  # 6 prompts x 2
    assert decoder.compiled and counters["stats"]["unique_graphs"] == 2  # the step, the draw
    assert not counters["graph_break"] and (decoder.graph is not None) == (device == "cuda")
    # every frame dynamo saw compiled whole: the step from `_forward` down, not from a frame
    # inside the model that dynamo reached after giving up on an outer one
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 2
    expected = generate_greedy(model, tokenizer, prompts, max_new_tokens=16)
    assert rollout.completions == [c for c in expected for _ in range(2)]
    fresh = _fresh_logps(model, rollout) * rollout.completion_mask
    tol = 1e-5 if device == "cpu" else 1e-4  # fp32; fused CUDA kernels sum in another order
    torch.testing.assert_close(logps, fresh, atol=tol, rtol=tol)

    counters.clear()
    again, _ = fast_sample(
        model, tokenizer, prompts[::-1], params, greedy=True, group_size=2, compile=True
    )
    assert _REPLICAS[model].decoders[12] is decoder and not counters["stats"]["unique_graphs"]
    assert again.completions == [c for c in expected[::-1] for _ in range(2)]


def test_each_compiled_decoder_compiles_and_frees_the_one_it_replaces(tiny):
    """rollout.compile: every decoder's step is the same code (`StaticDecoder._forward`), and
    dynamo runs a code object eagerly once it has been compiled `recompile_limit` times (8); a
    run whose prompts grow wider makes a new decoder per WIDTH_STEP. With the limit at 2 here,
    three decoders of growing width each compile their step and draw (rather than the third
    decoding eagerly), and each one replaced is freed with its cache before the next is made,
    here with the garbage collector off (as it may not run in time on a GPU)."""
    import gc
    import weakref

    from conftest import small_model_config
    from torch._dynamo.utils import counters

    from rltune.decode import _REPLICAS, WIDTH_STEP, fast_sample

    _, tokenizer = tiny
    model = AutoModelForCausalLM.from_config(small_model_config(tokenizer)).eval()
    prompt = _arith_prompts(tokenizer, 1)[0]
    caches = []
    gc.disable()
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for k in (1, 2, 3):
                counters.clear()
                wide = (prompt * 8)[: k * WIDTH_STEP]
                fast_sample(
                    model, tokenizer, [wide], SamplingParams(max_new_tokens=4), greedy=True,
                    decoder="graph", compile=True,
                )  # fmt: skip
                decoder = _REPLICAS[model].decoders[1]  # 1 prompt, 1 row
                assert decoder.width == k * WIDTH_STEP
                assert counters["stats"]["unique_graphs"] == 2  # the step, the draw
                assert counters["frames"]["ok"] == counters["frames"]["total"] == 2
                caches.append(weakref.ref(decoder.cache.layers[0].keys))
                del decoder
                assert [c() is not None for c in caches] == [False] * (k - 1) + [True]
    finally:
        gc.enable()


@pytest.mark.parametrize("device", devices)
def test_graph_decoder_bf16_replica_logps_match_an_autocast_forward(tiny, device):
    """fp32 master weights under bf16 autocast: the decoder samples from a bf16 replica, and
    its log-probs match a fresh autocast forward within bf16 tolerance."""
    from rltune.decode import _REPLICAS, fast_sample
    from rltune.models import autocast

    cpu_model, tokenizer = tiny
    model = type(cpu_model)(cpu_model.config).to(device)
    model.load_state_dict(cpu_model.state_dict())
    torch.manual_seed(0)
    prompts = _arith_prompts(tokenizer, 8)
    params = SamplingParams(max_new_tokens=16)
    with autocast(torch.device(device), torch.bfloat16):
        rollout, logps = fast_sample(
            model, tokenizer, prompts, params, group_size=4, decoder="graph", dtype=torch.bfloat16
        )
        fresh = _fresh_logps(model, rollout) * rollout.completion_mask
    err = (logps - fresh).abs()[rollout.completion_mask.bool()]
    print(f"bf16 log-prob error: mean {err.mean():.4f}, max {err.max():.4f}")
    assert err.mean() < 0.03 and err.max() < 0.5, (err.mean(), err.max())
    replica = _REPLICAS[model]  # fp32 weights: the graph reads a bf16 copy, refreshed per rollout
    assert not replica.shared and next(replica.model.parameters()).dtype == torch.bfloat16


def test_graph_replica_computes_rotary_angles_as_autocast_does(tiny):
    """The bf16 replica of fp32 weights keeps the rotary frequencies in fp32 (the policy's own
    buffer), so its cos and sin equal those of the autocast forward that training runs, at
    every position; bf16 frequencies are off by up to 2^-9 relative, ~0.07 rad at 384."""
    from rltune.decode import _graph_copy

    model, _ = tiny
    replica = _graph_copy(model, torch.bfloat16)
    assert next(replica.parameters()).dtype == torch.bfloat16
    assert replica.model.rotary_emb.inv_freq is model.model.rotary_emb.inv_freq
    x, positions = torch.zeros(1, 1, dtype=torch.bfloat16), torch.arange(512)[None]  # [1, T]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.model.rotary_emb(x, positions)
    for got, want in zip(replica.model.rotary_emb(x, positions), expected, strict=True):
        assert torch.equal(got, want)


def test_graph_decoder_lora_replica_shares_the_frozen_base_and_follows_adapter_updates():
    """peft=lora with a bf16 base (as `load_policy` loads it for bf16 compute): the graph's
    replica reads the policy's own frozen base weights (same storage, nothing copied or
    refreshed) and holds bf16 copies of the fp32 adapters only. After an update of the adapters
    in place, the next rollout decodes with the new ones: greedy tokens equal a fresh bf16 copy
    of the updated policy's, and the log-probs an autocast forward of the policy itself."""
    import copy

    from rltune.config import PeftConfig
    from rltune.decode import _REPLICAS, fast_sample
    from rltune.lora import apply_lora
    from rltune.models import SHIPPED, autocast

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED["tiny"])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"], dtype=torch.bfloat16)
    model = apply_lora(base, PeftConfig(method="lora")).eval()  # fp32 adapters, every linear
    prompts = _arith_prompts(tokenizer, 16)
    params = SamplingParams(max_new_tokens=16)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16

    def rollout():
        with autocast(cpu, bf16):
            out, logps = fast_sample(
                model, tokenizer, prompts, params, greedy=True, decoder="graph", dtype=bf16
            )
            fresh = _fresh_logps(model, out) * out.completion_mask
        err = (logps - fresh).abs()[out.completion_mask.bool()]
        assert err.mean() < 0.03 and err.max() < 0.5, (err.mean(), err.max())
        # the old replica, a whole copy, with the replica's fp32 rotary frequencies: compared
        # with bf16 ones, a near-tie between two tokens can go either way (CI saw one flip)
        reference = copy.deepcopy(model).to(bf16)
        for (name, copied), (_, own) in zip(
            reference.named_buffers(), model.named_buffers(), strict=True
        ):
            if "rotary_emb" in name:
                copied.data = own.data.clone()
        expected, _ = fast_sample(
            reference, tokenizer, prompts, params, greedy=True, decoder="static"
        )
        assert out.completions == expected.completions
        return out.completions

    before = rollout()
    replica = _REPLICAS[model]
    frozen = trained = 0
    for (name, r), p in zip(replica.model.named_parameters(), model.parameters(), strict=True):
        assert not r.requires_grad and r.dtype == bf16, name
        if p.requires_grad:  # an adapter: a copy in the compute dtype
            assert "lora_" in name and r.data_ptr() != p.data_ptr(), name
            trained += r.numel()
        else:  # the base: the policy's own tensor
            assert r is p and r.data_ptr() == p.data_ptr(), name
            frozen += r.numel()
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert frozen == sum(p.numel() for p in base.parameters() if not p.requires_grad) > trained
    assert [p for _, p in replica.pairs] == [p for p in model.parameters() if p.requires_grad]
    decoder = replica.decoders[16]
    with torch.no_grad():  # an optimizer step on the adapters, in place
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    after = rollout()
    assert sum(a != b for a, b in zip(before, after, strict=True)) > 8  # the update shows
    assert _REPLICAS[model] is replica and replica.decoders[16] is decoder  # refreshed, not rebuilt


def _qwen05b_random(dtype, device="cuda"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rltune.models import QWEN2_5_0_5B

    config = Qwen2Config(
        **QWEN2_5_0_5B,
        bos_token_id=None,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype).eval()


def _random_ids(n, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 151000, (int(k),), generator=g).tolist()
        for k in torch.randint(*lengths, (n,), generator=g)
    ]


def _generate_greedy(model, tokenizer, rollout, max_new_tokens):
    """`generate`'s greedy completion ids for the rollout's (left-padded) prompts."""
    ids, mask = rollout.prompt_ids, rollout.prompt_mask
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[:, ids.shape[1] :]


def test_fast_engine_on_a_random_qwen2_5_0_5b_on_cpu(tiny):
    """Full Qwen2.5-0.5B shape (random weights, fp32, ~20 s on 2 cores): the fast engine's
    greedy ids, with the dynamic and with the static (CUDA-graph layout) cache, equal
    `generate`'s token for token, and its log-probs equal a fresh forward pass within 1e-5."""
    from rltune.decode import fast_sample

    _, tokenizer = tiny  # ids above its vocabulary decode to nothing; the ids are compared
    model = _qwen05b_random(torch.float32, device="cpu")
    prompts = _random_ids(4, (8, 24))
    params = SamplingParams(max_new_tokens=12)
    for decoder in ("dynamic", "static"):
        rollout, logps = fast_sample(
            model, tokenizer, prompts, params, greedy=True, decoder=decoder
        )
        expected = _generate_greedy(model, tokenizer, rollout, 12)
        assert torch.equal(rollout.completion_ids, expected), decoder
        fresh = _fresh_logps(model, rollout) * rollout.completion_mask
        torch.testing.assert_close(logps, fresh, atol=1e-5, rtol=1e-5)


@cuda
def test_cuda_graph_decoder_on_a_random_qwen2_5_0_5b(tiny):
    """Full Qwen2.5-0.5B shape (random weights): greedy ids equal `generate`'s in fp32, and in
    bf16 (fp32 master weights under autocast, graph on a bf16 replica) the returned log-probs
    match a fresh autocast forward within bf16 tolerance."""
    from rltune.decode import fast_sample
    from rltune.models import autocast

    _, tokenizer = tiny  # ids above its vocabulary decode to nothing; the ids are compared
    model = _qwen05b_random(torch.float32)
    prompts = _random_ids(8, (20, 60))
    params = SamplingParams(max_new_tokens=32)
    rollout, _ = fast_sample(model, tokenizer, prompts, params, greedy=True, decoder="graph")
    generated = _generate_greedy(model, tokenizer, rollout, 32)
    width = generated.shape[1]
    assert torch.equal(rollout.completion_ids[:, :width], generated)

    torch.manual_seed(0)
    sampled = SamplingParams(max_new_tokens=64, temperature=1.0)
    device = torch.device("cuda")
    with autocast(device, torch.bfloat16):
        rollout, logps = fast_sample(
            model, tokenizer, prompts, sampled, group_size=4, dtype=torch.bfloat16
        )
        fresh = _fresh_logps(model, rollout) * rollout.completion_mask
    err = (logps - fresh).abs()[rollout.completion_mask.bool()]
    print(
        f"bf16 log-prob error vs fresh autocast forward: mean {err.mean():.4f} max {err.max():.4f}"
    )
    assert err.mean() < 0.05 and err.max() < 0.5


def test_filter_logits_top_k_top_p_min_p():
    from rltune.decoders import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def keep(**kw):
        return filter_logits(logits, SamplingParams(max_new_tokens=1, **kw)).isfinite()[0].tolist()

    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert keep(top_p=0.45) == [True, False, False, False]  # the first token alone suffices
    assert keep(min_p=0.25) == [True, True, True, False]  # 0.05 < 0.25 x 0.5


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, [0.5, 0.3, 0.15, 0.05]),
        ({"temperature": 2.0}, [x**0.5 for x in (0.5, 0.3, 0.15, 0.05)]),
        ({"top_k": 2}, [0.5, 0.3, 0.0, 0.0]),
        ({"top_p": 0.95, "temperature": 0.5}, [0.25, 0.09, 0.0225, 0.0]),  # mass .685 .247 .062
    ],
)
def test_draw_samples_the_filtered_distribution_and_returns_unfiltered_logps(kw, expected):
    """The exponential race draws token i with probability p_i (after temperature and filters):
    frequencies over 40,000 rows within 0.012 (5 sigma); the log-prob returned is that of
    softmax(logits / temperature), before filtering, as the loss uses."""
    from rltune.decoders import draw

    _check_draw(draw, kw, expected)


@pytest.mark.parametrize(
    "kw, expected", [({}, [0.5, 0.3, 0.15, 0.05]), ({"top_k": 2}, [0.5, 0.3, 0, 0])]
)
def test_compiled_draw_samples_the_same_distribution(kw, expected):
    """rollout.compile's draw (inductor, with its own random stream) keeps the distribution."""
    from rltune.decoders import _compile, draw

    _check_draw(_compile(draw), kw, expected)


def _check_draw(draw, kw, expected):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (probs.log() + 3.0).expand(40_000, 4)  # a shift changes nothing
    params = SamplingParams(max_new_tokens=1, **kw)
    torch.manual_seed(0)
    token, logp = draw(logits, params, greedy=False)
    target = torch.tensor(expected) / sum(expected)
    freq = torch.bincount(token, minlength=4).float() / len(token)
    assert (freq - target).abs().max() < 0.012, (freq, target)
    assert (freq[target == 0] == 0).all()
    full = (logits / params.temperature).log_softmax(-1)
    torch.testing.assert_close(logp, full.gather(-1, token[:, None])[:, 0])
    greedy, _ = draw(logits, params, greedy=True)
    assert (greedy == 0).all()


def test_the_static_cache_is_only_used_where_every_layer_attends_in_full(tiny):
    """A sliding-window layer under the static decoder's 4-D mask would see past its window, so
    such models (and ZeRO-3 shards) decode with the dynamic cache."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rltune.decode import auto_decoder, static_cache_fits

    model, _ = tiny
    assert static_cache_fits(model)
    assert auto_decoder(model) == "dynamic"  # on CPU always
    window = dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)
    shape = {k: v for k, v in model.config.to_dict().items() if k not in window}
    windowed = Qwen2Config(**{**shape, "layer_types": None, **window})
    assert "sliding_attention" in windowed.layer_types
    assert not static_cache_fits(AutoModelForCausalLM.from_config(windowed))


def test_decoding_runs_a_compiled_model_uncompiled():
    """train.compile compiles the decoder stack for training; decoding changes shape every token,
    so `fast_sample`, `sample` and `generate_greedy` run it uncompiled: nothing is traced, and
    the tokens are those of the plain model."""
    from torch._dynamo.utils import counters

    from rltune.decode import fast_sample
    from rltune.hidden_states import compile_stack
    from rltune.rollout import generate_greedy

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED["tiny"])
    model = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"], dtype=torch.float32)
    prompts = _prompt_ids(tokenizer, ["12+7=", "3*4="])
    plain = generate_greedy(model, tokenizer, prompts, max_new_tokens=6)
    compile_stack(model, backend="eager")  # dynamo's tracing without inductor's code generation
    counters.clear()
    model.get_decoder()(input_ids=torch.tensor([prompts[0]]))
    assert counters["stats"]["unique_graphs"] == 1  # compiled: a forward call is traced

    counters.clear()
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=6) == plain
    rollout, _ = fast_sample(
        model, tokenizer, prompts, SamplingParams(max_new_tokens=6), greedy=True
    )
    assert rollout.completions == plain
    torch.manual_seed(0)
    sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=6), group_size=2)
    assert not counters["stats"], dict(counters["stats"])


def test_each_compiled_model_has_a_recompile_budget_of_its_own(tiny):
    """train.compile: every model's decoder stack runs transformers' one decorated `forward`,
    and dynamo runs a code object eagerly once it has been compiled `recompile_limit` times (8;
    PPO's three models took all 8 in 30 steps of the tiny job). With the limit at 1 here, a
    trained policy and a frozen reference (which dynamo compiles apart: their parameters differ
    in requires_grad) each compile their own stack, rather than the reference running eagerly."""
    from torch._dynamo.utils import counters

    from rltune.hidden_states import compile_stack

    model, tokenizer = tiny
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    ids = torch.tensor(_prompt_ids(tokenizer, ["12+7="]))
    with torch._dynamo.config.patch(recompile_limit=1):
        for m in (policy, reference):
            compile_stack(m, backend="eager")  # dynamo's tracing, no code generation
            counters.clear()
            m.get_decoder()(input_ids=ids)
            assert counters["stats"]["unique_graphs"] == 1


def _greedy_both(model, tokenizer, prompts, stop):
    """The `generate` engine and the fast one, greedy (top_k=1), with stop strings."""
    from rltune.decode import fast_sample

    params = SamplingParams(max_new_tokens=12, top_k=1, stop=stop)
    hf = sample(model, tokenizer, prompts, params, batch_size=4)
    fast, _ = fast_sample(model, tokenizer, prompts, params, decoder="dynamic")
    return hf, fast


def _rows(rollout):
    n = rollout.completion_mask.sum(-1).tolist()
    return [row[:k] for row, k in zip(rollout.completion_ids.tolist(), n, strict=True)]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_both_engines_end_at_a_stop_string_that_comes_before_the_eos(tiny, pad_is_eos):
    """The fast engine decodes on to EOS; a stop string before it still ends the completion,
    exactly where `generate`'s stop criterion ends it. With pad == EOS (Llama-style
    tokenizers) the padding `generate` writes after a stopped row is not taken for an EOS."""

    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = _arith_prompts(tokenizer, 12)
    plain, _ = _greedy_both(model, tokenizer, prompts, ())
    hf, fast = _greedy_both(model, tokenizer, prompts, ("6", "9"))
    assert hf.completions == fast.completions and _rows(hf) == _rows(fast)
    cut = 0
    for text, full, ids, trunc in zip(
        fast.completions, plain.completions, _rows(fast), fast.truncated.tolist(), strict=True
    ):
        first = min((full.index(s) for s in "69" if s in full), default=None)
        if first is None:  # no stop string: the whole completion, EOS included
            assert text == full and ids[-1] == tokenizer.eos_token_id
        else:  # through the stop string, no EOS
            assert text == full[: first + 1] and tokenizer.eos_token_id not in ids
            cut += len(text) < len(full)
        assert not trunc
    assert cut >= 2  # the case that matters: text (and an EOS) came after the stop string


def test_a_stop_string_may_start_in_the_prompt_but_not_lie_in_it(tiny):
    """The prompt's text ends with "assistant\n": a stop string "\n-" completes with a first
    token "-", so that token is the whole completion (not the row with its padding, flagged
    truncated); "assistant" lies in the prompt alone and cuts nothing."""
    model, tokenizer = tiny
    prompts = _prompt_ids(tokenizer, ["61-84=", "7*9="])
    plain, _ = _greedy_both(model, tokenizer, prompts, ())
    assert plain.completions[0].startswith("-") and not plain.completions[1].startswith("-")
    for out in _greedy_both(model, tokenizer, prompts, ("\n-",)):
        assert out.completions == ["-", plain.completions[1]]
        assert out.truncated.tolist() == [False, False]
    for out in _greedy_both(model, tokenizer, prompts, ("assistant",)):
        assert out.completions == plain.completions


def _decoders_made(monkeypatch) -> list[int]:
    """The row counts of the static decoders made from now on (by a spy on their __init__)."""
    from rltune import decoders

    made = []
    original = decoders.StaticDecoder.__init__

    def spy(self, model, rows, *args, **kwargs):
        made.append(rows)
        original(self, model, rows, *args, **kwargs)

    monkeypatch.setattr(decoders.StaticDecoder, "__init__", spy)
    return made


def test_calls_of_equal_size_share_one_static_decoder(tiny, monkeypatch):
    """12 rows with at most 8 per call run as 6 + 6, not 8 + 4: one decoder (one capture, one
    compile on a GPU) serves both calls and the next rollout, instead of two alternating."""
    from rltune import decode

    model, tokenizer = tiny
    model = copy.deepcopy(model)  # no decoder left from other tests
    made = _decoders_made(monkeypatch)
    prompts = _arith_prompts(tokenizer, 6)
    for _ in range(2):
        decode.fast_sample(
            model, tokenizer, prompts, SamplingParams(max_new_tokens=4), group_size=2,
            batch_size=8, decoder="graph",
        )  # fmt: skip
    assert made == [6]


def test_a_short_last_call_is_filled_up_to_use_the_same_decoder(tiny, monkeypatch):
    """5 prompts x 2 with at most 8 rows per call run as 3 + 2 prompts; the second call is
    filled with copies up to 3, so one decoder serves both, and the result is the 5 prompts'
    own: greedy, it equals one call over all of them."""
    from rltune import decode

    model, tokenizer = tiny
    model = copy.deepcopy(model)  # no decoder left from other tests
    made = _decoders_made(monkeypatch)
    prompts = _arith_prompts(tokenizer, 5)
    params = SamplingParams(max_new_tokens=6)

    def run(batch_size):
        return decode.fast_sample(
            model, tokenizer, prompts, params, group_size=2, batch_size=batch_size,
            greedy=True, decoder="graph",
        )  # fmt: skip

    split, split_logps = run(8)
    assert made == [6]
    whole, whole_logps = run(10)
    assert len(split.completions) == 10
    assert split.completions == whole.completions
    n = whole.completion_mask.shape[1]
    torch.testing.assert_close(split.completion_mask[:, :n], whole.completion_mask)
    assert not split.completion_mask[:, n:].any()
    torch.testing.assert_close(split_logps[:, :n], whole_logps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices)
def test_the_graph_replica_keeps_the_training_decoder_across_an_eval(tiny, monkeypatch, device):
    """Evaluation decodes greedily another number of rows (eval prompts x 1) than training's
    rollouts (prompts x group_size). The replica keeps a decoder per row count, so the
    training decoder (on CUDA its graph, with rollout.compile its compiled step) is the same
    object before and after an eval, and the eval's serves the next eval: two decoders made,
    whatever the number of rounds. A third row count drops the least recently used one. On
    CUDA two captured graphs live side by side, and a dropped one's pool is released."""
    from rltune import decode
    from rltune.rollout import generate_greedy

    model, tokenizer = tiny
    model = copy.deepcopy(model).to(device)  # no decoder left from other tests
    made = _decoders_made(monkeypatch)
    prompts = _arith_prompts(tokenizer, 6)
    params = SamplingParams(max_new_tokens=6)

    def train():  # 4 prompts x 2 = 8 rows
        decode.fast_sample(model, tokenizer, prompts[:4], params, group_size=2, decoder="graph")
        return decode._REPLICAS[model].decoders[8]

    def evaluate(n=6):  # n prompts x 1
        out, _ = decode.fast_sample(
            model, tokenizer, prompts[:n], params, greedy=True, decoder="graph"
        )
        assert out.completions == generate_greedy(model, tokenizer, prompts[:n], max_new_tokens=6)
        return decode._REPLICAS[model].decoders[n]

    training = train()
    evaluating = evaluate()
    for _ in range(2):
        assert train() is training and evaluate() is evaluating
    assert made == [8, 6] and decode.MAX_DECODERS == 2
    assert train() is training  # the eval's decoder is now the least recently used
    evaluate(5)
    assert list(decode._REPLICAS[model].decoders) == [8, 5] and made == [8, 6, 5]
    assert train() is training


def test_the_models_generation_config_does_not_shape_sampling_or_greedy_eval(tiny):
    """`generate` fills what a passed GenerationConfig leaves unset from the model's own, so a
    preset's repetition penalty would bend sampling away from the distribution the loss's
    log-probs assume, and make "greedy" evaluation something else."""
    from rltune.rollout import greedy_rollout

    model, tokenizer = tiny
    prompts = _arith_prompts(tokenizer, 6)
    params = SamplingParams(max_new_tokens=8, top_k=1)

    def both():
        sampled = sample(model, tokenizer, prompts, params).completions
        greedy = greedy_rollout(model, tokenizer, prompts, max_new_tokens=8).completions
        return sampled, greedy

    plain = both()
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    try:
        assert both() == plain
    finally:
        model.generation_config = saved
    assert model.generation_config is saved

"""Sampling rollouts with the tiny model: layout, masks, truncation, stop strings, and log-probs
of left-padded rows that match an unpadded forward pass."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rltune.evaluation import render_prompt
from rltune.losses import token_logps
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


def test_fast_engine_greedy_equals_generate_and_logps_match_a_fresh_forward(tiny):
    """The fast decode loop is correct before it is fast: greedy output token for token equal
    to `generate`, and the log-probs it returns equal to a fresh forward pass (fp32, 1e-5)."""
    from rltune.evaluation import render_prompt as render
    from rltune.rollout import fast_sample, generate_greedy
    from rltune.tasks.arith import rows

    model, tokenizer = tiny
    prompts = [
        tokenizer(render(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]
        for r in rows("prompt_answer", 24, seed=0, split="eval")
    ]
    expected = generate_greedy(model, tokenizer, prompts, max_new_tokens=16)
    rollout, logps = fast_sample(
        model, tokenizer, prompts, SamplingParams(max_new_tokens=16), greedy=True, batch_size=10
    )  # 3 calls of 10, 10 and 4 prompts, merged
    assert rollout.completions == expected
    mask = rollout.attention_mask
    with torch.no_grad():
        logits = model(
            input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids(mask)
        ).logits
    width = rollout.completion_ids.shape[1]
    fresh = token_logps(logits[:, -width - 1 : -1], rollout.completion_ids)
    torch.testing.assert_close(logps, fresh * rollout.completion_mask, atol=1e-5, rtol=1e-5)


def test_fast_engine_samples_groups_from_one_prefill(tiny):
    from rltune.rollout import fast_sample

    model, tokenizer = tiny
    torch.manual_seed(0)
    prompts = _prompt_ids(tokenizer, ["12+7=", "3*4=", "100-1="])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=5, top_p=0.9)
    out, logps = fast_sample(model, tokenizer, prompts, params, group_size=4)
    assert out.completion_ids.shape[0] == 12 and logps.shape == out.completion_ids.shape
    for i, p in enumerate(prompts):  # the samples of a prompt are adjacent, on its ids
        for row in out.prompt_ids[4 * i : 4 * i + 4].tolist():
            assert row[len(row) - len(p) :] == p
    assert torch.equal(out.completion_mask.cummin(-1).values, out.completion_mask)
    assert (logps <= 0).all() and (logps[out.completion_mask == 0] == 0).all()


def test_filter_logits_top_k_top_p_min_p():
    from rltune.rollout import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def keep(**kw):
        return filter_logits(logits, SamplingParams(max_new_tokens=1, **kw)).isfinite()[0].tolist()

    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert keep(top_p=0.45) == [True, False, False, False]  # the first token alone suffices
    assert keep(min_p=0.25) == [True, True, True, False]  # 0.05 < 0.25 x 0.5

"""Shared-prefix rows (rltune.prefix): a GRPO group in one row gives each completion the
log-probs and gradients of a row of its own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rltune.algos.online import OnlineAlgorithm
from rltune.hidden_states import HiddenStateHead
from rltune.models import SHIPPED
from rltune.prefix import PAD, branch_attention_mask, group_rows, mask_for, takes_4d_mask
from rltune.rollout import Rollout

G = 4


def test_branch_mask_by_hand():
    # prompt p0 p1, continuation 1 = a0 a1, continuation 2 = b0, then padding
    segment = torch.tensor([[0, 0, 1, 1, 2, PAD]])
    expected = torch.tensor(
        [
            #  p0 p1 a0 a1 b0 pad
            [1, 0, 0, 0, 0, 0],  # p0
            [1, 1, 0, 0, 0, 0],  # p1
            [1, 1, 1, 0, 0, 0],  # a0
            [1, 1, 1, 1, 0, 0],  # a1
            [1, 1, 0, 0, 1, 0],  # b0 sees the prompt and itself, not a0 a1
            [0, 0, 0, 0, 0, 1],  # padding sees only itself (no fully masked row)
        ],
        dtype=torch.bool,
    )
    assert torch.equal(branch_attention_mask(segment), expected[None, None])


def test_group_rows_index_points_at_the_predicting_positions():
    # one group, prompt width 3 (one left pad), two completions of width 2
    batch = group_rows(
        torch.tensor([[0, 7, 8]]),
        torch.tensor([[0, 1, 1]]),
        torch.tensor([[[10, 11], [20, 0]]]),
        torch.tensor([[[1, 1], [1, 0]]]),
    )
    assert batch["input_ids"].tolist() == [[0, 7, 8, 10, 11, 20, 0]]
    # prompt positions as generate numbers a left-padded row; each slot restarts at 2
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2, 3, 2, 3]]
    # slot 1: token 10 is predicted by the prompt's last position 2, token 11 by 10's (3);
    # slot 2: token 20 by position 2, its padding by 20's position 5
    assert batch["logits_index"].tolist() == [2, 3, 2, 5]
    assert batch["completion_ids"].tolist() == [[10, 11], [20, 0]]


def _rollout(seed: int = 0) -> Rollout:
    """3 groups of G completions: prompts of 5, 9 and 7 tokens (left-padded), completions of
    1 to 6 tokens (right-padded), random ids of the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens, width, c = [5, 9, 7], 9, 6
    n = len(prompt_lens) * G
    prompt_ids = torch.randint(3, 512, (n, width), generator=gen)
    prompt_mask = torch.zeros(n, width, dtype=torch.long)
    for k, p in enumerate(prompt_lens):
        prompt_ids[k * G : (k + 1) * G] = prompt_ids[k * G]  # a group shares its prompt
        prompt_mask[k * G : (k + 1) * G, width - p :] = 1
    prompt_ids[prompt_mask == 0] = 0
    lengths = torch.randint(1, c + 1, (n,), generator=gen)
    completion_mask = (torch.arange(c)[None] < lengths[:, None]).long()
    completion_ids = torch.randint(3, 512, (n, c), generator=gen) * completion_mask
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        torch.zeros(n, dtype=torch.bool),
        [""] * n,
    )


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_logps"])
@pytest.mark.parametrize(
    "attention, device",
    [("sdpa", "cpu"), ("eager", "cpu"), pytest.param("sdpa", "cuda", marks=cuda)],
)
def test_a_group_row_gives_each_completions_log_probs_and_gradients(attention, device, fused):
    """One row per group and a row per completion: the same completion log-probs (fp32, 1e-5)
    and the same gradients; letting slots see each other changes them. On CUDA the 4-D mask
    runs SDPA's memory-efficient kernel. With algo.fused_logps (from hidden states) the
    row-per-completion numbers also equal the logits path's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        SHIPPED["tiny"], dtype=torch.float32, attn_implementation=attention
    ).to(device)
    algo = SimpleNamespace(
        ctx=SimpleNamespace(device=torch.device(device)),
        policy=model,
        params=SimpleNamespace(temperature=0.9),
        logprob_chunk_size=16,
        hidden_head=HiddenStateHead("algo.fused_logps", fused),
    )
    rollout = _rollout()
    rows = list(range(len(rollout.completions)))

    def logps_and_grads(batch, algo=algo):
        model.zero_grad()
        logps, _ = OnlineAlgorithm.completion_logps(algo, model, batch)  # [N, C]
        mask = rollout.completion_mask[:, : logps.shape[1]].to(device)
        (logps * mask).sum().backward()
        return (logps * mask).cpu(), [p.grad.cpu().clone() for p in model.parameters()]

    alone, grads = logps_and_grads(OnlineAlgorithm.trimmed_rows(algo, rollout, rows))
    if fused:
        assert algo.hidden_head(model, "log-probs") is model.lm_head
        plain = SimpleNamespace(**{**vars(algo), "hidden_head": HiddenStateHead("x", False)})
        logits_path, logits_grads = logps_and_grads(
            OnlineAlgorithm.trimmed_rows(algo, rollout, rows), algo=plain
        )
        torch.testing.assert_close(alone, logits_path, atol=1e-5, rtol=1e-5)
        for a, b in zip(logits_grads, grads, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    batch = OnlineAlgorithm.shared_rows(algo, rollout, rows, G)
    assert batch["input_ids"].shape == (3, 9 + G * 6)  # vs 12 rows of 9 + 6
    assert batch["num_tokens"] == float(rollout.attention_mask.sum())
    shared, shared_grads = logps_and_grads(batch)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, shared_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)

    mask = batch["attention_mask"]
    allowed = mask if attention == "sdpa" else mask == 0  # eager takes an additive mask
    assert allowed.dtype == torch.bool
    leak = allowed | torch.ones_like(allowed).tril()  # the slots before, the prompt's padding
    batch["attention_mask"] = mask_for(model, leak)
    leaked, _ = logps_and_grads(batch)
    later = torch.arange(len(rows)) % G > 0  # slots 2..G
    assert not torch.allclose(leaked[later], alone[later], atol=1e-3)


def test_groups_sorted_keeps_groups_whole_and_orders_them_by_length():
    rollout = _rollout()
    longest = [int(rollout.completion_mask[k * G : (k + 1) * G].sum(-1).max()) for k in range(3)]
    chunks = OnlineAlgorithm.groups_sorted(rollout, list(range(3 * G)), 2 * G, G)
    assert [len(rows) for rows in chunks] == [2 * G, G]
    groups = [rows[i : i + G] for rows in chunks for i in range(0, len(rows), G)]
    assert sorted(g[0] for g in groups) == [0, G, 2 * G]
    assert all(g == list(range(g[0], g[0] + G)) for g in groups)
    ordered = [longest[g[0] // G] for g in groups]
    assert ordered == sorted(ordered)
    with pytest.raises(AssertionError, match="whole groups"):
        OnlineAlgorithm.groups_sorted(rollout, [0, 1, 2, 4], G, G)


def test_only_full_attention_sdpa_or_eager_models_take_shared_rows():
    from transformers import Qwen2Config

    def model(**config):
        shape = dict(hidden_size=8, num_attention_heads=2, num_hidden_layers=2, **config)
        return SimpleNamespace(config=Qwen2Config(**shape))

    sdpa = {"attn_implementation": "sdpa"}
    assert takes_4d_mask(model(**sdpa))
    assert takes_4d_mask(model(attn_implementation="eager"))
    assert not takes_4d_mask(model(attn_implementation="flash_attention_2"))
    # a sliding-window layer would ignore its window under a 4-D mask
    window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model(**window).config.layer_types == ["full_attention", "sliding_attention"]
    assert not takes_4d_mask(model(**window, **sdpa))
    assert not takes_4d_mask(SimpleNamespace())  # says nothing: a row per continuation

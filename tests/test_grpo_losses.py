"""GRPO's pure functions against values worked out by hand (the arithmetic is in each docstring)."""

import math

import pytest
import torch

from rltune.advantages import group_advantages, group_stats, zero_std_groups
from rltune.logps import linear_token_logps, token_entropy, token_logps
from rltune.losses import aggregate_loss, clipped_surrogate, kl_k3, loss_denominator


def test_group_advantages_by_hand():
    """Rewards [1, 0, 1, 0 | 1, 1, 1, 1], groups of 4.

    Group 1: mean 0.5, unbiased std sqrt((4 x 0.25) / 3) = 0.577350, so A = ±0.5 / 0.577450.
    Group 2: all equal, so A = 0 (this is what frac_reward_zero_std counts).
    batch: std of all eight: mean 0.75, squares 6 x 0.0625 + 2 x 0.5625 = 1.5, / 7 -> 0.462910.
    none (Dr. GRPO): A = r - group mean = ±0.5.
    """
    r = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 1])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(
        group_advantages(r, 4, "group"), torch.tensor([a, -a, a, -a, 0, 0, 0, 0])
    )
    b = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
    torch.testing.assert_close(
        group_advantages(r, 4, "batch"), torch.tensor([b, -b, b, -b, 0, 0, 0, 0])
    )
    torch.testing.assert_close(
        group_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])
    )
    assert zero_std_groups(r, 4).tolist() == [False, True]


def test_a_sample_without_reward_gets_zero_advantage_and_no_say_in_its_group():
    """Rewards [1, NaN, 0, 0]: the group is {1, 0, 0}: mean 1/3, unbiased std
    sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3); the NaN sample gets A = 0."""
    r = torch.tensor([1.0, float("nan"), 0, 0])
    mean, std = group_stats(r, 4)
    torch.testing.assert_close(mean, torch.tensor([1 / 3]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(1 / 3)]))
    s = math.sqrt(1 / 3) + 1e-4
    torch.testing.assert_close(
        group_advantages(r, 4), torch.tensor([(2 / 3) / s, 0.0, (-1 / 3) / s, (-1 / 3) / s])
    )
    # a group with a single reward has std 0: no signal
    assert zero_std_groups(torch.tensor([1.0, float("nan")]), 2).tolist() == [True]


def _log(x):
    return math.log(x)


def test_clipped_surrogate_token_level_and_clip_higher():
    """Four tokens of one completion each with its own ratio r = exp(logp - old):

    r = 1.5, A = +1: min(1.5, clip 1.2) = 1.2        -> loss -1.2, clipped high
    r = 0.5, A = -1: min(-0.5, -clip 0.8 = -0.8)     -> loss 0.8,  clipped low
    r = 1.1, A = +1: inside the range                -> loss -1.1
    r = 1.25, A = +1 with epsilon_high = 0.28: inside [0.8, 1.28] -> loss -1.25
    """
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.25]]).log()
    old = torch.zeros(1, 4)
    adv_pos, adv_neg = torch.tensor([1.0]), torch.tensor([-1.0])
    mask = torch.ones(1, 4)
    loss, flags = clipped_surrogate(ratios, old, adv_pos, mask, epsilon_low=0.2, epsilon_high=0.2)
    assert loss[0, 0].item() == pytest.approx(-1.2)
    assert loss[0, 2].item() == pytest.approx(-1.1)
    assert loss[0, 3].item() == pytest.approx(-1.2)  # symmetric clip: 1.25 -> 1.2
    assert flags["high"][0].tolist() == [True, False, False, True]
    loss, flags = clipped_surrogate(ratios, old, adv_neg, mask, epsilon_low=0.2, epsilon_high=0.2)
    assert loss[0, 1].item() == pytest.approx(0.8)
    assert flags["low"][0].tolist() == [False, True, False, False]
    loss, flags = clipped_surrogate(ratios, old, adv_pos, mask, epsilon_low=0.2, epsilon_high=0.28)
    assert loss[0, 3].item() == pytest.approx(-1.25)
    assert flags["high"][0].tolist() == [True, False, False, False]


def test_clipped_surrogate_gradient_vanishes_where_clipped():
    logps = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = clipped_surrogate(
        logps,
        torch.zeros(1, 2),
        torch.tensor([1.0]),
        torch.ones(1, 2),
        epsilon_low=0.2,
        epsilon_high=0.2,
    )
    loss.sum().backward()
    # d/dlogp of -r A = -r: -1.1 inside the range, 0 where the clip is active
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -1.1]]))


def test_sequence_level_ratio_is_the_masked_mean_gspo():
    """log-ratios [ln 2, 0] over two real tokens: mean ln 2 / 2, so r = sqrt(2) = 1.41421 for
    every token; A = 1 and epsilon 0.2 clip it to 1.2. A third, padded position with a wild
    log-ratio changes nothing."""
    logps = torch.tensor([[math.log(2), 0.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, flags = clipped_surrogate(
        logps,
        torch.zeros(1, 3),
        torch.tensor([1.0]),
        mask,
        epsilon_low=0.2,
        epsilon_high=0.2,
        importance_level="sequence",
    )
    torch.testing.assert_close(loss[0, :2], torch.tensor([-1.2, -1.2]))
    assert flags["high"][0].tolist() == [True, True, False]
    loss, _ = clipped_surrogate(
        logps,
        torch.zeros(1, 3),
        torch.tensor([1.0]),
        mask,
        epsilon_low=0.5,
        epsilon_high=0.5,
        importance_level="sequence",
    )
    torch.testing.assert_close(loss[0, :2], torch.full((2,), -math.sqrt(2)))


def test_kl_k3_by_hand():
    """logp = ln 0.5, ref = ln 0.25: delta = ref - logp = -ln 2, exp(delta) = 0.5,
    k3 = 0.5 + ln 2 - 1 = 0.193147; and 0 where policy and reference agree."""
    k = kl_k3(
        torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    )
    torch.testing.assert_close(k, torch.tensor([0.5 + math.log(2) - 1, 0.0]))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_padding_with_huge_log_prob_gaps_leaves_loss_and_gradient_finite(level):
    """Log-probs at padding are anything: a gap of 150 nats there overflows exp() to inf, and
    inf x a zero mask is NaN. The ratio and the k3 KL zero the gaps outside the mask first."""
    logps = torch.tensor([[-1.0, -200.0]], requires_grad=True)  # second position is padding
    old = torch.tensor([[-1.0, -350.0]])  # ratio exp(150) there
    ref = torch.tensor([[-1.2, -50.0]])
    mask = torch.tensor([[1.0, 0.0]])
    per_token, _ = clipped_surrogate(
        logps, old, torch.tensor([1.0]), mask, epsilon_low=0.2, epsilon_high=0.2,
        importance_level=level,
    )  # fmt: skip
    per_token = per_token + 0.1 * kl_k3(logps, ref, mask)
    loss = aggregate_loss(per_token, mask, "token_mean", 1.0)
    loss.backward()
    # the real token alone: -(r A) with r = 1, A = 1, plus 0.1 k3(delta = -0.2)
    k3 = math.exp(-0.2) + 0.2 - 1
    assert loss.item() == pytest.approx(-1 + 0.1 * k3, abs=1e-6)
    assert torch.isfinite(logps.grad).all() and logps.grad[0, 1] == 0


def test_each_loss_aggregation_by_hand():
    """per-token [[1, 2, 3], [4, 100, 100]] with the 100s on padding (mask [[1,1,1],[1,0,0]]):

    token_mean               (1 + 2 + 3 + 4) / 4 tokens          = 2.5
    seq_mean_token_mean      (mean(1,2,3) + mean(4)) / 2 = (2+4)/2 = 3.0
    seq_mean_token_sum_norm  (1 + 2 + 3 + 4) / (2 rows x 4 max)   = 1.25
    """
    per_token = torch.tensor([[1.0, 2, 3], [4, 100, 100]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    expected = {"token_mean": 2.5, "seq_mean_token_mean": 3.0, "seq_mean_token_sum_norm": 1.25}
    for mode, value in expected.items():
        d = loss_denominator([mask], mode, max_tokens=4)
        assert aggregate_loss(per_token, mask, mode, d).item() == pytest.approx(value), mode


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_give_the_whole_batch_gradient(mode):
    """Splitting a step's rows into micro-batches of uneven token counts, each normalised by
    the step-level denominator, must give exactly the whole batch's gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])

    def grad(parts):
        w = torch.tensor(0.7, requires_grad=True)
        d = loss_denominator([mask[p] for p in parts], mode, max_tokens=5)
        for p in parts:
            aggregate_loss(w * x[p] ** 2, mask[p], mode, d).backward()
        return w.grad

    whole = grad([slice(0, 4)])
    torch.testing.assert_close(grad([slice(0, 1), slice(1, 4)]), whole)
    torch.testing.assert_close(grad([slice(0, 3), slice(3, 4)]), whole)


def test_token_logps_match_log_softmax_in_chunks_with_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    t = 0.7
    direct = torch.log_softmax(logits / t, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (g_direct,) = torch.autograd.grad(direct.sum(), logits)
    chunked = token_logps(logits, targets, temperature=t, chunk_size=4)  # 15 rows: 4+4+4+3
    (g_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, direct)
    torch.testing.assert_close(g_chunked, g_direct)


def test_token_entropy_of_uniform_and_peaked_distributions():
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 1e4  # all mass on one token
    torch.testing.assert_close(
        token_entropy(logits, chunk_size=1), torch.tensor([[math.log(8), 0.0]])
    )


def test_token_entropy_gradient_in_chunks_equals_the_direct_one():
    """PPO's entropy bonus: H = -sum p log p per position, differentiated chunk by chunk
    (15 rows: 4 + 4 + 4 + 3) as through one softmax."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    logp = (logits / 0.7).log_softmax(-1)
    direct = -(logp.exp() * logp).sum(-1)
    (g_direct,) = torch.autograd.grad(direct.sum(), logits)
    chunked = token_entropy(logits, temperature=0.7, chunk_size=4)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, direct)
    torch.testing.assert_close(g_chunked, g_direct)


def _direct(logits, targets, temperature):
    """Log-probs of the targets and entropies from one whole log_softmax: the reference."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_entropies_from_logits_in_chunks_with_weighted_gradients(dtype):
    """The logits path (algo.fused_logps=false, and models whose output layer is not plain):
    log-probs and entropies of logits [3, 5, 11] 4 positions at a time at temperature 0.7
    equal one whole log_softmax, and so does the gradient of a loss that weighs each log-prob
    and each entropy differently; the gradient comes back in the logits' dtype."""
    from rltune.logps import logits_token_logps

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (3, 5))
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    logps, entropy = _direct(logits, targets, 0.7)
    (grad,) = torch.autograd.grad((a * logps).sum() + (b * entropy).sum(), logits)
    mine, mine_entropy = logits_token_logps(
        logits, targets, temperature=0.7, chunk_size=4, entropy=True
    )
    torch.testing.assert_close(mine, logps)
    torch.testing.assert_close(mine_entropy, entropy)
    (mine_grad,) = torch.autograd.grad((a * mine).sum() + (b * mine_entropy).sum(), logits)
    assert mine_grad.dtype == dtype
    torch.testing.assert_close(mine_grad, grad)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_log_probs_from_hidden_states_equal_the_logits_path(with_entropy):
    """algo.fused_logps: log-probs and entropies from hidden states [3, 5, 16] and an output
    weight [50, 16], 4 positions at a time (15 = 4 + 4 + 4 + 3), at temperature 0.7, equal
    token_logps and token_entropy on the logits hidden @ weight.T, and so do the gradients of
    a loss that weighs each log-prob and each entropy differently (the backward pass
    recomputes each chunk's logits)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    a, b = torch.randn(3, 5), torch.randn(3, 5)

    logps, entropy = _direct(hidden @ weight.T, targets, 0.7)
    loss = (a * logps).sum() + (b * entropy).sum() * with_entropy
    grads = torch.autograd.grad(loss, (hidden, weight))

    fused, fused_entropy = linear_token_logps(
        hidden, weight, targets, temperature=0.7, chunk_size=4, entropy=with_entropy
    )
    torch.testing.assert_close(fused, logps, rtol=1e-5, atol=1e-5)
    if with_entropy:
        torch.testing.assert_close(fused_entropy, entropy, rtol=1e-5, atol=1e-5)
        fused_loss = (a * fused).sum() + (b * fused_entropy).sum()
    else:
        assert fused_entropy is None
        fused_loss = (a * fused).sum()
    fused_grads = torch.autograd.grad(fused_loss, (hidden, weight))
    for plain, mine in zip(grads, fused_grads, strict=True):
        torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_log_probs_from_hidden_states_under_bf16_autocast(device):
    """Under autocast the output layer runs in bf16 as the model's own lm_head would, and the
    gradients come back in each input's dtype (fp32 master weights). On CUDA a chunk's bf16
    matmul may round differently from the whole one's, so there the log-probs are held to bf16
    tolerance (a logit of magnitude ~8 has a bf16 step of 0.03)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 16, device=device, requires_grad=True)
    weight = torch.randn(40, 16, device=device, requires_grad=True)
    targets = torch.randint(0, 40, (2, 6), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        logps = token_logps(hidden @ weight.T, targets)
        fused, _ = linear_token_logps(hidden, weight, targets, chunk_size=5)
    tolerance = {} if device == "cpu" else {"rtol": 2e-2, "atol": 6e-2}
    torch.testing.assert_close(fused, logps, **tolerance)  # the same bf16 logits, fp32 softmax
    grads = torch.autograd.grad(logps.sum(), (hidden, weight))
    fused_grads = torch.autograd.grad(fused.sum(), (hidden, weight))
    for plain, mine in zip(grads, fused_grads, strict=True):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, plain, rtol=2e-2, atol=2e-2)

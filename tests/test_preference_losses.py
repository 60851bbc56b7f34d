"""DPO-family and Bradley-Terry losses against values worked out by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from rltune.algos.dpo import DPO
from rltune.config import DPOConfig
from rltune.logps import IGNORE_INDEX, sequence_logps
from rltune.losses import bradley_terry_loss, dpo_loss, log1mexp, orpo_loss, simpo_loss


def _sig(x):
    return 1 / (1 + math.exp(-x))


# One pair: policy log-probs chosen -1.0, rejected -3.0; reference chosen -2.0, rejected -2.5.
# h = (-1 - -2) - (-3 - -2.5) = 1 + 0.5 = 1.5; beta = 0.5 -> beta*h = 0.75.
PAIR = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])]


def test_sigmoid_by_hand():
    """-log σ(0.75) = log(1 + e^-0.75) = 0.3868; rewards 0.5*1 = 0.5 and 0.5*(-0.5) = -0.25."""
    losses, rc, rr = dpo_loss(*PAIR, beta=0.5, loss_type="sigmoid")
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.75)), abs=1e-6)
    assert losses.item() == pytest.approx(0.386871, abs=1e-5)
    assert (rc.item(), rr.item()) == pytest.approx((0.5, -0.25))


def test_conservative_sigmoid_by_hand():
    """ε = 0.1: 0.9 * -log σ(0.75) + 0.1 * -log σ(-0.75) = 0.9*0.386871 + 0.1*1.136871 = 0.461871."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * 0.386871 + 0.1 * 1.136871, abs=1e-5)


def test_robust_by_hand():
    """ε = 0.1: (0.9 * 0.386871 - 0.1 * 1.136871) / 0.8 = (0.348184 - 0.113687) / 0.8 = 0.293121."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx((0.9 * 0.386871 - 0.1 * 1.136871) / 0.8, abs=1e-5)
    no_noise, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="robust", label_smoothing=0.0)
    assert no_noise.item() == pytest.approx(0.386871, abs=1e-5)  # ε = 0 is plain DPO


def test_ipo_by_hand():
    """(h - 1/(2β))² = (1.5 - 1)² = 0.25."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="ipo")
    assert losses.item() == pytest.approx(0.25)


def test_hinge_by_hand():
    """max(0, 1 - β h) = max(0, 1 - 0.75) = 0.25; with β = 1: max(0, 1 - 1.5) = 0."""
    assert dpo_loss(*PAIR, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.25)
    assert dpo_loss(*PAIR, beta=1.0, loss_type="hinge")[0].item() == 0.0


def test_policy_equal_to_reference_gives_log_two():
    """At step 0 the policy is the reference: h = 0 and the sigmoid loss is log 2."""
    x = torch.tensor([-4.0, -7.0])
    losses, rc, rr = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2.0)))
    assert torch.equal(rc, torch.zeros(2)) and torch.equal(rr, torch.zeros(2))


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match="'sigmod'"):
        dpo_loss(*PAIR, beta=0.1, loss_type="sigmod")


def test_bradley_terry_by_hand():
    """-log σ(2 - 1) = 0.313262; with margin 0.5: -log σ(0.5) = 0.474077."""
    c, r = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])
    assert bradley_terry_loss(c, r)[0].item() == pytest.approx(-math.log(_sig(1.0)), abs=1e-6)
    assert bradley_terry_loss(c, r, torch.tensor([0.0, 0.5]))[1].item() == pytest.approx(
        -math.log(_sig(0.5)), abs=1e-6
    )


def test_sequence_logps_by_hand():
    """Vocabulary 2, logits [0, 0] everywhere: every token has log-prob -ln 2. Row 0 labels two
    response tokens, row 1 one: sums -2 ln 2 and -ln 2."""
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1]]
    )
    logps, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [2, 1]
    assert logps.tolist() == pytest.approx([-2 * math.log(2), -math.log(2)])


def test_pairs_with_the_same_response_twice_are_reported(caplog):
    from rltune.config import ModelConfig
    from rltune.data.formats import DataError
    from rltune.data.loading import Record
    from rltune.data.preference import encode_pairs
    from rltune.models import load_tokenizer

    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "2+2=", "chosen": "4", "rejected": "4"},
        {"prompt": "3+3=", "chosen": "6", "rejected": "6"},
    ]
    records = [Record(row, "prefs.jsonl", i) for i, row in enumerate(rows)]
    with caplog.at_level("WARNING"):
        pairs, _, _ = encode_pairs(records, load_tokenizer(ModelConfig()), max_length=64)
    assert len(pairs) == 3  # kept: a warning, not an error
    assert "2 preference pairs have the same chosen and rejected response" in caplog.text
    assert "prefs.jsonl, row 1" in caplog.text
    # every pair a tie: nothing to learn, refused naming the first
    with pytest.raises(DataError, match=r"all 2 preference pairs .* \(first: prefs.jsonl, row 1\)"):
        encode_pairs(records[1:], load_tokenizer(ModelConfig()), max_length=64)


def test_ipo_loss_on_token_averages_and_rewards_of_whole_responses():
    """beta = 0.5, one pair. Chosen: policy -2 over 4 tokens, reference -4 (log-ratio 2, 0.5 per
    token); rejected: policy -3 over 1 token, reference -4 (log-ratio 1, 1 per token).

    IPO on per-token averages: h = 0.5 - 1 = -0.5, loss = (h - 1/(2 beta))^2 = (-1.5)^2 = 2.25.
    The logged rewards are beta x the whole responses' log-ratios, as for the other losses (and
    TRL): chosen 0.5 x 2 = 1.0, rejected 0.5 x 1 = 0.5, margin 0.5, accuracy 1. (From the
    per-token averages they would be 0.25 and 0.5: accuracy 0 for this pair.)"""
    cfg = DPOConfig(loss_type="ipo", beta=0.5)
    stub = SimpleNamespace(
        cfg=cfg,
        policy=None,
        _sides_logps=lambda model, batch: (torch.tensor([-2.0, -3.0]), torch.tensor([4, 1])),
    )
    losses, terms = DPO._pair_terms(stub, {"ref": torch.tensor([[-4.0, -4.0]])})
    torch.testing.assert_close(losses, torch.tensor([2.25]))
    torch.testing.assert_close(terms["rewards/chosen"], torch.tensor([1.0]))
    torch.testing.assert_close(terms["rewards/rejected"], torch.tensor([0.5]))
    torch.testing.assert_close(terms["rewards/margins"], torch.tensor([0.5]))
    torch.testing.assert_close(terms["rewards/accuracies"], torch.tensor([1.0]))


# --------------------------------------------------------------------- reference-free: SimPO, ORPO


def test_simpo_by_hand():
    """Average log-probs chosen -0.5, rejected -1.5; β = 2, γ = 1: z = 2 x (−0.5 + 1.5) − 1 = 1,
    loss = −log σ(1) = log(1 + e^−1) = 0.313262; rewards β x average: −1 and −3.
    With ε = 0.1: 0.9 x 0.313262 + 0.1 x log(1 + e^1) = 0.281936 + 0.131326 = 0.413262."""
    c, r = torch.tensor([-0.5]), torch.tensor([-1.5])
    losses, rc, rr = simpo_loss(c, r, beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert losses.item() == pytest.approx(0.313262, abs=1e-5)
    assert (rc.item(), rr.item()) == pytest.approx((-1.0, -3.0))
    smoothed, _, _ = simpo_loss(c, r, beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.413262, abs=1e-5)


def test_simpo_margin_gamma_shifts_the_loss():
    """Equal averages: z = −γ. γ = 0 gives log 2 = 0.693147; γ = 1 gives log(1 + e) = 1.313262."""
    x = torch.tensor([-2.0])
    assert simpo_loss(x, x, beta=2.0, gamma=0.0)[0].item() == pytest.approx(math.log(2))
    assert simpo_loss(x, x, beta=2.0, gamma=1.0)[0].item() == pytest.approx(1.313262, abs=1e-5)


def test_orpo_by_hand():
    """P(chosen) = 0.5 per token: odds 1, log odds 0; P(rejected) = 0.2: odds 0.25, log odds
    −1.386294. Log odds ratio 1.386294 = log 4, σ(log 4) = 0.8, log σ = −0.223144.
    NLL = −log 0.5 = 0.693147; λ = 0.1: loss = 0.693147 + 0.1 x 0.223144 = 0.715461."""
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    losses, nll, log_odds_ratio = orpo_loss(c, r, lam=0.1)
    assert log_odds_ratio.item() == pytest.approx(math.log(4), abs=1e-6)
    assert nll.item() == pytest.approx(0.693147, abs=1e-6)
    assert losses.item() == pytest.approx(0.715461, abs=1e-5)
    no_odds, _, _ = orpo_loss(c, r, lam=0.0)  # λ = 0 is SFT on the chosen response
    assert no_odds.item() == pytest.approx(0.693147, abs=1e-6)


def test_log1mexp_keeps_precision_at_both_ends():
    """log(1 − e^x): at x = −1e-10 it is log(1e-10) = −23.025851 (fp32's 1 − e^x is 0, so the
    naive form gives −inf); at x = −50 it is −e^−50 = −1.92875e-22 (the naive form gives 0)."""
    x = torch.tensor([-1e-10, -50.0, math.log(0.5)])
    out = log1mexp(x)
    assert torch.log(1 - torch.exp(x[:2])).tolist() == [-math.inf, 0.0]
    assert out[0].item() == pytest.approx(-23.025851, abs=1e-5)
    assert out[1].item() == pytest.approx(-1.92875e-22, rel=1e-4)
    assert out[2].item() == pytest.approx(math.log(0.5), abs=1e-7)


def test_orpo_with_a_certain_chosen_response_stays_finite():
    """A chosen average of exactly 0 (every token certain) has odds P / (1 − P) = inf: its log
    odds are capped at those of −1e-6, −1e-6 − log(1 − e^−1e-6) = 13.815510; the loss and its
    gradient stay finite (the NLL term's gradient, −1, still flows)."""
    c = torch.tensor([0.0], requires_grad=True)
    r = torch.tensor([math.log(0.5)], requires_grad=True)
    losses, _, log_odds_ratio = orpo_loss(c, r, lam=0.1)
    losses.sum().backward()
    assert log_odds_ratio.item() == pytest.approx(13.815510, abs=1e-3)
    assert torch.isfinite(losses).all() and torch.isfinite(c.grad).all()
    assert torch.isfinite(r.grad).all() and c.grad.item() == pytest.approx(-1.0)


def _reference_free_terms(cfg, sums, counts):
    """DPO._pair_terms with the policy's summed log-probs and response token counts [2B] given,
    and no reference at all: calling one would fail."""
    stub = SimpleNamespace(cfg=cfg, policy=None, _sides_logps=lambda model, batch: (sums, counts))
    return DPO._pair_terms(stub, {})


def test_simpo_pair_terms_average_over_each_responses_tokens():
    """Chosen: summed log-prob −2 over 4 tokens (average −0.5); rejected: −4.5 over 3 (−1.5).
    β = 2, γ = 1: as in test_simpo_by_hand, loss 0.313262, rewards −1 and −3, margin 2,
    accuracy 1; logps/* stay the sums. (On the sums, z = 2 x 2.5 − 1 = 4: loss 0.018150.)"""
    cfg = DPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    losses, terms = _reference_free_terms(cfg, torch.tensor([-2.0, -4.5]), torch.tensor([4, 3]))
    torch.testing.assert_close(losses, torch.tensor([0.313262]), atol=1e-5, rtol=0)
    expected = {
        "rewards/chosen": -1.0,
        "rewards/rejected": -3.0,
        "rewards/margins": 2.0,
        "rewards/accuracies": 1.0,
        "logps/chosen": -2.0,
        "logps/rejected": -4.5,
    }
    assert {k: terms[k].item() for k in expected} == pytest.approx(expected)


def test_orpo_pair_terms_and_metrics():
    """Chosen: 2 tokens of probability 0.5 (sum 2 log 0.5, average log 0.5); rejected: 3 of
    0.2 (average log 0.2). λ = β = 0.1: as in test_orpo_by_hand, loss 0.715461, nll_loss
    0.693147, log_odds_chosen (the log odds ratio) log 4 = 1.386294, log_odds_ratio
    log σ(log 4) = log 0.8 = −0.223144; rewards β x average: 0.1 log 0.5 = −0.069315 and
    0.1 log 0.2 = −0.160944, margin 0.091629."""
    cfg = DPOConfig(loss_type="orpo", beta=0.1)
    sums = torch.tensor([2 * math.log(0.5), 3 * math.log(0.2)])
    losses, terms = _reference_free_terms(cfg, sums, torch.tensor([2, 3]))
    torch.testing.assert_close(losses, torch.tensor([0.715461]), atol=1e-5, rtol=0)
    expected = {
        "nll_loss": 0.693147,
        "log_odds_chosen": 1.386294,
        "log_odds_ratio": -0.223144,
        "rewards/chosen": -0.069315,
        "rewards/rejected": -0.160944,
        "rewards/margins": 0.091629,
        "rewards/accuracies": 1.0,
    }
    assert {k: terms[k].item() for k in expected} == pytest.approx(expected, abs=1e-5)

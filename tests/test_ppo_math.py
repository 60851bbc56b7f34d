"""PPO, RLOO and REINFORCE pure functions against values worked out by hand."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from rltune.advantages import (
    explained_variance,
    gae,
    kl_shaped_rewards,
    masked_whiten,
    reinforce_advantages,
    rloo_advantages,
    sequence_scores,
)
from rltune.algos.grpo import GRPO
from rltune.config import GRPOConfig
from rltune.losses import clipped_value_loss


def test_gae_with_an_early_ending_completion_and_padding():
    """gamma = 0.9, lam = 0.5. Row 0 has 3 real tokens, row 1 ends after 1 (then padding, whose
    rewards and values are garbage and must not leak in).

    Row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7]
        t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                      A = 0.3
        t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03                   A = 0.03 + 0.45*0.3 = 0.165
        t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04                   A = 0.04 + 0.45*0.165 = 0.11425
        returns = A + V = [0.61425, 0.765, 1.0]
    Row 1: r = [2], V = [0.5]: A = 2 - 0.5 = 1.5 (no bootstrap past the end), returns [2.0]
    """
    rewards = torch.tensor([[0.0, 0, 1], [2, 9, 9]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 7, 7]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards * mask, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.11425, 0.165, 0.3], [1.5, 0, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.61425, 0.765, 1.0], [2.0, 0, 0]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.6, 0.5, 0.3]]))
    torch.testing.assert_close(adv, ret - values)


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    """kl_coef 0.1; logp - ref = [0.5, -0.2, 0.3 | 1.0, (pad)]; scores [1, -1].
    Row 0: [-0.05, 0.02, -0.03 + 1] ; row 1 (one real token): [-0.1 - 1, 0, 0]."""
    logps = torch.tensor([[0.5, -0.2, 0.3], [1.0, 4.0, 4.0]])
    ref = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    got = kl_shaped_rewards(torch.tensor([1.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(got, torch.tensor([[-0.05, 0.02, 0.97], [-1.1, 0, 0]]))


def test_masked_whiten_ignores_padding():
    """Real values [1, 2, 3, 4] (mean 2.5, population var 1.25); the pad value 100 is ignored
    and stays 0."""
    x = torch.tensor([[1.0, 2, 100], [3, 4, 100]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0]])
    s = math.sqrt(1.25 + 1e-8)
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0], [0.5 / s, 1.5 / s, 0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), (expected + 2.5) * mask)


def test_sequence_scores_clip_then_penalise_the_cut_completions():
    """clip 1, missing_eos_penalty 2; scores [2, -3, 0.5, 0.5], cut [no, yes, yes, no].
    Clipped: [1, -1, 0.5, 0.5]; the cut ones then lose 2: [1, -3, -1.5, 0.5]. (The penalty first
    would give -5 -> -1 for the second, the same as a finished -3: the penalty lost.)"""
    scores = torch.tensor([2.0, -3.0, 0.5, 0.5])
    cut = torch.tensor([False, True, True, False])
    got = sequence_scores(scores, cut, clip=1.0, missing_eos_penalty=2.0)
    torch.testing.assert_close(got, torch.tensor([1.0, -3.0, -1.5, 0.5]))
    torch.testing.assert_close(
        sequence_scores(scores, cut, clip=1.0), torch.tensor([1.0, -1.0, 0.5, 0.5])
    )
    torch.testing.assert_close(sequence_scores(scores, cut), scores)


def test_whitened_rewards_keep_their_mean():
    """TRL's whiten_rewards: masked_whiten(shift_mean=False) over the completion tokens, then
    GAE. Token rewards [0, 0, 4 | 4, pad, pad]: mean 2, population var 4, std 2, so
    (r - 2) / 2 + 2 = [1, 1, 3 | 3]. With gamma = lam = 1 and V = 0 the returns are the rewards
    to go: [5, 4, 3 | 3]. (With the mean removed too, r would be [-1, -1, 1 | 1] and every token
    would carry -mean: a completion's return would depend on its length.)"""
    rewards = torch.tensor([[0.0, 0, 4], [4, 9, 9]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    whitened = masked_whiten(rewards, mask, shift_mean=False)
    torch.testing.assert_close(whitened, torch.tensor([[1.0, 1, 3], [3, 0, 0]]))
    _, returns = gae(whitened, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[5.0, 4, 3], [3, 0, 0]]))


def test_masked_whiten_over_two_ranks_whitens_the_whole_batch():
    """Rank 0 holds the rewards [0, 0, 4], rank 1 holds [4] (one token, then padding). With
    `reduce` summing over both (two threads stand in for the processes), each rank gets its
    share of the single-process result above, [1, 1, 3] and [3], not its own statistics (rank
    1 alone has std 0 and would keep 4)."""
    shards = [
        (torch.tensor([[0.0, 0, 4]]), torch.tensor([[1.0, 1, 1]])),
        (torch.tensor([[4.0, 9, 9]]), torch.tensor([[1.0, 0, 0]])),
    ]
    barrier, posted = threading.Barrier(2), [None, None]

    def all_reduce(rank: int, t: torch.Tensor) -> torch.Tensor:
        posted[rank] = t
        barrier.wait()
        total = posted[0] + posted[1]
        barrier.wait()  # both have read before the next statistic is posted
        return total

    def whiten(rank: int) -> torch.Tensor:
        x, mask = shards[rank]
        return masked_whiten(x, mask, shift_mean=False, reduce=lambda t: all_reduce(rank, t))

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(whiten, [0, 1]))
    torch.testing.assert_close(got[0], torch.tensor([[1.0, 1, 3]]))
    torch.testing.assert_close(got[1], torch.tensor([[3.0, 0, 0]]))


def test_clipped_value_loss_by_hand():
    """cliprange 0.2, returns R = 1.
    V = 0.9, V_old = 0.5: clipped V = 0.7; max((0.9-1)^2, (0.7-1)^2) = 0.09 -> 0.045, clipped
    V = 1.1, V_old = 1.0: clipped V = 1.1 (inside); max(0.01, 0.01) -> 0.005, not clipped."""
    loss, clipped = clipped_value_loss(
        torch.tensor([0.9, 1.1]), torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]), cliprange=0.2
    )
    torch.testing.assert_close(loss, torch.tensor([0.045, 0.005]))
    assert clipped.tolist() == [True, False]


def test_rloo_baseline_is_the_mean_of_the_others():
    """Group [1, 0, 0, 1]: baselines are the others' mean: r0: (0+0+1)/3 = 1/3 -> A = 2/3;
    r1: (1+0+1)/3 = 2/3 -> A = -2/3. With a NaN: [1, NaN, 0, 0] -> r0: A = 1 - 0 = 1,
    r2: A = 0 - 0.5 = -0.5, the NaN sample 0."""
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, 0, 0, 1]), 4),
        torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]),
    )
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, float("nan"), 0, 0]), 4),
        torch.tensor([1.0, 0.0, -0.5, -0.5]),
    )


def test_rloo_whitening_leaves_out_completions_without_an_advantage():
    """Groups of 2: [1, 0], [NaN, 3], [2, 5]. Leave-one-out advantages: [1, -1], none (the NaN
    has no reward, the 3 no other sample to compare with), [-3, 3]. Whitened over the four
    that exist: mean 0, unbiased variance (1 + 1 + 9 + 9) / 3 = 20/3, so A / (sqrt(20/3) +
    1e-4); the two without an advantage stay 0. (Counting them as zeros gives variance
    20/5 = 4 and advantages [0.5, -0.5, 0, 0, -1.5, 1.5], all too large by sqrt(5/3).)"""
    r = torch.tensor([1.0, 0.0, float("nan"), 3.0, 2.0, 5.0])
    s = math.sqrt(20 / 3) + 1e-4
    torch.testing.assert_close(
        rloo_advantages(r, 2, normalize=True),
        torch.tensor([1 / s, -1 / s, 0.0, 0.0, -3 / s, 3 / s]),
    )
    torch.testing.assert_close(rloo_advantages(r, 2), torch.tensor([1.0, -1, 0, 0, -3, 3]))
    # algo=rloo algo.scale_rewards=batch takes the same path
    cfg = GRPOConfig(estimator="rloo", scale_rewards="batch", group_size=2)
    torch.testing.assert_close(
        GRPO._advantages(SimpleNamespace(cfg=cfg), r),
        torch.tensor([1 / s, -1 / s, 0.0, 0.0, -3 / s, 3 / s]),
    )


def test_reinforce_baseline_and_normalisation():
    """Rewards [1, 0, 1, NaN], baseline 0.25: A = [0.75, -0.25, 0.75, 0]. Normalised over the
    three real ones: mean 5/12, std (unbiased) of [0.75, -0.25, 0.75] = sqrt(1/3)."""
    r = torch.tensor([1.0, 0, 1, float("nan")])
    torch.testing.assert_close(reinforce_advantages(r, 0.25), torch.tensor([0.75, -0.25, 0.75, 0]))
    s = math.sqrt(1 / 3) + 1e-4
    m = 5 / 12
    torch.testing.assert_close(
        reinforce_advantages(r, 0.25, normalize=True),
        torch.tensor([(0.75 - m) / s, (-0.25 - m) / s, (0.75 - m) / s, 0.0]),
    )


def test_explained_variance():
    target = torch.tensor([[1.0, 2, 3, 4]])
    mask = torch.ones(1, 4)
    assert explained_variance(target, target, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), target, mask) == pytest.approx(0.0)


def _rs_stub(rewards, truncated, threshold=0.5):
    """A RejectionSampling with its sampling replaced: 2 prompts x 2 completions whose rewards
    and truncation are given, completion k of prompt i being the single token 10 * i + k."""
    from rltune.algos.rs import RejectionSampling

    rs = object.__new__(RejectionSampling)
    rs.cfg = SimpleNamespace(group_size=2, prompts_per_round=2, threshold=threshold, sample_every=0)
    rs.accepted, rs.rounds = [], 0
    prompts = [SimpleNamespace(ids=[1], prompt="p0"), SimpleNamespace(ids=[2], prompt="p1")]
    rollout = SimpleNamespace(
        completion_ids=torch.tensor([[0], [1], [10], [11]]),
        completion_mask=torch.ones(4, 1, dtype=torch.long),
        truncated=torch.tensor(truncated),
        completions=["c0", "c1", "c10", "c11"],
    )
    scores = SimpleNamespace(total=torch.tensor(rewards))
    rs.sample_prompts = lambda n: (prompts, rollout, scores, {})
    rs.rollout_metrics = lambda rollout, scores: {"reward": float(scores.total.mean())}
    return rs


def test_rejection_sampling_keeps_the_best_finished_completion():
    """Prompt 0: the best (0.9) was truncated, the other (0.7) finished and passes: it is kept.
    Prompt 1: the only passing one (0.8) was truncated: nothing is kept."""
    rs = _rs_stub([0.7, 0.9, 0.8, 0.1], [False, True, True, False])
    metrics = rs._round()
    assert rs.accepted == [([1], [0])]
    assert metrics["acceptance_rate"] == 0.5
    assert rs.last_samples == [
        {"prompt": "p0", "completion": "c0", "reward": pytest.approx(0.7), "accepted": True},
        {"prompt": "p1", "completion": "c11", "reward": pytest.approx(0.1), "accepted": False},
    ]


def test_rejection_sampling_reports_the_mean_over_a_steps_rounds():
    """Two rounds are needed for 2 accepted examples (one a round); the step reports their mean
    reward (0.625 and 0.475), not the last round's alone."""
    rs = _rs_stub([0.7, 0.9, 0.8, 0.1], [False, True, True, False])
    rs.steps, rs.ctx = 0, SimpleNamespace(device=torch.device("cpu"))
    rs._collate = lambda examples: examples
    rounds = [
        _rs_stub(r, [False, True, True, False]).sample_prompts(2)
        for r in ([0.7, 0.9, 0.8, 0.1], [0.2, 0.3, 0.4, 1.0])
    ]
    rs.sample_prompts = lambda n: rounds.pop(0)
    batches = rs.next_batches(1, 2)
    metrics, _ = rs.report()
    assert batches == [[([1], [0]), ([2], [11])]]
    assert metrics["acceptance_rate"] == 0.5
    assert metrics["reward"] == pytest.approx((0.625 + 0.475) / 2)
    assert metrics["rounds"] == 2.0


def test_rejection_sampling_averages_each_metric_over_the_rounds_that_report_it():
    """A reward function that scores nothing in a round reports no mean for it: the step's
    metric is the mean of the rounds that have it, not a KeyError."""
    rs = _rs_stub([0.7, 0.9, 0.8, 0.1], [False, True, True, False])
    rs.steps, rs.ctx = 0, SimpleNamespace(device=torch.device("cpu"))
    rs._collate = lambda examples: examples
    reports = iter([{"reward": 0.5, "rewards/f/mean": 0.25}, {"reward": 0.3}])
    rs.rollout_metrics = lambda rollout, scores: next(reports)
    rs.next_batches(1, 2)
    metrics, _ = rs.report()
    assert metrics["reward"] == pytest.approx(0.4) and metrics["rewards/f/mean"] == 0.25

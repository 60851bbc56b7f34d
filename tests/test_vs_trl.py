"""rltune's losses against TRL's own code, on the same small random tensors.

TRL computes its losses inside trainer methods. These tests call those methods unbound, with a
stand-in `self` holding only the attributes they read and a stand-in model that returns fixed
per-token log-probs or scores, so what is compared is TRL's arithmetic with rltune's
(`DPO._pair_terms`/`DPO.loss`, `GRPO.loss`, `RewardModelTraining._terms`, `group_stats`).
Written against TRL 1.16; skipped where TRL is not installed.

Not here, because TRL's math sits inside a method that also samples and scores (or no longer
exists): GRPO's and RLOO's advantages (`_generate_and_score_completions`) and PPO's rewards,
GAE and whitening (TRL 1.16 has no PPOTrainer). Their hand-computed tests are in
test_grpo_losses.py and test_ppo_math.py.

SimPO is compared with TRL's CPOTrainer (loss_type="simpo", cpo_alpha=0) and ORPO with its
ORPOTrainer, both under trl.experimental in 1.16, from the same logits: TRL's own
`concatenated_forward` averages the log-probs there, rltune's `response_logps` and `DPO.loss`
here.

Differences by design, so not compared: conservative DPO (`loss_type=sigmoid` with
`label_smoothing>0`; TRL 1.16's sigmoid has no smoothing), and RPO's NLL on pairs of unequal
length (rltune averages each chosen response over its own tokens, then over pairs, as the RPO
paper does; TRL's `sft` loss averages over all chosen tokens of the batch). The same holds for
ORPO's NLL term, which TRL also takes over the prompt's tokens: it is compared where a
one-token prompt (never predicted) and chosen responses of one length make the two equal, and
otherwise the loss less its NLL is. `logps/chosen` and `logps/rejected` stay summed log-probs
in rltune for every loss type; TRL's CPO and ORPO log per-token averages under those names.
"""

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
if not trl.__version__.startswith(
    "1.16."
):  # the test extra's pin: other releases' internals differ
    pytest.skip(f"written against TRL 1.16, found {trl.__version__}", allow_module_level=True)
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
reward_trainer = pytest.importorskip("trl.trainer.reward_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

from rltune.advantages import group_advantages, group_stats  # noqa: E402
from rltune.algos.dpo import DPO, response_logps  # noqa: E402
from rltune.algos.grpo import GRPO  # noqa: E402
from rltune.algos.rm import RewardModelTraining  # noqa: E402
from rltune.config import DPOConfig, GRPOConfig  # noqa: E402
from rltune.losses import loss_denominator  # noqa: E402


def _accelerator():
    """One process: gathers and reductions are the identity."""
    same = lambda x, *a, **k: x  # noqa: E731
    return SimpleNamespace(
        device="cpu",
        num_processes=1,
        gather=same,
        gather_for_metrics=same,
        reduce=same,
        sync_gradients=True,
    )


def _trl_self(**attrs):
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


# ----------------------------------------------------------------------------------------- DPO


def _pairs(seed: int, pairs: int, width: int, equal_lengths: bool):
    """Per-token policy and reference log-probs [2B, T] (chosen rows, then rejected) and the
    response mask [2B, T]."""
    g = torch.Generator().manual_seed(seed)
    policy = -2 * torch.rand(2 * pairs, width, generator=g)
    ref = -2 * torch.rand(2 * pairs, width, generator=g)
    if equal_lengths:
        lengths = torch.full((2 * pairs,), width - 2)
    else:
        lengths = torch.randint(1, width + 1, (2 * pairs,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    return policy * mask, ref * mask, mask


def _trl_dpo(policy, ref, mask, *, beta, loss_types, loss_weights, label_smoothing):
    """DPOTrainer._compute_loss on these log-probs: the model returns them as its per-token
    log-probs, the reference's come precomputed. Returns (loss, TRL's metrics)."""
    rows, width = policy.shape
    out = SimpleNamespace(
        log_probs=policy,
        entropy=torch.zeros(rows, width),
        mean_logits=torch.zeros(rows, width),
        is_top1=torch.zeros(rows, width, dtype=torch.bool),
    )
    me = _trl_self(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    ref_chosen, ref_rejected = ref.sum(-1).chunk(2)
    inputs = {  # the completion mask is one longer: TRL shifts it by one position
        "input_ids": torch.zeros(rows, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(rows, 1), mask], 1).long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(me, lambda **kw: out, inputs, False)
    return loss, {k: v[0] for k, v in me._metrics["train"].items()}


def _rltune_dpo(policy, ref, mask, cfg: DPOConfig):
    """DPO.loss over one micro-batch holding the whole step."""
    stub = SimpleNamespace(cfg=cfg, policy=None)
    stub._sides_logps = lambda model, batch: (policy.sum(-1), mask.sum(-1))
    stub._pair_terms = lambda batch: DPO._pair_terms(stub, batch)
    pairs = policy.shape[0] // 2
    batch = {"ref": torch.stack(ref.sum(-1).chunk(2), 1), "num_tokens": 0}  # [B, 2]
    return DPO.loss(stub, batch, float(pairs))


@pytest.mark.parametrize(
    "loss_type, label_smoothing",
    [
        ("sigmoid", 0.0),
        ("robust", 0.0),
        ("robust", 0.2),
        ("ipo", 0.0),
        ("hinge", 0.0),
    ],
)
def test_dpo_losses_and_metrics_match_trl(loss_type, label_smoothing):
    """Responses of unequal length: IPO's per-token averages are exercised."""
    policy, ref, mask = _pairs(0, pairs=6, width=7, equal_lengths=False)
    beta = 0.3
    trl_loss, trl_metrics = _trl_dpo(
        policy,
        ref,
        mask,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
    )
    cfg = DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    loss, metrics = _rltune_dpo(policy, ref, mask, cfg)
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-6)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-6), key


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_matches_trl_sigmoid_plus_sft_on_equal_lengths(loss_type):
    """rltune's sft_weight = w is TRL's loss_type [loss, "sft"] with weights [1, w] when every
    chosen response has the same length (see the module docstring for unequal lengths)."""
    policy, ref, mask = _pairs(1, pairs=5, width=7, equal_lengths=True)
    trl_loss, _ = _trl_dpo(
        policy,
        ref,
        mask,
        beta=0.1,
        loss_types=[loss_type, "sft"],
        loss_weights=[1.0, 0.5],
        label_smoothing=0.0,
    )
    loss, _ = _rltune_dpo(
        policy, ref, mask, DPOConfig(beta=0.1, loss_type=loss_type, sft_weight=0.5)
    )
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-6)


# ------------------------------------------------------------------- SimPO and ORPO (no reference)


def _trl_experimental(name: str):
    """trl.experimental.<name>.<name>_trainer, or a skip where this TRL lacks it."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its import warns that it may change
    return pytest.importorskip(f"trl.experimental.{name}.{name}_trainer")


def _logits_and_rows(seed: int, chosen_lengths, rejected_lengths, *, prompt: int, vocab=11):
    """Random logits [2B, T, V] (chosen rows, then rejected) and TRL's batch of rows
    [prompt | response | padding]: labels -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = list(chosen_lengths) + list(rejected_lengths)
    width = prompt + max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    attention = (torch.arange(width)[None] < prompt + torch.tensor(lengths)[:, None]).long()
    ids = ids * attention  # padding id 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :prompt] = -100
    logits = 2 * torch.randn(len(lengths), width, vocab, generator=g)
    pairs = len(chosen_lengths)
    rows = {}
    for side, part in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None))):
        rows |= {
            f"{side}_input_ids": ids[part],
            f"{side}_attention_mask": attention[part],
            f"{side}_labels": labels[part],
        }
    return logits, rows


def _rltune_pairs(logits, rows, cfg: DPOConfig):
    """DPO.loss over one micro-batch holding the whole step, the log-probs and token counts
    taken from `logits` by `response_logps` (a row per side)."""
    batch = {
        key: torch.cat([rows[f"chosen_{key}"], rows[f"rejected_{key}"]])
        for key in ("input_ids", "attention_mask", "labels")
    }
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    stub = SimpleNamespace(cfg=cfg, policy=model)  # no reference: calling one would fail
    stub._sides_logps = lambda model, batch: response_logps(model, batch, None)
    stub._pair_terms = lambda batch: DPO._pair_terms(stub, batch)
    pairs = len(logits) // 2
    return DPO.loss(stub, batch | {"num_tokens": 0}, float(pairs))


def _trl_reference_free(trainer, logits, rows, **attrs):
    """TRL's get_batch_loss_metrics, its concatenated_forward run on a model that returns
    `logits`. Returns (loss, TRL's metrics)."""
    me = SimpleNamespace(
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        is_encoder_decoder=False,
        pad_token_id=0,
        padding_value=0,
        **attrs,
    )
    for name in ("concatenated_inputs", "get_batch_logps"):  # static methods
        setattr(me, name, getattr(trainer, name))
    for name in ("concatenated_forward", "cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer, name):
            setattr(me, name, getattr(trainer, name).__get__(me))
    model = lambda *a, **kw: SimpleNamespace(logits=logits)  # noqa: E731
    return trainer.get_batch_loss_metrics(me, model, rows, "train")


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.mark.parametrize(
    "beta, gamma, label_smoothing, nll_weight",
    [(2.0, 1.0, 0.0, 0.0), (0.1, 0.5, 0.0, 0.0), (2.5, 1.2, 0.1, 0.0), (2.0, 1.0, 0.0, 0.5)],
)
def test_simpo_loss_and_metrics_match_trls_cpo(beta, gamma, label_smoothing, nll_weight):
    """Responses of unequal length, prompts of three tokens: the per-token averages count the
    response tokens only. nll_weight: rltune's sft_weight against TRL's cpo_alpha (CPO-SimPO),
    on chosen responses of one length (TRL averages the NLL over the batch's chosen tokens)."""
    cpo = _trl_experimental("cpo").CPOTrainer
    chosen = [4, 4, 4, 4, 4] if nll_weight else [1, 5, 3, 6, 2]
    logits, rows = _logits_and_rows(0, chosen, [2, 6, 4, 1, 5], prompt=3)
    trl_loss, trl_metrics = _trl_reference_free(
        cpo,
        logits,
        rows,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        cpo_alpha=nll_weight,
        alpha=0.0,
    )
    cfg = DPOConfig(
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        sft_weight=nll_weight,
    )
    loss, metrics = _rltune_pairs(logits, rows, cfg)
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-6)
    for key in REWARDS:
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-6), key
    summed = cpo.get_batch_logps(
        logits, torch.cat([rows["chosen_labels"], rows["rejected_labels"]])
    )
    assert metrics["logps/chosen"] == pytest.approx(summed[:5].mean().item(), abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss_and_metrics_match_trl_where_their_nll_agrees(beta):
    """A one-token prompt (no position predicts it) and chosen responses of one length: TRL's
    NLL over prompt and response tokens of the batch equals rltune's mean of per-response NLLs.
    Rejected responses of unequal length exercise the per-token averages of the odds."""
    orpo = _trl_experimental("orpo").ORPOTrainer
    logits, rows = _logits_and_rows(1, [3, 3, 3, 3], [1, 5, 2, 4], prompt=1)
    trl_loss, trl_metrics = _trl_reference_free(orpo, logits, rows, beta=beta)
    loss, metrics = _rltune_pairs(logits, rows, DPOConfig(loss_type="orpo", beta=beta))
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-6)
    for key in (*REWARDS, "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-6), key


def test_orpo_odds_ratio_term_matches_trl_on_any_lengths():
    """Prompts of four tokens and chosen responses of unequal length: the NLL terms differ by
    design (module docstring); the loss less its NLL, and the odds and rewards, do not."""
    orpo = _trl_experimental("orpo").ORPOTrainer
    logits, rows = _logits_and_rows(2, [2, 6, 1, 4, 3], [5, 1, 3, 2, 6], prompt=4)
    trl_loss, trl_metrics = _trl_reference_free(orpo, logits, rows, beta=0.2)
    loss, metrics = _rltune_pairs(logits, rows, DPOConfig(loss_type="orpo", beta=0.2))
    assert loss.item() - metrics["nll_loss"] == pytest.approx(
        trl_loss.item() - trl_metrics["nll_loss"], abs=1e-6
    )
    assert metrics["nll_loss"] != pytest.approx(trl_metrics["nll_loss"], abs=1e-3)
    for key in (*REWARDS, "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-6), key


# ---------------------------------------------------------------------------------------- GRPO

# rltune's algo.loss_agg and the TRL loss_type that divides by the same thing
AGGREGATIONS = [
    ("token_mean", "dapo"),
    ("seq_mean_token_mean", "grpo"),
    ("seq_mean_token_sum_norm", "dr_grpo"),
]


@pytest.mark.parametrize("loss_agg, trl_loss_type", AGGREGATIONS)
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("epsilon, epsilon_high", [(0.2, None), (0.1, 0.28)])
@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_grpo_loss_gradient_and_metrics_match_trl(
    loss_agg, trl_loss_type, importance_level, epsilon, epsilon_high, kl_coef
):
    """8 completions in groups of 4, up to 6 tokens, old and reference log-probs 0.3 nats
    away per token (so both clip bounds are hit), one completion masked out as
    mask_truncated / mask_truncated_completions do. One micro-batch is the whole step."""
    g = torch.Generator().manual_seed(0)
    rows, width = 8, 6
    start = -3 * torch.rand(rows, width, generator=g)
    old = start + 0.3 * torch.randn(rows, width, generator=g)
    ref = start + 0.3 * torch.randn(rows, width, generator=g)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    mask[3] = 0  # a truncated completion
    advantages = group_advantages(torch.randn(rows, generator=g), 4)

    logps = start.clone().requires_grad_()
    cfg = GRPOConfig(
        loss_agg=loss_agg,
        importance_level=importance_level,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        kl_coef=kl_coef,
    )
    stub = SimpleNamespace(cfg=cfg, policy_logps=lambda batch: (logps, torch.zeros(rows, width)))
    batch = {
        "old_logps": old,
        "loss_mask": mask,
        "advantages": advantages,
        "step_tokens": float(mask.sum()),
        "num_tokens": 0.0,
    } | ({"ref_logps": ref} if kl_coef else {})
    loss, metrics = GRPO.loss(stub, batch, loss_denominator([mask], loss_agg, max_tokens=width))
    loss.backward()

    trl_logps = start.clone().requires_grad_()
    me = _trl_self(
        _get_per_token_logps_and_entropies=lambda *a, **k: (
            trl_logps,
            torch.zeros(rows, width),
            None,
        ),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_level,
        beta=kl_coef,
        loss_type=trl_loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=width,
        _entropy_bonus_enabled=False,
    )
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    trl_loss = grpo_trainer.GRPOTrainer._compute_loss(me, None, inputs)
    trl_loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(logps.grad, trl_logps.grad, rtol=0, atol=1e-6)
    trl_metrics = me._metrics["train"]
    if kl_coef:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"][0], abs=1e-6)
    if importance_level == "token":  # GSPO: TRL counts clipped completions, rltune tokens
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert metrics[key] == pytest.approx(trl_metrics[key][0], abs=1e-6), key


def test_group_std_is_trls_nanstd():
    """The std of GRPO's group advantages has TRL's Bessel correction and skips NaN rewards
    (TRL's nanstd is NaN for a group with one reward, where rltune's is 0: the advantage is 0
    either way)."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g)
    rewards[[1, 6, 13]] = float("nan")
    rewards[16:20] = 0.5  # all equal
    _, std = group_stats(rewards, 4)
    torch.testing.assert_close(std, trl_utils.nanstd(rewards.view(-1, 4), dim=1), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- reward models


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_model_loss_and_metrics_match_trl(with_margin):
    g = torch.Generator().manual_seed(0)
    pairs = 6
    scores = 2 * torch.randn(2 * pairs, generator=g)  # chosen rows, then rejected
    margin = torch.rand(pairs, generator=g)
    out = SimpleNamespace(logits=scores[:, None])
    me = _trl_self(args=SimpleNamespace(center_rewards_coefficient=None))
    inputs = {
        "input_ids": torch.zeros(2 * pairs, 3, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, 3, dtype=torch.long),
    } | ({"margin": margin} if with_margin else {})
    trl_loss = reward_trainer.RewardTrainer.compute_loss(me, lambda **kw: out, inputs)

    stub = SimpleNamespace(scores=lambda batch: scores.chunk(2))
    batch = {"margin": margin if with_margin else torch.zeros(pairs)}
    losses, terms = RewardModelTraining._terms(stub, batch)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=0, atol=1e-6)
    for key in ("accuracy", "margin"):
        assert terms[key].mean().item() == pytest.approx(me._metrics["train"][key][0], abs=1e-6)

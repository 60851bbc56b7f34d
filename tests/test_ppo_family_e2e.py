"""PPO (four models), RLOO, REINFORCE and rejection sampling end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import crash_and_resume, small_model_config

from rltune.cli import run
from rltune.logging import read_metrics

pytestmark = pytest.mark.slow


def _rows(run_dir, key="loss"):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def _evals(run_dir):
    return [r["eval/accuracy"] for r in _rows(run_dir, "eval/accuracy")]


@pytest.mark.parametrize(
    ("algo", "gain"), [("ppo", 0.10), ("rloo", 0.05), ("reinforce", 0.05), ("rs", 0.05)]
)
def test_default_run_raises_task_accuracy(tmp_path, algo, gain):
    """Each algorithm's default on the tiny model (conf/tuned/<algo>_tiny.yaml), 1-3 min here."""
    run_dir = run([f"algo={algo}", f"hydra.run.dir={tmp_path}"])
    evals = _evals(run_dir)
    assert evals[-1] >= evals[0] + gain, evals


def test_ppo_logs_its_four_components_and_metrics(tmp_path):
    run_dir = run(
        [
            "algo=ppo",
            "train.max_steps=4",
            "train.batch_size=32",
            "train.micro_batch_size=16",
            "algo.ppo_epochs=2",
            "algo.num_minibatches=2",
            "train.log_every=1",
            "train.eval_samples=16",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    log = (run_dir / "cli.log").read_text()
    assert "ppo pipeline: policy (trained) | reference: frozen copy | value model (trained" in log
    assert "reward: no reward model + functions ['arith']" in log
    for role in ("policy", "reference", "value"):
        assert f"{role}: 854," in log
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["step"] > 0]
    # a rollout of 64 serves 2 epochs x 2 minibatches = 4 steps: rollout metrics on step 1 only
    assert ["reward" in r for r in train] == [True, False, False, False]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    expected = {
        "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "value/clipfrac",
        "entropy", "grad_norm", "grad_norm/value",
    }  # fmt: skip
    assert expected <= set(train[-1])
    assert {"returns/mean", "advantages/mean", "value/explained_var", "kl_coef"} <= set(train[0])
    assert train[0]["ppo/approx_kl"] == 0.0 and train[-1]["ppo/approx_kl"] > 0
    assert (run_dir / "final" / "value" / "config.json").exists()


def test_ppo_with_a_reward_model_runs_the_four_model_pipeline(tmp_path):
    rm_dir = run(
        [
            "algo=rm",
            "train.max_steps=100",
            "train.eval_samples=8",
            f"hydra.run.dir={tmp_path / 'rm'}",
        ]
    )
    run_dir = run(
        [
            "algo=ppo",
            "reward.funcs=[]",
            f"reward.model_path={rm_dir / 'final'}",
            "train.max_steps=60",
            "train.batch_size=64",
            "train.micro_batch_size=64",
            "train.lr=3e-4",
            "train.log_every=4",
            "train.eval_samples=16",
            f"hydra.run.dir={tmp_path / 'ppo'}",
        ]
    )
    log = (run_dir / "cli.log").read_text()
    assert "value model (trained, from reward model" in log
    assert (
        "reward: reward model" in log
        and "functions" not in log.split("ppo pipeline")[1].splitlines()[0]
    )
    for role in ("policy", "reference", "value", "reward_model"):
        assert f"{role}: 854," in log
    scores = [r["rewards/reward_model/mean"] for r in _rows(run_dir, "rewards/reward_model/mean")]
    k = max(1, len(scores) // 4)
    assert sum(scores[-k:]) / k > sum(scores[:k]) / k, scores


def test_rs_logs_acceptance(tmp_path):
    run_dir = run(
        [
            "algo=rs",
            "train.max_steps=2",
            "train.batch_size=16",
            "train.micro_batch_size=8",
            "algo.prompts_per_round=16",
            "algo.group_size=4",
            "train.log_every=1",
            "train.eval_samples=0",
            "algo.sample_every=2",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    rows = _rows(run_dir)
    assert 0 < rows[0]["acceptance_rate"] <= 1 and rows[0]["rounds"] >= 1
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 4  # the latest round's first prompts
    assert {"prompt", "completion", "reward", "accepted"} <= set(samples[0])


def test_ppo_writes_samples_though_its_rollouts_skip_the_sample_steps(tmp_path):
    """PPO's defaults sample a rollout every 4 steps (1, 5, 9, ...), which never lands on a
    multiple of sample_every=2: the rollout that serves step 2 (and 4) writes its samples."""
    run_dir = run(["algo=ppo", "train.max_steps=8", "train.eval_samples=0",
                   "algo.sample_every=2", f"hydra.run.dir={tmp_path}"])  # fmt: skip
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 5]
    assert all("advantage" in s for s in samples)


def test_reinforce_rejects_group_scaling(tmp_path, cli):
    proc = cli(
        "algo=reinforce", "algo.scale_rewards=group", f"hydra.run.dir={tmp_path}", timeout=60
    )
    assert proc.returncode == 2
    assert "algo.scale_rewards=group needs algo.estimator=grpo" in proc.stderr


def test_entropy_bonus_from_hidden_states_trains_as_from_logits(tmp_path):
    """PPO's entropy bonus differentiates the entropy; algo.fused_logps computes it from hidden
    states with its own backward pass. Same losses, entropy and gradient norms as the logits
    path over 3 steps."""
    common = ["algo=ppo", "train.max_steps=3", "train.batch_size=16", "train.micro_batch_size=8"]
    common += ["algo.ppo_epochs=1", "algo.entropy_coef=0.5", "train.log_every=1"]
    common += ["train.eval_samples=0"]
    runs = {
        f: run([*common, f"algo.fused_logps={f}", f"hydra.run.dir={tmp_path / f}"])
        for f in ("true", "false")
    }
    fused, plain = (_rows(runs[f]) for f in ("true", "false"))
    assert len(fused) == len(plain) == 3
    for a, b in zip(fused, plain, strict=True):
        for key in ("loss", "entropy", "grad_norm", "ppo/policy_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_ppo_resumes_inside_a_rollout_exactly(tmp_path):
    """A rollout serves ppo_epochs x num_minibatches = 2 steps here (1, 3, 5 sample); the
    checkpoint at step 3 holds the rollout's second minibatch step, and the epoch counts
    prompts, not steps."""
    common = [
        "algo=ppo",
        "data.train_size=24",
        "train.max_steps=-1",
        "train.epochs=1",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "algo.group_size=2",
        "algo.ppo_epochs=2",
        "train.save_every=3",
        "train.log_every=1",
        "train.lr=1e-4",
        "train.eval_samples=0",
    ]
    straight, crashed = crash_and_resume(tmp_path, common, fail_at=4)
    a = {r["step"]: r for r in _rows(straight)}
    b = {r["step"]: r for r in _rows(crashed)}
    # 24 prompts x 2 completions = 48 completions, 8 a step, each trained on twice: 12 steps
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s]["epoch"] for s in (1, 2, 12)] == [pytest.approx(4 / 24)] * 2 + [1.0]
    for step in range(4, 13):
        assert ("reward" in b[step]) == ("reward" in a[step])
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step


def _reward_model_of_another_vocabulary(folder):
    import torch
    from transformers import Qwen2ForSequenceClassification

    from rltune import tiny

    tokenizer = tiny.build_tokenizer(300, seed=1)
    config = small_model_config(tokenizer)
    config.num_labels = 1
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_reward_model_of_another_vocabulary_scores_but_does_not_start_the_critic(tmp_path, cli):
    """The critic reads the policy's token ids; a reward model with its own tokenizer can score
    (it re-encodes the text) but not start the value model: auto falls back to the policy, an
    explicit algo.critic_init=reward is an error."""
    rm = _reward_model_of_another_vocabulary(tmp_path / "rm")
    common = ["algo=ppo", "reward.funcs=[]", f"reward.model_path={rm}", "train.max_steps=1"]
    run_dir = run([*common, "train.eval_samples=8", f"hydra.run.dir={tmp_path / 'auto'}"])
    log = (run_dir / "cli.log").read_text()
    assert "has another tokenizer than the policy: the value model starts from the policy" in log
    assert "value model (trained, from tiny with a new head)" in log
    assert _rows(run_dir, "rewards/reward_model/mean")

    proc = cli(*common, "algo.critic_init=reward", f"hydra.run.dir={tmp_path / 'explicit'}")
    assert proc.returncode == 2
    assert f"reward.model_path={rm} has another tokenizer than model.path=tiny" in proc.stderr


def test_a_reward_model_that_cannot_render_the_prompts_fails_at_start(tmp_path, cli):
    from transformers import AutoTokenizer

    rm = _reward_model_of_another_vocabulary(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(rm)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(rm)
    (rm / "chat_template.jinja").unlink(missing_ok=True)
    proc = cli("algo=grpo", "reward.funcs=[]", f"reward.model_path={rm}", "train.max_steps=1",
               f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"reward.model_path={rm}: cannot score a prompt of data.task=arith" in proc.stderr
    assert "chat template" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_eos_penalty_lowers_the_score_of_cut_completions(tmp_path):
    """One new token per completion: a completion is cut unless that token is EOS, its return is
    its score (no KL at step 1, nothing to bootstrap), so the penalty moves returns/mean by
    exactly -penalty x the share of cut completions."""
    common = ["algo=ppo", "data.max_new_tokens=1", "train.max_steps=1", "train.eval_samples=0"]
    plain = run([*common, f"hydra.run.dir={tmp_path / 'plain'}"])
    penalised = run([*common, "algo.missing_eos_penalty=5", f"hydra.run.dir={tmp_path / 'pen'}"])
    (a,), (b,) = _rows(plain, "returns/mean"), _rows(penalised, "returns/mean")
    assert a["completions/clipped_ratio"] == b["completions/clipped_ratio"] > 0.5
    expected = a["returns/mean"] - 5 * a["completions/clipped_ratio"]
    assert b["returns/mean"] == pytest.approx(expected, abs=1e-4)


def test_reward_clip_and_whiten_rewards_reach_the_returns(tmp_path):
    """One new token per completion and no KL at step 1: a completion's return is its token
    reward, its score (0 or 1 from arith). reward_clip=0.25 turns each 1 into 0.25, so
    returns/mean falls by 0.75 x the share of correct completions, which is the share the clip
    moved. whiten_rewards keeps the mean (returns/mean as without it) but changes the spread
    the value model is measured against (value/explained_var)."""
    common = ["algo=ppo", "data.max_new_tokens=1", "train.max_steps=1", "train.eval_samples=0"]
    plain = run([*common, f"hydra.run.dir={tmp_path / 'plain'}"])
    clipped = run([*common, "algo.reward_clip=0.25", f"hydra.run.dir={tmp_path / 'clip'}"])
    whitened = run([*common, "algo.whiten_rewards=true", f"hydra.run.dir={tmp_path / 'white'}"])
    (a,), (b,), (c,) = (_rows(d, "returns/mean") for d in (plain, clipped, whitened))
    assert a["reward"] == b["reward"] == c["reward"] > 0  # the same rollout, some correct
    assert "rewards/clipped_frac" not in a and b["rewards/clipped_frac"] == a["reward"]
    assert b["returns/mean"] == pytest.approx(a["returns/mean"] - 0.75 * a["reward"], abs=1e-4)
    assert c["returns/mean"] == pytest.approx(a["returns/mean"], abs=1e-4)
    assert c["value/explained_var"] != pytest.approx(a["value/explained_var"], abs=1e-3)


def test_ppo_samples_show_the_reward_as_the_functions_gave_it(tmp_path):
    """samples.jsonl's reward is the functions' (arith: 0 or 1), like the `reward` metric, not
    the clipped and penalised score that trained (here 0.25 or 0 for a finished completion, less
    0.5 for one cut at its single new token)."""
    run_dir = run(["algo=ppo", "data.max_new_tokens=1", "train.max_steps=1", "train.eval_samples=0",
                   "algo.reward_clip=0.25", "algo.missing_eos_penalty=0.5", "algo.sample_every=1",
                   f"hydra.run.dir={tmp_path}"])  # fmt: skip
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reward"] in (0.0, 1.0) for s in samples)


def test_under_lora_the_whole_value_model_takes_the_full_fine_tuning_lr(tmp_path):
    run_dir = run(["algo=ppo", "peft=lora", "train.max_steps=1", "train.eval_samples=0",
                   f"hydra.run.dir={tmp_path}"])  # fmt: skip
    log = (run_dir / "cli.log").read_text()
    assert "steps at lr 0.001 (model.lrs.ppo_lora of model=tiny)" in log  # the policy's
    assert "value: trained beside the policy at lr 0.0001" in log  # its full fine-tuning rate

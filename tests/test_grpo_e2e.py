"""GRPO end to end on the shipped tiny model and the built-in arithmetic task."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import crash_and_resume

from rltune.cli import run
from rltune.logging import read_metrics
from rltune.models import SHIPPED

pytestmark = pytest.mark.slow

# 4 prompts x 4 completions per step: seconds per run
SMALL = [
    "algo=grpo",
    "algo.group_size=4",
    "train.batch_size=16",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_samples=16",
]


def _rows(run_dir, key="loss"):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def test_default_run_is_grpo_and_raises_task_accuracy(tmp_path):
    """`rltune` with no arguments: GRPO from the shipped tiny model (about a minute here)."""
    run_dir = run([f"hydra.run.dir={tmp_path}"])
    log = (run_dir / "cli.log").read_text()
    assert "grpo batch: 32 prompts x 8 completions = 256 completions per step" in log
    assert "reference: none (algo.kl_coef=0)" in log
    evals = _rows(run_dir, "eval/accuracy")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 150
    assert evals[-1]["eval/accuracy"] >= evals[0]["eval/accuracy"] + 0.10, evals
    last = _rows(run_dir)[-1]
    expected = {
        "reward", "reward_std", "rewards/arith/mean", "rewards/arith/errors",
        "frac_reward_zero_std", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
        "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
        "loss", "grad_norm", "time/generate", "time/train",
    }  # fmt: skip
    assert expected <= set(last), expected - set(last)
    assert "kl" not in last  # no reference, no KL
    assert (run_dir / "samples.jsonl").read_text().count('"completion"') >= 4


def test_kl_builds_a_reference_and_logs_kl(tmp_path):
    run_dir = run(
        [
            *SMALL,
            "train.max_steps=3",
            "algo.kl_coef=0.04",
            "train.lr=1e-3",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    log = (run_dir / "cli.log").read_text()
    assert "reference: a frozen copy of tiny" in log
    assert "reference: 854,144 parameters, 0 trainable" in log
    rows = _rows(run_dir)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert rows[-1]["kl"] > 0  # and moves away from it


def test_a_row_per_group_trains_as_a_row_per_completion(tmp_path):
    """algo.share_prompt (each group's prompt computed once) changes no number of a step: the
    same rollout gives the same loss, KL to the reference, entropy and updated weights."""
    from safetensors.torch import load_file

    common = [*SMALL, "train.max_steps=1", "algo.kl_coef=0.04", "train.lr=1e-3"]
    common += ["train.eval_samples=0", "train.save_every=1"]
    runs = {
        share: run([*common, f"algo.share_prompt={share}", f"hydra.run.dir={tmp_path / share}"])
        for share in ("true", "false")
    }
    assert "training rows: one per group" in (runs["true"] / "cli.log").read_text()
    assert "training rows: one per group" not in (runs["false"] / "cli.log").read_text()
    shared, alone = (_rows(runs[share])[0] for share in ("true", "false"))
    assert shared["reward"] == alone["reward"]  # the same rollout
    assert shared["num_tokens"] == alone["num_tokens"]
    for key in ("loss", "kl", "entropy", "grad_norm"):
        assert shared[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-6), key
    start = load_file(SHIPPED["tiny"] / "model.safetensors")
    moved = {
        share: torch.cat(
            [
                (w - start[k]).flatten()
                for k, w in load_file(d / "final" / "model.safetensors").items()
            ]
        )
        for share, d in runs.items()
    }
    # Adam moves a weight by ~lr whatever its gradient's size, so the few weights with a ~0
    # gradient carry rounding noise; the update as a whole must agree
    gap = (moved["true"] - moved["false"]).norm() / moved["false"].norm()
    assert gap < 1e-3, gap


def test_log_probs_from_hidden_states_train_as_logits(tmp_path):
    """algo.fused_logps (the default: no [tokens, vocabulary] logits) gives the policy, the
    reference and the old log-probs (num_iterations=2) of the logits path: the same loss, KL,
    entropy and gradient norm over 2 steps, and says so in the log."""
    common = [*SMALL, "train.max_steps=2", "algo.kl_coef=0.04", "algo.num_iterations=2"]
    common += ["train.eval_samples=0"]
    runs = {
        fused: run([*common, f"algo.fused_logps={fused}", f"hydra.run.dir={tmp_path / fused}"])
        for fused in ("true", "false")
    }
    log = (runs["true"] / "cli.log").read_text()
    assert "log-probs: from hidden states, no logits (algo.fused_logps)" in log
    assert "reference log-probs: from hidden states" in log
    assert "from hidden states" not in (runs["false"] / "cli.log").read_text()
    fused, plain = (_rows(runs[f]) for f in ("true", "false"))
    assert len(fused) == len(plain) == 2
    for a, b in zip(fused, plain, strict=True):
        for key in ("loss", "kl", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert fused[1]["kl"] > 0  # the second step trains on a moved policy


def test_a_compiled_decode_step_samples_the_rollouts_of_the_eager_one(tmp_path):
    """rollout.compile=true (here on CPU: the static cache, its step and the draw compiled by
    inductor) samples the completions of the default decoder from the same seed, with
    inductor's random numbers taken from PyTorch's generator (`fallback_random`; by default
    they come from a stream of its own): the same rewards, loss and KL over 2 steps; and dynamo
    traced the step and the draw (nothing is traced without it)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    common = [*SMALL, "train.max_steps=2", "algo.kl_coef=0.04", "train.eval_samples=0"]
    metrics, traced = {}, {}
    for compiled in ("false", "true"):
        counters.clear()
        with inductor_config.patch(fallback_random=True):
            run_dir = run(
                [*common, f"rollout.compile={compiled}", f"hydra.run.dir={tmp_path / compiled}"]
            )
        metrics[compiled], traced[compiled] = _rows(run_dir), counters["stats"]["unique_graphs"]
    assert traced == {"false": 0, "true": 2}
    assert len(metrics["true"]) == len(metrics["false"]) == 2
    for a, b in zip(metrics["true"], metrics["false"], strict=True):
        assert a["completions/mean_length"] == b["completions/mean_length"]
        for key in ("reward", "loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_eval_decodes_with_the_rollout_engine_as_generate_does(tmp_path):
    """Evaluation decodes greedily with the rollouts' engine, and the fast one gives
    `generate`'s tokens: eval/accuracy and eval/reward at every eval equal engine=hf's, with the
    dynamic decoder (CPU's default) and with the compiled static one (rollout.compile; the
    graph decoder uncaptured). Rollouts with top_k=1 are the same in every engine, so the runs
    train the same policy, and REINFORCE (one completion per prompt, rewards whitened over the
    batch) moves it. The compiled run traces the step and the draw once for training's 8 rows
    and once for the evals' 6 + 6: each eval and the rollout after it reuse their decoder."""
    from torch._dynamo.utils import counters

    common = [
        "algo=reinforce", "rollout.top_k=1", "rollout.batch_size=8", "train.batch_size=8",
        "train.micro_batch_size=8", "train.max_steps=3", "train.eval_every=1",
        "train.eval_samples=12", "train.lr=1e-3", "train.log_every=1",
    ]  # fmt: skip
    runs = {}
    for name, engine in [("hf", ["rollout.engine=hf"]), ("fast", []), ("compiled", [])]:
        engine = engine + ["rollout.compile=true"] * (name == "compiled")
        counters.clear()
        run_dir = run([*common, *engine, f"hydra.run.dir={tmp_path / name}"])
        runs[name] = read_metrics(run_dir / "metrics.jsonl")
    assert counters["stats"]["unique_graphs"] == 4  # (step, draw) x (training, eval)
    keys = ["step", "eval/accuracy", "eval/reward", "reward", "loss"]
    table = {name: [[r.get(k) for k in keys] for r in rows] for name, rows in runs.items()}
    assert [r[0] for r in table["hf"]] == [0, 1, 2, 3]
    assert table["fast"] == table["hf"] and table["compiled"] == table["hf"], table
    accuracy = [r[1] for r in table["hf"]]
    assert len(set(accuracy)) > 1, accuracy  # the policy moved: evals of different policies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_report_their_gpu_memory_peaks(tmp_path):
    """On a GPU every step logs its peak of allocated memory, and the online algorithms the
    peak while generating, which is part of the step (the policy and optimizer state count in
    both; an optimizer step allocates its moments on step 1, so the step's peak is higher)."""
    run_dir = run(
        [*SMALL, "train.max_steps=2", "train.eval_samples=0", "train.device=cuda",
         f"hydra.run.dir={tmp_path}"]
    )  # fmt: skip
    rows = _rows(run_dir)
    assert len(rows) == 2
    for r in rows:
        assert 0 < r["memory/generate_peak_gib"] <= r["memory/peak_gib"] <= r["memory/reserved_gib"]
        assert r["memory/peak_rss_gib"] > 0


def test_lora_reference_is_the_adapter_disabled_policy(tmp_path):
    run_dir = run(
        [*SMALL, "train.max_steps=2", "algo.kl_coef=0.04", "peft=lora", f"hydra.run.dir={tmp_path}"]
    )
    log = (run_dir / "cli.log").read_text()
    assert "reference: the policy with its LoRA adapters disabled (no second model)" in log
    assert "reference: 854,144" not in log
    assert _rows(run_dir)[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_raising_user_reward_is_counted_and_the_run_goes_on(tmp_path):
    (tmp_path / "user_rewards.py").write_text(
        "def picky(prompts, completions, **columns):\n"
        "    if any('1' in c for c in completions):\n"
        "        raise ValueError('I do not like ones')\n"
        "    return [1.0 for _ in completions]\n"
    )
    run_dir = run(
        [
            *SMALL,
            "train.max_steps=3",
            f"reward.funcs=[arith,{tmp_path / 'user_rewards.py'}:picky]",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    rows = _rows(run_dir)
    assert len(rows) == 3 and (run_dir / "final" / "config.json").exists()
    assert sum(r["rewards/picky/errors"] for r in rows) > 0
    assert all(r["rewards/arith/errors"] == 0 for r in rows)
    # a batch holding a '1' fails, then its samples are scored one at a time: counted in every
    # step where it happens, logged only the first time (several times here, eval's included)
    batch_failures = [r["rewards/picky/batch_failures"] for r in rows]
    assert batch_failures == [float(r["rewards/picky/errors"] > 0) for r in rows]
    assert sum(batch_failures) >= 2
    assert all(r["rewards/arith/batch_failures"] == 0 for r in rows)
    assert (run_dir / "cli.log").read_text().count("reward picky failed on the batch") == 1
    # eval logs each function's mean too; arith's on the greedy completions is the task's accuracy
    evals = _rows(run_dir, "eval/reward")
    assert [e["eval/rewards/arith/mean"] for e in evals] == [e["eval/accuracy"] for e in evals]
    # and each function's failed samples, which eval/reward leaves out of its mean
    assert sum(e["eval/rewards/picky/errors"] for e in evals) > 0
    assert all(e["eval/rewards/arith/errors"] == 0 for e in evals)
    # the closing summary reports the failing function's errors, not the other's zeros
    log = (run_dir / "cli.log").read_text()
    assert "eval/rewards/picky/errors:" in log and "eval/accuracy:" in log
    assert "eval/rewards/arith/errors:" not in log


def test_unknown_reward_module_fails_fast_naming_it(tmp_path, cli):
    proc = cli(
        "algo=grpo", "reward.funcs=[no_such_module:fn]", f"hydra.run.dir={tmp_path}", timeout=60
    )
    assert proc.returncode == 2
    assert "cannot import 'no_such_module' (from 'no_such_module:fn')" in proc.stderr
    assert "Loading weights" not in proc.stderr  # failed before any model loaded


def test_batch_must_hold_whole_groups(tmp_path, cli):
    proc = cli(
        "algo=grpo",
        "train.batch_size=12",
        "train.micro_batch_size=4",
        f"hydra.run.dir={tmp_path}",
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        "train.batch_size=12 counts completions: each process's share (12 = micro_batch_size 4 "
        "x grad_accum 3) must hold whole groups of algo.group_size=8; e.g. train.batch_size=16"
        in proc.stderr
    )


def test_a_template_without_system_turns_is_told_as_data_system_prompts_fault(tmp_path, cli):
    """A chat template that raises on a system turn (as Gemma's does) fails every prompt that
    data.system_prompt opened: the error names the setting, not the first row of the data."""
    import shutil

    model = tmp_path / "no_system"
    shutil.copytree(SHIPPED["tiny"], model)
    template = (model / "chat_template.jinja").read_text()
    refuse = "{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('No system role') }}"
    (model / "chat_template.jinja").write_text(refuse + "{%- endif -%}" + template)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(8))
    )
    proc = cli(
        *SMALL, "data=custom", f"data.path={data}", f"model.path={model}",
        "data.system_prompt=Be brief.", "reward.funcs=[math_answer]",
        f"hydra.run.dir={tmp_path / 'run'}", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        f"rltune: error: data.system_prompt: the chat template of model.path={model} cannot "
        "render a system turn (No system role)" in proc.stderr
    ), proc.stderr[-2000:]


def test_reward_model_from_algo_rm_scores_rollouts(tmp_path):
    rm_dir = run(
        ["algo=rm", "train.max_steps=2", "train.eval_samples=8", f"hydra.run.dir={tmp_path / 'rm'}"]
    )
    run_dir = run(
        [
            *SMALL,
            "train.max_steps=2",
            "reward.funcs=[]",
            f"reward.model_path={rm_dir / 'final'}",
            f"hydra.run.dir={tmp_path / 'grpo'}",
        ]
    )
    assert "rewards: reward_model (weight 1)" in (run_dir / "cli.log").read_text()
    rows = _rows(run_dir)
    assert all(r["rewards/reward_model/errors"] == 0 for r in rows)
    assert rows[-1]["reward"] == pytest.approx(rows[-1]["rewards/reward_model/mean"])
    last = _rows(run_dir, "eval/reward")[-1]  # one function of weight 1: its mean is the reward
    assert last["eval/rewards/reward_model/mean"] == pytest.approx(last["eval/reward"])


@pytest.mark.parametrize(
    "variant",
    [
        ["algo.num_iterations=2", "algo.epsilon_high=0.28"],
        [
            "algo.importance_level=sequence",
            "algo.num_iterations=2",
            "algo.loss_agg=seq_mean_token_mean",
        ],
        [
            "algo.filter_zero_std=true",
            "algo.scale_rewards=none",
            "algo.loss_agg=seq_mean_token_sum_norm",
        ],
        ["algo.scale_rewards=batch", "algo.mask_truncated=true", "data.max_new_tokens=3"],
    ],
)
def test_variants_run_and_report(tmp_path, variant):
    run_dir = run(
        [*SMALL, "train.max_steps=4", "train.lr=1e-3", *variant, f"hydra.run.dir={tmp_path}"]
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    if "algo.num_iterations=2" in variant:
        # a new rollout every other step: reward metrics only on steps 1 and 3; the reused
        # rollout is trained on by a policy that has moved, so its ratio leaves 1
        assert ["reward" in r for r in train_rows] == [True, False, True, False]
        assert train_rows[0]["clip_ratio/region_mean"] == 0.0
    if "algo.filter_zero_std=true" in variant:
        assert all("filtered_groups" in r for r in train_rows)
    if "data.max_new_tokens=3" in variant:
        assert any(r["completions/clipped_ratio"] > 0 for r in train_rows)


@pytest.mark.parametrize("mu", [1, 2])
def test_resume_after_crash_reproduces_the_uninterrupted_run(tmp_path, mu):
    """With mu = 2 rollouts come at steps 1, 3, 5 and the checkpoint at step 3 falls inside
    one: the resumed run must train step 4 on that rollout, not sample a new one."""
    common = [
        *SMALL,
        "train.max_steps=6",
        "train.save_every=3",
        "train.lr=1e-3",
        "train.eval_samples=0",
        f"algo.num_iterations={mu}",
    ]
    straight, crashed = crash_and_resume(tmp_path, common, fail_at=4)
    a = {r["step"]: r for r in _rows(straight)}
    b = {r["step"]: r for r in _rows(crashed)}
    for step in (4, 5, 6):  # sampled with the restored RNG from the restored policy
        assert ("reward" in b[step]) == ("reward" in a[step])  # a rollout at the same steps
        assert b[step].get("reward") == a[step].get("reward")
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6)


@pytest.fixture
def dropout_model(tmp_path):
    """The shipped tiny model with attention dropout 0.5 (transformers applies it in train mode)."""
    import shutil

    folder = tmp_path / "dropout_model"
    shutil.copytree(SHIPPED["tiny"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    return folder


@pytest.mark.parametrize("disable", [None, False])
def test_dropout_is_off_so_old_and_new_logps_agree(tmp_path, dropout_model, disable):
    """With mu = 2 the old log-probs come from a pass of their own before the first update; the
    ratio to them is 1 there unless dropout differs between the passes (then tokens get
    clipped). Dropout is off by default for every algorithm but SFT."""
    run_dir = run(
        [
            *SMALL,
            f"model.path={dropout_model}",
            "algo.num_iterations=2",
            "train.max_steps=1",
            "train.eval_samples=0",
            *([] if disable is None else [f"train.disable_dropout={str(disable).lower()}"]),
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    row = _rows(run_dir)[0]
    log = (run_dir / "cli.log").read_text()
    if disable is None:
        assert "policy: 4 dropouts set to 0 (train.disable_dropout)" in log  # one per layer
        assert row["clip_ratio/region_mean"] == 0.0
    else:
        assert "dropouts set to 0" not in log
        assert row["clip_ratio/region_mean"] > 0.05

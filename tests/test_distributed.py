"""DeepSpeed ZeRO with two processes on CPU (gloo), launched with torchrun as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from rltune.cli import run
from rltune.logging import read_metrics

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SMALL = [
    "train.max_steps=3",
    "train.log_every=1",
    "train.eval_samples=16",
    "train.batch_size=16",
    "train.micro_batch_size=8",
]
HALF = "1,708,288 bytes"  # 854,144 fp32 parameters = 3,416,576 bytes, split over 2 ranks


def torchrun(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rltune", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_zero3_on_two_processes_matches_one_process(tmp_path, algo):
    """Same global batch: every step's loss equals the single-process run's (1e-4), and each
    rank holds half of the parameters (stage3_param_persistence_threshold=0)."""
    two = tmp_path / "two"
    proc = torchrun(
        f"algo={algo}", "deepspeed=zero3", "deepspeed.param_persistence_threshold=0", *SMALL,
        "train.batch_size=32",  # 2 micro-batches of 8 per rank: accumulation too
        f"hydra.run.dir={two}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert (
            f"ZeRO stage 3, rank {rank} of 2 holds {HALF} of policy parameters"
            in proc.stdout + proc.stderr
        )
    if algo == "sft":  # ZeRO-3 shards the output layer: algo.fused_ce takes the logits path
        assert "algo.fused_ce needs a plain, whole output layer" in proc.stdout + proc.stderr
    one = run([f"algo={algo}", *SMALL, "train.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}"])
    a, b = _losses(one), _losses(two)
    assert sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), (step, a[step], b[step])


@pytest.mark.parametrize(
    ("algo", "extra"),
    [
        ("grpo", ["algo.group_size=4", "algo.kl_coef=0.04"]),
        ("ppo", ["algo.num_minibatches=1"]),
        ("rs", ["algo.group_size=4", "algo.prompts_per_round=4", "algo.threshold=0"]),
    ],
)
def test_online_algorithms_under_zero3_partition_every_model(tmp_path, algo, extra):
    """Generation with ZeRO-3 parameters gathered (ranks end at different lengths and must not
    hang); the trained models and the frozen reference each split in half over the ranks."""
    proc = torchrun(
        f"algo={algo}", "deepspeed=zero3", "deepspeed.param_persistence_threshold=0", *SMALL,
        *extra, f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"rank 1 of 2 holds {HALF} of policy parameters" in out
    if algo != "rs":
        assert f"reference partitioned, {HALF} on this rank" in out
    if algo == "ppo":
        assert "rank 1 of 2 holds 1,708,544 bytes of value parameters" in out  # + the head
        assert (tmp_path / "final" / "value" / "config.json").exists()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and "reward" in rows[0]


def test_ppo_with_a_reward_model_under_zero3_partitions_all_four_models(tmp_path):
    rm_dir = run(
        ["algo=rm", "train.max_steps=2", "train.eval_samples=8", f"hydra.run.dir={tmp_path / 'rm'}"]
    )
    proc = torchrun(
        "algo=ppo", "deepspeed=zero3", "deepspeed.param_persistence_threshold=0", *SMALL,
        "reward.funcs=[]", f"reward.model_path={rm_dir / 'final'}", f"hydra.run.dir={tmp_path / 'ppo'}",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for role in ("reference", "reward_model"):
        assert f"{role} partitioned" in out, role
    assert "bytes of value parameters" in out and f"holds {HALF} of policy parameters" in out
    rows = [r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if "loss" in r]
    assert "rewards/reward_model/mean" in rows[0]


def test_zero2_bf16_reference_and_adaptive_kl_agree_across_ranks(tmp_path):
    """ZeRO-2 in bf16 holds the policy in bf16: the frozen reference is cast alike, so the KL
    before any update is 0. PPO's adaptive KL controller takes one step from every rank's
    completions, so both ranks keep the same kl_coef (each used to follow its own half)."""
    proc = torchrun(
        "algo=ppo", "deepspeed=zero2", "train.dtype=bf16", *SMALL, "algo.ppo_epochs=1",
        "algo.adaptive_kl=true", "algo.kl_horizon=16", "algo.target_kl=0.01",
        "train.save_every=3", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert rows[0]["kl"] == 0.0
    states = [
        torch.load(tmp_path / "checkpoints" / "step-3" / f"algo-{rank}.pt", weights_only=False)
        for rank in (0, 1)
    ]
    assert states[0]["kl_coef"] == states[1]["kl_coef"] != 0.05  # moved, and in step


def test_zero2_resume_matches_the_uninterrupted_run(tmp_path):
    common = ["algo=sft", "deepspeed=zero2", *SMALL, "train.max_steps=6", "train.save_every=3"]
    assert torchrun(*common, f"hydra.run.dir={tmp_path / 'straight'}").returncode == 0
    crashed = tmp_path / "crashed"
    proc = torchrun(*common, "train.fail_at_step=4", f"hydra.run.dir={crashed}")
    assert proc.returncode != 0
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-3"]
    proc = torchrun(*common, "train.resume=auto", f"hydra.run.dir={crashed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(tmp_path / "straight"), _losses(crashed)
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])


def test_zero3_final_loads_and_equals_the_gathered_weights(tmp_path):
    proc = torchrun(
        "algo=sft", "deepspeed=zero3", "deepspeed.param_persistence_threshold=0", *SMALL,
        "train.save_every=3", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    shards = get_fp32_state_dict_from_zero_checkpoint(
        str(tmp_path / "checkpoints" / "step-3" / "deepspeed" / "policy"), tag="state"
    )
    final = model.state_dict()
    assert shards.keys() <= final.keys()
    for name, tensor in shards.items():
        assert torch.equal(final[name], tensor), name


def _fp32_masters(state: Path, stage: str) -> dict[str, torch.Tensor]:
    """A one-process DeepSpeed checkpoint's fp32 master weights by parameter name: from ZeRO's
    partitions, or at stage 0 from the fp32 copies its bf16 optimizer keeps, one list per
    parameter group in module order (LoRA's adapters are all matrices: one group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if stage != "zero0":
        return get_fp32_state_dict_from_zero_checkpoint(str(state), tag="state")
    saved = torch.load(state / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    names = [name for name in saved["module"] if ".lora_" in name]
    copies = [t for group in saved["optimizer"]["fp32_groups"] for t in group]
    return dict(zip(names, copies, strict=True))


@pytest.mark.parametrize("stage", ["zero0", "zero2", "zero3"])
def test_bf16_lora_export_comes_from_the_fp32_masters(tmp_path, stage):
    """DeepSpeed in bf16 holds the adapters in bf16 and their fp32 masters in its optimizer:
    final/adapter/ holds those masters exactly, and final/ is base + their update rounded once
    to bf16, as the plain engine exports from its fp32 adapters (both used to come from the
    bf16 roundings: 56 of 56 adapter tensors off by up to 2.4e-4, 28 of 28 merged layers off by
    up to 9.8e-4 after 3 steps at lr 1e-2)."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rltune.models import SHIPPED

    config = tmp_path / "ds0.json"
    config.write_text('{"zero_optimization": {"stage": 0}}')
    ds = f"deepspeed.config={config}" if stage == "zero0" else f"deepspeed={stage}"
    run_dir = run(["algo=sft", "peft=lora", "train.dtype=bf16", ds, *SMALL, "train.lr=1e-2",
                   "train.eval_samples=0", "train.save_every=3", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    masters = _fp32_masters(run_dir / "checkpoints" / "step-3" / "deepspeed" / "policy", stage)
    masters = {k.replace(".default.", "."): v for k, v in masters.items() if ".lora_" in k}
    final = run_dir / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == masters.keys()
    for name, master in masters.items():
        assert not torch.equal(master, master.bfloat16().float()), name  # more than bf16 holds
        assert torch.equal(adapter[name], master), name
    settings = json.loads((final / "adapter" / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    base = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"], dtype=torch.bfloat16).state_dict()
    merged = load_file(final / "model.safetensors")
    for name, weight in merged.items():
        a = "base_model.model." + name.replace(".weight", ".lora_A.weight")
        expected = base[name].float()
        if a in masters:
            expected = expected + masters[a.replace("lora_A", "lora_B")] @ masters[a] * scale
        assert torch.equal(weight, expected.bfloat16()), name


def test_bf16_full_export_is_the_fp32_masters_rounded_once(tmp_path):
    """Full weights in bf16: final/ comes from the module's bf16 weights, which DeepSpeed copies
    from the fp32 masters rounded once, so it is what casting the masters would write."""
    from safetensors.torch import load_file

    run_dir = run(["algo=sft", "train.dtype=bf16", "deepspeed=zero2", *SMALL, "train.lr=1e-2",
                   "train.eval_samples=0", "train.save_every=3", f"hydra.run.dir={tmp_path}"])  # fmt: skip
    masters = _fp32_masters(run_dir / "checkpoints" / "step-3" / "deepspeed" / "policy", "zero2")
    final = load_file(run_dir / "final" / "model.safetensors")
    assert final.keys() <= masters.keys()  # lm_head.weight is tied to embed_tokens.weight
    for name, weight in final.items():
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, masters[name].bfloat16()), name


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_one_process_without_a_launcher_accumulates_like_plain_pytorch(tmp_path, stage):
    """Two micro-batches per step: DeepSpeed must accumulate, not overwrite, their gradients
    (ZeRO-3 counts micro-steps in engine.forward, which the loop does not call)."""
    run_dir = run(["algo=sft", f"deepspeed={stage}", *SMALL, f"hydra.run.dir={tmp_path / 'ds'}"])
    log = (run_dir / "cli.log").read_text()
    assert "rank 0 of 1 holds 3,416,576 bytes of policy parameters" in log
    plain = run(["algo=sft", *SMALL, f"hydra.run.dir={tmp_path / 'plain'}"])
    a, b = _losses(plain), _losses(run_dir)
    assert sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a[step], b[step])


def test_the_process_group_is_torn_down_at_exit_not_between_runs(tmp_path):
    """A run leaves its process group to the process's later runs (DeepSpeed keeps handles to
    it), and the group is destroyed when the process exits, before the interpreter's own
    teardown: an exit hook registered before rltune's runs after it and finds no group."""
    script = f"""
import atexit, torch.distributed as dist
atexit.register(lambda: print("at exit, group alive:", dist.is_initialized()))
from rltune.cli import run
run(["algo=sft", "deepspeed=zero2", "train.max_steps=1", "train.eval_samples=0",
     "hydra.run.dir={tmp_path}"])
print("after the run, group alive:", dist.is_initialized())
"""
    # without the rendezvous variables that this process's own DeepSpeed runs set
    rendezvous = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after the run, group alive: True" in proc.stdout
    assert "at exit, group alive: False" in proc.stdout


def test_deepspeed_without_zero_reports_the_gradient_norm(tmp_path):
    """DeepSpeed with ZeRO stage 0 in fp32 clips gradients but keeps no norm (get_global_grad_norm
    is None); the loop measures it, and it equals the plain engine's."""
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 0}}')
    ds = run(["algo=sft", f"deepspeed.config={config}", *SMALL, f"hydra.run.dir={tmp_path / 'ds'}"])
    plain = run(["algo=sft", *SMALL, f"hydra.run.dir={tmp_path / 'plain'}"])

    def norms(run_dir):
        rows = read_metrics(run_dir / "metrics.jsonl")
        return {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r}

    a, b = norms(plain), norms(ds)
    assert sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])


@pytest.mark.parametrize("engine", ["plain", "zero0", "zero2"])
def test_a_non_finite_gradient_skips_the_update_and_the_schedule_goes_on(tmp_path, engine):
    """lr 1e30 blows the weights up at step 1, so steps 2-4 have NaN gradients: each engine
    skips those updates (the weights stay finite), says so, and keeps the schedule's pace
    (DeepSpeed's 16-bit optimizer holds it back; its fp32 stage 0 would apply the NaN)."""
    config = tmp_path / "ds0.json"
    config.write_text('{"zero_optimization": {"stage": 0}}')
    extra = {"plain": [], "zero0": [f"deepspeed.config={config}"], "zero2": ["deepspeed=zero2"]}
    run_dir = run(["algo=sft", *extra[engine], "train.lr=1e30", "train.scheduler=linear",
                   *SMALL, "train.max_steps=4", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r.get("skipped_updates") for r in rows] == [None, 1.0, 1.0, 1.0]
    assert [r["lr"] for r in rows] == pytest.approx([1e30, 7.5e29, 5e29, 2.5e29])
    from safetensors.torch import load_file

    weights = load_file(run_dir / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_deepspeed_launcher_runs_rltune_as_the_readme_shows(tmp_path):
    """`deepspeed --module rltune ...`: the launcher appends --local_rank=N to rltune's
    arguments, which Hydra alone would refuse."""
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module",
         "rltune", "algo=sft", "deepspeed=zero2", *SMALL, "train.max_steps=2",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rank 1 of 2 holds" in (tmp_path / "cli.log").read_text()
    assert sorted(_losses(tmp_path)) == [1, 2]

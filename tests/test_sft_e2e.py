"""SFT end to end on the shipped tiny models: learning, export, resume, signals, sweeps, LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from rltune.cli import run
from rltune.logging import read_metrics

pytestmark = pytest.mark.slow

FAST = ["algo=sft", "train.eval_samples=32", "train.micro_batch_size=8", "train.batch_size=16"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_sft_from_scratch_loss_falls_and_final_generates(tmp_path):
    run_dir = run(
        [
            "algo=sft",
            "model=tiny_init",
            f"hydra.run.dir={tmp_path}",
            "train.max_steps=40",
            "train.log_every=1",
            *FAST,
        ]
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0] and "eval/loss" in rows[0]
    by_step = losses(run_dir)
    assert sorted(by_step) == list(range(1, 41))
    first, last = (
        sum(by_step[s] for s in range(1, 6)) / 5,
        sum(by_step[s] for s in range(36, 41)) / 5,
    )
    assert last < first - 1.0, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "mean_token_accuracy"):
        assert key in rows[-1]
    peaks = [r["memory/peak_rss_gib"] for r in rows[1:]]  # a CPU run: the process's peak only
    assert peaks == sorted(peaks) and peaks[0] > 0.05 and "memory/peak_gib" not in rows[-1]
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]
    assert (run_dir / ".hydra" / "config.yaml").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "12+34="}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_resume_after_crash_reproduces_the_uninterrupted_run(tmp_path, cli):
    common = [
        "model=tiny_init",
        "train.max_steps=12",
        "train.save_every=4",
        "train.log_every=1",
        "train.lr=1e-3",
        *FAST,
    ]
    run([*common, f"hydra.run.dir={tmp_path / 'straight'}"])

    crashed = tmp_path / "crashed"
    proc = cli(*common, f"hydra.run.dir={crashed}", "train.fail_at_step=6")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-4"]
    assert max(losses(crashed)) == 6  # steps 5 and 6 were logged before the crash

    run([*common, f"hydra.run.dir={crashed}", "train.resume=auto"])
    a, b = losses(tmp_path / "straight"), losses(crashed)
    assert sorted(b) == list(range(1, 13))
    for step in range(5, 13):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    orphaned = read_metrics(crashed / "metrics.orphaned.jsonl")
    assert [r["step"] for r in orphaned] == [5, 6]
    # the resumed run's closing summary starts from the step-0 evaluation, logged before the crash
    summary = [
        line for line in (crashed / "cli.log").read_text().splitlines() if "eval/loss:" in line
    ]
    assert " at step 0 -> " in summary[-1] and summary[-1].endswith(" at step 12"), summary
    # keep_checkpoints=2: step-4 was rotated out once step-8 and step-12 were complete
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-12", "step-8"]


def test_resume_from_an_older_checkpoint_with_a_new_lr(tmp_path):
    """Going back to step 6 of a run that reached step 8, at a tenth of the lr: the new run's
    checkpoints are not outranked by the abandoned step-8 (set aside, kept), and the new lr
    applies (a checkpoint's optimizer state would otherwise bring the old one back)."""
    common = ["model=tiny_init", "train.max_steps=8", "train.log_every=1", *FAST]
    run_dir = tmp_path / "run"
    run([*common, "train.save_every=2", "train.lr=1e-3", f"hydra.run.dir={run_dir}"])
    old_lr = {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r}
    run(
        [
            *common,
            "train.save_every=1",
            "train.keep_checkpoints=1",
            "train.lr=1e-4",
            f"train.resume={run_dir / 'checkpoints' / 'step-6'}",
            f"hydra.run.dir={run_dir}",
        ]
    )
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-8", "step-8.superseded"]
    log = (run_dir / "cli.log").read_text()
    assert "resume: train.lr was 0.001 in the checkpoint's run, is 0.0001 now" in log
    assert "checkpoint step-8 is past step 6, where this run starts: kept as" in log
    new_lr = {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r}
    for step in (7, 8):  # the same point of the same schedule, from a tenth of the peak
        assert new_lr[step] == pytest.approx(old_lr[step] / 10, rel=1e-9)
    assert new_lr[6] == old_lr[6]


def test_a_checkpoint_moved_aside_by_a_crashed_save_is_put_back_before_resuming(tmp_path):
    """A crash while re-saving step 8 (after moving the old step-8 aside, before renaming the
    new one in) leaves .tmp-old-step-8 as step 8's only complete copy: resume=auto puts it back
    and continues from step 8, not from step 4."""
    common = ["model=tiny_init", "train.save_every=4", "train.log_every=1", *FAST]
    run_dir = tmp_path / "run"
    run([*common, "train.max_steps=8", f"hydra.run.dir={run_dir}"])
    root = run_dir / "checkpoints"
    (root / "step-8").rename(root / ".tmp-old-step-8")
    (root / ".tmp-step-8").mkdir()  # the half-written new copy
    run([*common, "train.max_steps=9", "train.resume=auto", f"hydra.run.dir={run_dir}"])
    assert f"resumed from {root / 'step-8'} at step 8" in (run_dir / "cli.log").read_text()
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-8"]


def test_a_rotation_cut_short_by_a_crash_is_finished_by_the_resume(tmp_path, monkeypatch):
    """A crash after the last step's checkpoint is renamed into place, before the rotation that
    follows it, leaves one checkpoint too many. The resume starts at the last step and saves
    nothing, so it must rotate itself, else keep_checkpoints is exceeded for good."""
    from rltune import checkpoint

    class Crash(BaseException):  # not an Exception: nothing on the way reports it as a failure
        pass

    real_replace = checkpoint.replace_dir

    def replace_dir(tmp, final):  # the rename that completes a save, then the crash
        real_replace(tmp, final)
        if final.name == "step-6":
            raise Crash

    common = ["model=tiny_init", "train.max_steps=6", "train.save_every=2", *FAST]
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    monkeypatch.setattr(checkpoint, "replace_dir", replace_dir)
    with pytest.raises(Crash):
        run([*common, f"hydra.run.dir={run_dir}"])
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4", "step-6"]
    run([*common, "train.resume=auto", f"hydra.run.dir={run_dir}"])
    assert f"resumed from {root / 'step-6'} at step 6" in (run_dir / "cli.log").read_text()
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]  # keep_checkpoints=2


def test_resuming_another_runs_checkpoint_fails_before_loading(tmp_path, cli):
    """A checkpoint of full weights resumed with LoRA adapters (or by another algorithm) would
    fail deep inside loading; it is named before any model loads."""
    first = tmp_path / "first"
    run(
        [
            "model=tiny_init",
            "train.max_steps=1",
            "train.save_every=1",
            *FAST,
            f"hydra.run.dir={first}",
        ]
    )
    checkpoint = first / "checkpoints" / "step-1"
    for change, message in (
        ("peft=lora", "peft.method=none there, lora here"),
        ("algo=dpo", "algo.name=sft there, dpo here"),
    ):
        proc = cli(
            "model=tiny_init",
            change,
            f"train.resume={checkpoint}",
            f"hydra.run.dir={tmp_path / 'second'}",
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-1500:]
        assert (
            f"train.resume={checkpoint}: the checkpoint's run trained other models" in proc.stderr
        )
        assert message in proc.stderr
        assert "Loading weights" not in proc.stderr


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "rltune",
        "model=tiny_init",
        f"hydra.run.dir={run_dir}",
        "train.max_steps=400",
        "train.log_every=1",
        *FAST,
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and max(losses(run_dir), default=0) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    saved = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-")
    stopped_at = int(saved[0].split("-")[1])
    assert max(losses(run_dir)) == stopped_at

    run(
        [
            "model=tiny_init",
            f"hydra.run.dir={run_dir}",
            "train.max_steps=" + str(stopped_at + 2),
            "train.log_every=1",
            "train.resume=auto",
            *FAST,
        ]
    )
    assert max(losses(run_dir)) == stopped_at + 2


def test_eval_loss_covers_eval_samples_whatever_the_micro_batch(tmp_path):
    """eval/loss over the first train.eval_samples held-out examples, in micro-batches of 8 or
    of 64: the same examples, so the same loss."""
    losses = []
    for mb in (8, 64):
        run_dir = run(
            [
                "model=tiny_init", "algo=sft", "train.max_steps=1", "train.eval_samples=100",
                f"train.micro_batch_size={mb}", "train.batch_size=64", "data.eval_ratio=0.1",
                f"hydra.run.dir={tmp_path / str(mb)}",
            ]
        )  # fmt: skip
        losses.append(read_metrics(run_dir / "metrics.jsonl")[0]["eval/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_multirun_gives_each_job_its_own_dir(tmp_path, cli):
    proc = cli(
        "-m",
        "train.lr=1e-4,3e-4",
        "train.max_steps=2",
        "train.log_every=1",
        f"hydra.sweep.dir={tmp_path}",
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lrs = []
    for job in ("0", "1"):
        rows = read_metrics(tmp_path / job / "metrics.jsonl")
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]
        lrs.append(rows[1]["lr"])
        assert (tmp_path / job / "final" / "config.json").exists()
    assert lrs == pytest.approx([1e-4, 3e-4])


def test_data_with_no_loss_token_names_its_file_and_the_settings(tmp_path, cli):
    """Chats without an assistant turn, or rows cut to nothing by data.max_length: the error
    named neither the file nor what to change."""
    data = tmp_path / "user_only.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    proc = cli(
        "algo=sft", f"data={data}", "train.max_steps=1", "train.eval_samples=0",
        f"hydra.run.dir={tmp_path}/run", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        f"rltune: error: train data ({data}): no usable examples: all 1 had no loss token left "
        "at data.max_length=512; completion or assistant tokens are trained "
        "(algo.completion_only=true), so a chat needs an assistant turn"
    ) in proc.stderr
    assert "Loading weights" not in proc.stderr


def test_a_sweep_checks_every_job_before_the_first_trains(tmp_path, cli):
    """The bad value is in the last job: it is named before job 0 trains (nothing written)."""
    proc = cli(
        "-m", "train.lr=1e-4,-1", "train.max_steps=2", f"hydra.sweep.dir={tmp_path}", *FAST,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sweep job 1 (train.lr=-1" in proc.stderr and "train.lr=-1.0 must be > 0" in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_sweep_job_that_stops_on_bad_data_leaves_the_others_running(tmp_path, cli):
    """Bad input found only when a job reads its data: the job stops, the sweep goes on, and
    the command exits 2 naming the job. The error is also in that job's cli.log."""
    proc = cli(
        "-m", f"data.path={tmp_path}/nope.jsonl,null", "train.max_steps=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"stopped on bad input: job 0 (data.path={tmp_path}/nope.jsonl " in proc.stderr
    assert "not found" in (tmp_path / "sweep" / "0" / "cli.log").read_text()
    assert (tmp_path / "sweep" / "1" / "final" / "config.json").exists()


def test_lora_trains_only_adapters_and_exports_merged_model(tmp_path):
    run_dir = run(
        [
            "peft=lora",
            "model=tiny_init",
            f"hydra.run.dir={tmp_path}",
            "train.max_steps=5",
            "train.lr=1e-2",
            *FAST,
        ]
    )
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(REPO / "rltune" / "assets" / "tiny_init")
    base = base_model.state_dict()
    # rank-16 LoRA on every linear layer of the decoder (not lm_head): r * (in + out) each
    linears = [
        m
        for name, m in base_model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    ]
    adapters = sum(16 * (m.in_features + m.out_features) for m in linears)
    total = sum(p.numel() for p in base_model.parameters()) + adapters
    log_text = (run_dir / "cli.log").read_text()
    assert f"policy: {total:,} parameters, {adapters:,} trainable" in log_text
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert (run_dir / "final" / "adapter" / "adapter_config.json").exists()
    assert set(base) == set(merged)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed, "the merged model equals the base: adapters did not train"
    # only the linear layers carry adapters: embeddings and norms are untouched
    assert all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]
    assert not any("norm" in k or "embed" in k for k in changed)


def test_lora_export_saves_the_fp32_adapter_and_merges_it_before_casting(tmp_path):
    """bf16 compute (fp32 adapters on a bf16 base): final/adapter/ holds the adapter as trained,
    in fp32, and final/ is base + that update rounded once to bf16 (as merging in fp32 and then
    casting gives), not an update made of bf16-rounded adapters. Gradient checkpointing turned
    the KV cache off for training only: final/config.json has it on."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir = run(
        [
            "peft=lora",
            "train.dtype=bf16",
            "train.gradient_checkpointing=true",
            f"hydra.run.dir={tmp_path}",
            "train.max_steps=3",
            "train.lr=1e-2",
            *FAST,
            "train.eval_samples=0",
        ]
    )
    final = run_dir / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    assert json.loads((final / "config.json").read_text())["use_cache"] is True
    settings = json.loads((final / "adapter" / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    # the frozen base that trained: loaded in the compute dtype
    tiny = REPO / "rltune" / "assets" / "tiny"
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).state_dict()
    merged = load_file(final / "model.safetensors")
    merged_layers = 0
    for name, weight in merged.items():
        a = "base_model.model." + name.replace(".weight", ".lora_A.weight")
        expected = base[name].float()
        if a in adapter:
            delta = adapter[a.replace("lora_A", "lora_B")] @ adapter[a] * scale
            expected = expected + delta
            merged_layers += 1
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, expected.to(torch.bfloat16)), name
    assert merged_layers == 4 * 7  # every linear layer of the 4 decoder layers


def test_export_merges_into_a_base_of_a_third_dtype_in_fp32(tmp_path):
    """An fp16 base exported in bf16: the merge runs in fp32 and the sum is rounded once, to
    bf16 (not to fp16 first); the policy keeps its adapters and dtypes. A full model's in-memory
    config keeps use_cache off (for its training) while final/ has it on."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rltune.config import PeftConfig
    from rltune.export import export_final
    from rltune.lora import apply_lora
    from rltune.models import SHIPPED

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED["tiny"])
    base = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"], dtype=torch.float16)
    weight = base.model.layers[0].self_attn.q_proj.weight.float()
    model = apply_lora(base, PeftConfig(method="lora", target_modules=["q_proj"]))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["default"].weight.normal_(std=0.05)
    export_final(model, tokenizer, tmp_path / "lora", torch.bfloat16)
    delta = q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"]
    merged = load_file(tmp_path / "lora" / "model.safetensors")
    expected = (weight + delta).to(torch.bfloat16)
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.weight.dtype == torch.float16

    # the trainer's export, training over: the same file, merged into the model itself (no
    # second copy of the base on the device)
    export_final(model, tokenizer, tmp_path / "in_place", torch.bfloat16, in_place=True)
    in_place = load_file(tmp_path / "in_place" / "model.safetensors")
    assert torch.equal(in_place["model.layers.0.self_attn.q_proj.weight"], expected)
    assert (tmp_path / "in_place" / "adapter" / "adapter_model.safetensors").exists()
    merged_q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(merged_q) is torch.nn.Linear  # the live model was merged, not a copy of it

    full = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"])
    full.config.use_cache = False  # as train.gradient_checkpointing leaves it
    export_final(full, tokenizer, tmp_path / "full", torch.bfloat16)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["use_cache"] is True
    assert full.config.use_cache is False and full.dtype == torch.bfloat16


def test_wandb_logs_offline_without_a_key(tmp_path):
    env_key = os.environ.pop("WANDB_API_KEY", None)
    mode = os.environ.pop("WANDB_MODE", None)
    try:
        run_dir = run(
            [
                "logger=wandb",
                "model=tiny_init",
                f"hydra.run.dir={tmp_path}",
                "train.max_steps=2",
                *FAST,
            ]
        )
    finally:
        if env_key is not None:
            os.environ["WANDB_API_KEY"] = env_key
        if mode is not None:
            os.environ["WANDB_MODE"] = mode
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert "logging offline" in (run_dir / "cli.log").read_text()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_wandb_auto_mode_follows_the_environment(tmp_path, monkeypatch):
    """A login for a private wandb server counts as a key; WANDB_MODE and WANDB_DISABLED, a
    cluster's policy, win over a key."""
    from rltune.logging import _auto_mode

    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.mycorp.com\n  login user\n  password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert _auto_mode() == ("offline", "no API key configured")  # a login for another host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycorp.com")
    assert _auto_mode() == ("online", "an API key is configured")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert _auto_mode() == ("offline", "WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert _auto_mode() == ("disabled", "WANDB_DISABLED is set")


def test_a_sweeps_wandb_runs_are_named_by_their_overrides_and_grouped(tmp_path, monkeypatch):
    import types

    import wandb

    inits = []

    def fake_init(**kwargs):
        inits.append(kwargs)
        nothing = lambda *a, **k: None  # noqa: E731
        return types.SimpleNamespace(define_metric=nothing, log=nothing, finish=nothing)

    monkeypatch.setattr(wandb, "init", fake_init)
    run(["-m", "logger=wandb", "train.lr=1e-4,3e-4", "train.max_steps=1",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST])  # fmt: skip
    names = [i["name"] for i in inits]  # Hydra's override_dirname: every override, sorted
    assert len(names) == 2 and "train.lr=0.0001" in names[0] and "train.lr=0.0003" in names[1]
    assert names[0].startswith("algo=sft,logger=wandb,")
    assert [i["group"] for i in inits] == ["sweep", "sweep"]


def test_packing_fills_rows_and_trains(tmp_path):
    common = ["train.max_steps=3", "train.log_every=1", "data.max_length=128", *FAST]
    plain = run([*common, f"hydra.run.dir={tmp_path / 'plain'}"])
    packed = run([*common, "data.packing=true", f"hydra.run.dir={tmp_path / 'packed'}"])
    tokens = {
        name: [r["num_tokens"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
        for name, d in (("plain", plain), ("packed", packed))
    }
    # an arith example is ~18 tokens: a packed row of 128 holds ~7 of them
    assert tokens["packed"][-1] > 4 * tokens["plain"][-1]
    assert "packed rows" in (packed / "cli.log").read_text()


def test_eval_ratio_holds_out_rows_for_eval_loss(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(40)
        )
    )
    run_dir = run(
        [
            "algo=sft",
            f"data.path={path}",
            "data.eval_ratio=0.25",
            f"hydra.run.dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.micro_batch_size=4",
        ]
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert "eval/loss" in rows[0] and "eval/loss" in rows[-1]
    assert "eval/accuracy" not in rows[0]  # only the built-in task has a checker
    log_text = (run_dir / "cli.log").read_text()
    assert "train data: 30 rows" in log_text and "eval data: 10 rows" in log_text


def test_custom_data_without_path_names_the_key(tmp_path, cli):
    proc = cli("data=custom", f"hydra.run.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert "data.path must be set" in proc.stderr


def test_eval_samples_zero_logs_no_eval_metrics(tmp_path):
    run_dir = run(
        [
            f"hydra.run.dir={tmp_path}",
            "train.max_steps=2",
            "train.log_every=1",
            "train.eval_samples=0",
        ]
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert not any(k.startswith("eval/") for r in rows for k in r)


def test_non_finite_gradients_skip_the_update_instead_of_poisoning_weights(tmp_path):
    """lr=1e30 turns the weights to inf after the first update; later gradients are NaN, and
    those updates are skipped, logged and counted instead of silently applied."""
    run_dir = run(
        [
            "algo=sft",
            f"hydra.run.dir={tmp_path}",
            "train.max_steps=4",
            "train.log_every=1",
            "train.eval_samples=0",
            "train.lr=1e30",
            "train.max_grad_norm=0",
        ]
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[0].get("skipped_updates", 0) == 0
    assert sum(r.get("skipped_updates", 0) for r in rows) >= 1
    assert "update skipped" in (run_dir / "cli.log").read_text()


def test_compiled_forward_trains_like_the_eager_one(tmp_path):
    """train.compile=true (torch.compile on each model's decoder stack): the same packed SFT
    steps give the same losses as eager to 1e-4, final/ keeps plain parameter names, and the
    compiled stack is what the loss ran (SFT's loss from hidden states calls the decoder stack
    directly, so compiling the model's own forward would have compiled nothing that runs)."""
    from torch._dynamo.utils import counters

    common = [
        "algo=sft",
        "data.packing=true",
        "train.max_steps=3",
        "train.log_every=1",
        "train.eval_samples=0",
        "train.batch_size=8",
        "train.micro_batch_size=8",
    ]
    eager = run([*common, f"hydra.run.dir={tmp_path / 'eager'}"])
    counters.clear()
    compiled = run([*common, "train.compile=true", f"hydra.run.dir={tmp_path / 'compiled'}"])
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced what ran
    assert "train.compile: policy's Qwen2Model compiled" in (compiled / "cli.log").read_text()
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])

    from safetensors.torch import load_file

    names = set(load_file(compiled / "final" / "model.safetensors"))
    assert names == set(load_file(eager / "final" / "model.safetensors"))


def test_profile_step_writes_that_steps_operators_and_a_trace(tmp_path):
    """train.profile_step=2: profile.txt names step 2 and lists the operators the step ran (the
    model's matmuls, the fused AdamW update) by their own time; profile_trace.json is a Chrome
    trace; the run's metrics are written as without it."""
    run_dir = run(
        [
            "algo=sft",
            "train.max_steps=3",
            "train.log_every=1",
            "train.eval_samples=0",
            "train.profile_step=2",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    table = (run_dir / "profile.txt").read_text()
    assert table.startswith("step 2, sorted by self_cpu_time_total")
    assert "aten::mm" in table and "aten::_fused_adamw_" in table
    trace = json.loads((run_dir / "profile_trace.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert sorted(losses(run_dir)) == [1, 2, 3]
    assert "step 2 profiled" in (run_dir / "cli.log").read_text()


def test_micro_batches_sorted_by_length_leave_the_step_as_it_is(tmp_path):
    """A step's examples go to micro-batches by length (less padding); the loss is a sum over
    the step's tokens, so 4 micro-batches of 4 give the loss and update of 1 batch of 16."""
    common = ["algo=sft", "train.max_steps=2", "train.log_every=1", "train.eval_samples=0"]
    common += ["train.batch_size=16", "train.lr=1e-3", "train.save_every=2"]
    runs = {
        m: run([*common, f"train.micro_batch_size={m}", f"hydra.run.dir={tmp_path / str(m)}"])
        for m in (4, 16)
    }
    rows = {
        m: [r for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for m, d in runs.items()
    }
    for a, b in zip(rows[4], rows[16], strict=True):
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_fused_ce_trains_like_the_logits_path(tmp_path):
    """algo.fused_ce (the default: loss from hidden states, no logits): the same losses, token
    accuracy and gradient norms as the logits path over 3 steps, packed and not."""
    common = ["algo=sft", "train.max_steps=3", "train.log_every=1", "train.eval_samples=0"]
    for packing in ("false", "true"):
        runs = {
            fused: run(
                [*common, f"data.packing={packing}", f"algo.fused_ce={fused}"]
                + [f"hydra.run.dir={tmp_path / packing / fused}"]
            )
            for fused in ("true", "false")
        }
        assert "from hidden states, no logits" in (runs["true"] / "cli.log").read_text()
        rows = {
            f: [r for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
            for f, d in runs.items()
        }
        assert len(rows["true"]) == len(rows["false"]) == 3
        for a, b in zip(rows["true"], rows["false"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["mean_token_accuracy"] == b["mean_token_accuracy"]


def test_fused_ce_needs_a_plain_output_layer():
    """A head with a bias, or one that LoRA wraps, is not `layer(hidden)` alone: no fused loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rltune.hidden_states import plain_output_layer
    from rltune.models import SHIPPED

    model = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"])
    assert plain_output_layer(model) is model.lm_head
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"]),
        LoraConfig(target_modules=["q_proj", "lm_head"]),
    )
    assert plain_output_layer(lora) is None
    model.lm_head = torch.nn.Linear(128, 512, bias=True)
    assert plain_output_layer(model) is None
    lora_body = get_peft_model(
        AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"]), LoraConfig(target_modules=["q_proj"])
    )
    assert plain_output_layer(lora_body) is not None  # adapters in the body are fine

    class NeedsMore(torch.nn.Module):  # a decoder stack that cannot run on input ids alone
        def forward(self, input_ids, encoder_hidden_states, **kwargs):
            raise AssertionError("not reached")

    odd = AutoModelForCausalLM.from_pretrained(SHIPPED["tiny"])
    odd.get_decoder = NeedsMore
    assert plain_output_layer(odd) is None

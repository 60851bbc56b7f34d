"""Bad input stops the command early, with a non-zero exit and a message naming the culprit."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo.lrr=1", "Unknown config key 'algo.lrr'. Did you mean 'algo.lr'?"),
        ("train.max_stepz=3", "Did you mean 'train.max_steps'"),
        ("+algo.lrr=1", "Unknown config key 'algo.lrr'"),
        ("+train.max_stepz=3", "Did you mean 'train.max_steps'"),
        ("model=no_such_model", "model=no_such_model: no such option"),
        ("train.lr=abc", "train.lr=abc: Value 'abc' of type 'str' could not be converted"),
        ("no_such_section=1", "Could not override 'no_such_section'"),
        ("data=nope", "data=nope: no such option; one of: arith, custom (or a data file"),
        ("+recipe=nope", "recipe=nope: no such option; one of: dpo_ultrafeedback_qwen2.5_0.5b, "),
    ],
)
def test_bad_key_or_option_exits_fast_naming_it(tmp_path, cli, override, expected):
    """Hydra's own composition errors too: every bad command exits 2, a crash 1."""
    started = time.time()
    proc = cli(override, f"hydra.run.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert time.time() - started < 60
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing ran


def test_unknown_option_lists_the_valid_ones(tmp_path, cli):
    proc = cli("model=no_such_model", f"hydra.run.dir={tmp_path}", timeout=60)
    assert "tiny_init" in proc.stderr and "qwen-7b" in proc.stderr
    assert "base_model" not in proc.stderr  # the schema node is no option


def test_missing_data_file_is_named(tmp_path, cli):
    proc = cli(f"data.path={tmp_path}/nope.jsonl", f"hydra.run.dir={tmp_path}/run", timeout=60)
    assert proc.returncode == 2
    assert f"{tmp_path}/nope.jsonl" in proc.stderr and "not found" in proc.stderr


def test_unknown_columns_are_listed(tmp_path, cli):
    path = tmp_path / "weird.jsonl"
    path.write_text(json.dumps({"question": "q", "reply": "r"}) + "\n")
    proc = cli(f"data.path={path}", f"hydra.run.dir={tmp_path}/run", timeout=60)
    assert proc.returncode == 2
    assert (
        "['question', 'reply']" in proc.stderr
        and "prompt_completion (prompt, completion)" in proc.stderr
    )


def test_null_field_names_file_line_and_column(tmp_path, cli):
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    rows[3]["completion"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli(f"data.path={path}", f"hydra.run.dir={tmp_path}/run", timeout=60)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "line 4" in proc.stderr and "completion" in proc.stderr


def test_preference_data_is_the_wrong_kind_for_sft(tmp_path, cli):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    proc = cli("algo=sft", f"data.path={path}", f"hydra.run.dir={tmp_path}/run", timeout=60)
    assert proc.returncode == 2
    assert "'preference'" in proc.stderr and "algo=sft needs one of" in proc.stderr


def test_unreachable_hub_model_names_model_path(tmp_path, cli):
    """Real presets point at hub ids; with no hub the run stops at the tokenizer, naming the key."""
    proc = cli(
        "model=qwen2.5-0.5b", f"hydra.run.dir={tmp_path}", timeout=120, env={"HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 2
    assert "model.path=Qwen/Qwen2.5-0.5B-Instruct: cannot load the tokenizer" in proc.stderr


def test_qlora_without_cuda_fails_before_loading(tmp_path, cli):
    proc = cli("peft=qlora", "train.device=cpu", f"hydra.run.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert "peft=qlora quantises the base model to 4 bits with bitsandbytes" in proc.stderr
    assert "Loading weights" not in proc.stderr


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("[q_prj,v_proj]", "peft.target_modules: 'q_prj' matches no module"),
        ("[lm_head,q_proj]", "peft.target_modules: 'lm_head' puts an adapter on lm_head, whose"),
    ],
)
def test_a_lora_target_that_cannot_be_trained_is_a_config_error(tmp_path, cli, targets, expected):
    """A name the model lacks (not peft's traceback; and a good name beside it must not train
    alone), or the tiny model's lm_head, tied to its embedding: exit status 2, before a step."""
    proc = cli(
        "algo=sft", "peft=lora", f"peft.target_modules={targets}", f"hydra.run.dir={tmp_path}",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"rltune: error: {expected}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_an_online_run_with_a_tokenizer_without_eos_or_pad_names_it(tmp_path, cli):
    """It crashed in the rollout's left padding (`Could not infer dtype of NoneType`)."""
    import shutil

    from rltune.models import SHIPPED

    folder = tmp_path / "tok"
    shutil.copytree(SHIPPED["tiny"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**settings, "eos_token": None, "pad_token": None})
    )
    proc = cli(
        "algo=grpo", f"model.tokenizer_path={folder}", "train.max_steps=1",
        f"hydra.run.dir={tmp_path}/run", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"rltune: error: model.tokenizer_path={folder}: the tokenizer has no eos_token" in (
        proc.stderr
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("reward.model_path=./no/such/rm", "reward.model_path=./no/such/rm: no such folder"),
        ("deepspeed.config=./no/such.json", "deepspeed.config=./no/such.json: no such file"),
        (
            "train.compile=true deepspeed=zero2",
            "train.compile=true does not combine with deepspeed=zero2",
        ),
        (
            "train.max_steps=3 train.profile_step=5",
            "train.profile_step=5 must be 0 (off) or a step from 1 to train.max_steps=3",
        ),
    ],
)
def test_missing_reward_model_or_deepspeed_config_fails_before_loading(
    tmp_path, cli, override, expected
):
    proc = cli(*override.split(), f"hydra.run.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Loading weights" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"zero_optimization": {', "not valid JSON: Expecting property name"),
        ('[{"stage": 2}]', "not a JSON object of DeepSpeed settings (a list)"),
    ],
)
def test_a_deepspeed_config_that_is_no_json_object_fails_before_loading(
    tmp_path, cli, text, expected
):
    config = tmp_path / "ds.json"
    config.write_text(text)
    proc = cli(f"deepspeed.config={config}", f"hydra.run.dir={tmp_path}/run", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"rltune: error: deepspeed.config={config}: {expected}" in proc.stderr
    assert "Loading weights" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", ["bogus", "Offline", ""])
def test_a_wandb_mode_that_wandb_refuses_fails_before_loading(tmp_path, cli, mode):
    """wandb.init validates WANDB_MODE exactly, whatever mode it is given: a value it refuses
    crashed the run with a pydantic traceback after the models had loaded."""
    proc = cli(
        "logger=wandb", "train.max_steps=1", f"hydra.run.dir={tmp_path}", timeout=60,
        env={"WANDB_MODE": mode},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"rltune: error: logger.backend=wandb: the environment's WANDB_MODE={mode!r} is not" in (
        proc.stderr
    )
    assert "Loading weights" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_crash_is_written_to_the_runs_log(tmp_path, monkeypatch):
    """A run that crashes leaves its traceback in cli.log, not only on the console."""
    from rltune import trainer
    from rltune.cli import run

    def crash(*args, **kwargs):
        raise RuntimeError("out of something at step 7")

    monkeypatch.setattr(trainer, "train", crash)
    with pytest.raises(SystemExit) as stopped:  # Hydra reports the crash and exits 1
        run(["algo=sft", f"hydra.run.dir={tmp_path}"])
    assert stopped.value.code == 1
    log = (tmp_path / "cli.log").read_text()
    assert "the run failed:" in log and "RuntimeError: out of something at step 7" in log


def test_help_and_version_are_rltunes(cli):
    help_text = cli("--help", timeout=60).stdout
    assert help_text.startswith("rltune: post-train language models")
    assert "algo: " in help_text and "model: " in help_text
    version = cli("--version", timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("rltune ")


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(tmp_path, cli):
    """`deepspeed --module rltune ...` appends --local_rank=N, which Hydra would refuse."""
    from rltune.cli import launcher_args_removed

    assert launcher_args_removed(["a=1", "--local_rank", "3", "b=2", "--local-rank=1"]) == [
        "a=1",
        "b=2",
    ]
    proc = cli("--local_rank=0", "algo=sft", "train.max_steps=1", "train.eval_samples=0",
               f"hydra.run.dir={tmp_path}", timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "final" / "config.json").exists()


def test_data_takes_a_file_folder_or_hub_id_for_data_custom(tmp_path):
    from rltune.cli import data_shorthand

    (tmp_path / "prefs").mkdir()
    assert data_shorthand(["algo=dpo", "data=my_prefs.jsonl", "train.lr=1"]) == [
        "algo=dpo", "data=custom", "data.path=my_prefs.jsonl", "train.lr=1",
    ]  # fmt: skip
    assert data_shorthand([f"data={tmp_path / 'prefs'}"])[1] == f"data.path={tmp_path / 'prefs'}"
    assert data_shorthand(["data=openai/gsm8k"]) == ["data=custom", "data.path=openai/gsm8k"]
    # presets, a bare word (a preset's typo, told as such) and sweeps over presets are Hydra's
    for args in (["data=arith"], ["data=custom"], ["data=arth"], ["-m", "data=arith,a.jsonl"]):
        assert data_shorthand(args) == args
    # a sweep over data (a sweep over data.path), quotes and `+` as Hydra reads them
    assert data_shorthand(["-m", "data=a.jsonl,org/b"]) == [
        "-m", "data=custom", "data.path=a.jsonl,org/b",
    ]  # fmt: skip
    assert data_shorthand(["data='my,file.jsonl'"])[1] == "data.path='my,file.jsonl'"
    assert data_shorthand(["+data=a.jsonl"]) == ["data=custom", "data.path=a.jsonl"]


def test_data_takes_a_list_of_files_folders_or_hub_ids_for_data_path(tmp_path):
    from rltune.cli import data_shorthand

    assert data_shorthand(["data=[a.jsonl,org/b]", "algo=sft"]) == [
        "data=custom", "data.path=[a.jsonl,org/b]", "algo=sft",
    ]  # fmt: skip
    # a sweep whose values are lists of data, or data, sweeps data.path
    assert data_shorthand(["-m", "data=[a.jsonl,b.csv],c.jsonl"]) == [
        "-m", "data=custom", "data.path=[a.jsonl,b.csv],c.jsonl",
    ]  # fmt: skip
    # a list of presets is Hydra's (merged in order), and so is a sweep of a preset and a list
    for args in (["data=[arith]"], ["data=[arith,custom]"], ["-m", "data=arith,[a.jsonl]"]):
        assert data_shorthand(args) == args


def test_a_list_of_two_data_files_trains_on_both(tmp_path):
    from rltune.cli import run

    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n' * 2)
    (tmp_path / "b.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n')
    run_dir = run(
        [
            "algo=sft",
            f"data=[{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}]",
            "train.max_steps=1",
            "train.batch_size=1",
            "train.micro_batch_size=1",
            "train.eval_samples=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert "train data: 3 rows (prompt_completion)" in (run_dir / "cli.log").read_text()


def test_a_list_that_mixes_a_preset_and_data_is_refused_naming_both(tmp_path, cli):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    proc = cli(f"data=[arith,{tmp_path / 'a.jsonl'}]", f"hydra.run.dir={tmp_path}/run", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"mixes data ({tmp_path / 'a.jsonl'}) with values that are no file" in proc.stderr
    assert "no file, folder or hub id (arith)" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unknown_data_option_with_a_slash_is_named_whole(tmp_path, cli):
    """A sweep over a preset and a folder that does not exist: the folder's path is the
    option named, not split at its last slash into a group of its own."""
    proc = cli("-m", "data=arith,sub/nope", f"hydra.sweep.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "(data=sub/nope): data=sub/nope: no such option; one of: arith, custom" in proc.stderr


def test_dict_settings_take_new_keys_without_a_plus():
    from rltune.cli import dict_overrides

    assert dict_overrides(
        ["data.columns={question: prompt}", "data.columns.q=prompt", "model.lrs={grpo: 1e-5}"]
    ) == [
        "++data.columns={question: prompt}",
        "++data.columns.q=prompt",
        "++model.lrs={grpo: 1e-5}",
    ]
    # keys that are no dict, and overrides that already add, are left as they are
    args = ["data.path=x.jsonl", "+data.columns.q=prompt", "model.lrs_x=1", "-m"]
    assert dict_overrides(args) == args


@pytest.mark.parametrize(
    "rename", ["data.columns={question: prompt}", "data.columns.question=prompt"]
)
def test_data_columns_renames_as_the_readme_writes_it(tmp_path, rename):
    """Hydra's struct mode refused a key the empty dict did not have ('Key 'question' is not
    in struct') unless the override began with +."""
    from rltune.cli import run

    (tmp_path / "q.jsonl").write_text('{"question": "1+1=", "completion": "2"}\n' * 2)
    run_dir = run(
        [
            "algo=sft",
            f"data={tmp_path / 'q.jsonl'}",
            rename,
            "train.max_steps=1",
            "train.batch_size=2",
            "train.micro_batch_size=2",
            "train.eval_samples=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert "train data: 2 rows (prompt_completion)" in (run_dir / "cli.log").read_text()

"""Reward functions: built-ins by hand, resolution errors before any model loads, and scoring that
survives functions that raise, hang or return garbage."""

import logging
import math
import threading
import time

import pytest

from rltune import rewards
from rltune.config import ConfigError, RewardConfig
from rltune.rewards import calls as reward_calls
from rltune.rewards.builtin import (
    extract_answer,
    length_penalty,
    math_answer,
    reference_answer,
    task_reward,
)
from rltune.tasks.arith import is_correct


def test_task_reward_uses_the_answer_column():
    fn = task_reward(is_correct)
    assert fn(["p"] * 3, ["95", " 96", "95"], answer=["95", "95", None]) == [1.0, 0.0, None]


def test_math_answer_prefers_boxed_then_last_number():
    assert extract_answer(r"so \boxed{\frac{1}{2}} and 7") == r"\frac{1}{2}"
    assert extract_answer("first 3, then 1,234.") == "1,234"
    assert extract_answer("no digits") is None
    got = math_answer(
        ["p"] * 4,
        [r"answer \boxed{42}", "it is 1,000", "maybe 3.50", "none"],
        answer=["42", "1000", "3.5", "1"],
    )
    assert got == [1.0, 1.0, 1.0, 0.0]


def test_math_answer_takes_a_gsm8k_reference_by_what_follows_its_marks():
    solution = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs, for 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert reference_answer(solution) == "18"
    assert reference_answer("#### 1,250") == "1,250" and reference_answer("7") == "7"
    got = math_answer(
        ["p"] * 3,
        [r"so \boxed{18}", "she makes 18 dollars", "9 eggs"],
        answer=[solution] * 3,
    )
    # compared with the whole solution, no answer would match
    assert got == [1.0, 1.0, 0.0]
    assert math_answer(["p"], ["1250"], answer=["#### 1,250"]) == [1.0]


def test_length_penalty_is_dapos_soft_overlong_ramp():
    """max 16 tokens, buffer 4: lengths <= 12 get 0; 14 gets -(14 - 12) / 4 = -0.5; 16 gets -1."""
    fn = length_penalty(16, 4)
    got = fn(["p"] * 3, ["a"] * 3, completion_ids=[[0] * 12, [0] * 14, [0] * 16])
    assert got == [0.0, -0.5, -1.0]


def test_format_reward_and_resolution_of_builtins():
    cfg = RewardConfig(funcs=["format", "length", "arith"], format_pattern=r"^\d+$")
    fns = rewards.resolve(cfg, max_new_tokens=8)
    assert [f.name for f in fns] == ["format", "length", "arith"]
    assert fns[0].fn(["p", "p"], ["123", "12a"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (RewardConfig(funcs=["arithh"]), "unknown reward function 'arithh'"),
        (RewardConfig(funcs=["no_such_module:fn"]), "cannot import 'no_such_module'"),
        (RewardConfig(funcs=["math:no_such_fn"]), "'math' has no function 'no_such_fn'"),
        (RewardConfig(funcs=["missing_file.py:fn"]), "no such file"),
        (RewardConfig(funcs=["arith"], weights=[1.0, 2.0]), "reward.weights has 2 entries"),
        (RewardConfig(funcs=[]), "nothing to score"),
        (RewardConfig(funcs=["format"], format_pattern="(unclosed"), "reward.format_pattern"),
        (RewardConfig(funcs=["arith"], weights=[float("nan")]), "nan is not a finite number"),
        (RewardConfig(funcs=["arith"], weights=[float("inf")]), "inf is not a finite number"),
        (RewardConfig(funcs=["math:reward_model"]), "'reward_model' is the reward model's"),
    ],
)
def test_resolution_errors_name_the_entry(cfg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        rewards.resolve(cfg, max_new_tokens=8)


def test_user_function_from_a_file(tmp_path):
    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n"
    )
    cfg = RewardConfig(funcs=[f"{tmp_path / 'myrewards.py'}:brevity"])
    (fn,) = rewards.resolve(cfg, max_new_tokens=8)
    assert fn.name == "brevity"
    assert fn.fn(["p"], ["abc"]) == [-3]


def _flaky(prompts, completions, **columns):
    """Raises on any batch holding 'boom'; so only those samples lose their reward."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return [1.0] * len(completions)


def _slow(prompts, completions, **columns):
    if any("slow" in c for c in completions):
        time.sleep(5)
    return [0.5] * len(completions)


def _garbage(prompts, completions, **columns):
    return ["x"] * len(completions)


def _sometimes_none(prompts, completions, **columns):
    return [None if c == "skip" else 2.0 for c in completions]


def test_score_survives_raising_hanging_and_bad_functions():
    fns = [
        rewards.RewardFunction("flaky", _flaky, 1.0),
        rewards.RewardFunction("slow", _slow, 2.0),
    ]
    started = time.perf_counter()
    out = rewards.score(fns, ["p"] * 3, ["ok", "boom", "slow"], {}, timeout_s=0.3)
    assert time.perf_counter() - started < 3  # the 5 s sleeps were abandoned, not awaited
    assert out.values["flaky"] == [1.0, None, 1.0]
    assert out.values["slow"] == [0.5, 0.5, None]
    assert out.errors == {"flaky": 1, "slow": 1}
    # total = 1 x flaky + 2 x slow; a sample any function failed on has no reward
    assert out.total[0].item() == pytest.approx(2.0)
    assert math.isnan(out.total[1]) and math.isnan(out.total[2])

    bad = rewards.score(
        [rewards.RewardFunction("garbage", _garbage, 1.0)], ["p"] * 2, ["a", "b"], {}, timeout_s=1
    )
    assert bad.errors == {"garbage": 2} and bad.total.isnan().all()


def test_none_is_not_applicable_not_an_error():
    fns = [
        rewards.RewardFunction("some", _sometimes_none, 1.0),
        rewards.RewardFunction("flaky", _flaky, 1.0),
    ]
    out = rewards.score(fns, ["p"] * 2, ["skip", "ok"], {}, timeout_s=1)
    assert out.errors == {"some": 0, "flaky": 0}
    assert out.total.tolist() == [1.0, 3.0]  # "skip": only flaky's 1.0 counts


def test_numpy_torch_and_bool_values_are_numbers():
    """A user function returning numpy floats, one-element tensors, bools or a whole tensor is
    scored, not counted as failing on every sample."""
    import numpy as np
    import torch

    fns = [
        rewards.RewardFunction("np", lambda p, c, **k: [np.float32(0.5), np.int64(1)], 1.0),
        rewards.RewardFunction("pt", lambda p, c, **k: [torch.tensor(2.0), True], 1.0),
        rewards.RewardFunction("vec", lambda p, c, **k: torch.tensor([1.0, 0.0]), 1.0),
    ]
    scores = rewards.score(fns, ["p", "q"], ["a", "b"], {}, timeout_s=5)
    assert scores.errors == {"np": 0, "pt": 0, "vec": 0}
    assert scores.total.tolist() == [3.5, 2.0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            1.0,
            "returned a float, not a list of one number (or None) for each of the 2 completion(s)",
        ),
        ((x for x in [1.0, 0.0]), "returned a generator, not a list of one number (or None) for"),
        ([1.0, 0.0, 1.0], "returned a list of 3 values for 2 completion(s)"),
    ],
)
def test_a_return_value_that_is_not_one_number_per_completion_says_what_it_was(value, message):
    """A float or a generator was reported as 'float of no items', 'generator of no items'."""
    with pytest.raises(TypeError) as err:
        reward_calls._checked(value, 2)
    assert message in str(err.value)
    scores = rewards.score(
        [rewards.RewardFunction("f", lambda p, c, **k: 1.0, 1.0)], ["p"], ["a"], {}, timeout_s=5
    )
    assert scores.last_error["f"].startswith("TypeError: returned a float, not a list")


def test_a_function_failing_on_every_sample_stops_the_run_after_three_rollouts():
    """A signature without **columns fails whenever there are columns: every sample fails, the
    rewards are all missing and nothing would train. Three such rollouts in a row stop the run
    (a rollout it scores resets the count)."""
    broken = rewards.RewardFunction("noargs", lambda prompts, completions: [1.0], 1.0)
    failing = rewards.score([broken], ["p", "q"], ["a", "b"], {"answer": [1, 2]}, timeout_s=5)
    fine = rewards.score([broken], ["p"], ["a"], {}, timeout_s=5)
    assert failing.errors["noargs"] == 2 and fine.errors["noargs"] == 0
    assert "TypeError" in failing.last_error["noargs"]
    no_reward = rewards.NO_REWARD  # no sample has a reward when its only function failed
    assert rewards.failed_everywhere(failing, 2) == {"noargs": 1.0, no_reward: 1.0}
    assert rewards.failed_everywhere(fine, 1) == {"noargs": 0.0, no_reward: 0.0}
    watch = rewards.FailureWatch()
    for failed in (True, True, False, True, True):
        watch.update({"noargs": failed}, failing.last_error)
    with pytest.raises(rewards.RewardError, match="noargs failed on every sample of 3 rollouts"):
        watch.update({"noargs": True}, failing.last_error)


def test_a_run_in_which_no_sample_gets_a_reward_stops_after_three_rollouts(tmp_path, cli):
    """None means 'does not apply'; a function that applies to nothing leaves every advantage 0
    and the run would train on nothing while looking alive. A sample scored by any function
    counts; three rollouts in a row without one stop the run."""
    never = rewards.RewardFunction("never", lambda p, c, **k: [None] * len(c), 1.0)
    some = rewards.RewardFunction("some", lambda p, c, **k: [1.0] + [None] * (len(c) - 1), 1.0)
    unscored = rewards.score([never], ["p", "q"], ["a", "b"], {}, timeout_s=5)
    assert rewards.failed_everywhere(unscored, 2) == {"never": 0.0, rewards.NO_REWARD: 1.0}
    scored = rewards.score([never, some], ["p", "q"], ["a", "b"], {}, timeout_s=5)
    assert rewards.failed_everywhere(scored, 2)[rewards.NO_REWARD] == 0.0

    (tmp_path / "user_rewards.py").write_text(
        "def never(prompts, completions, **columns):\n    return [None] * len(completions)\n"
    )
    proc = cli(
        "reward.funcs=[" + str(tmp_path / "user_rewards.py") + ":never]",
        "train.eval_samples=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no completion got a reward in 3 rollouts in a row" in proc.stderr


def test_a_checker_without_an_answer_column_fails_before_loading(tmp_path, cli):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n')
    proc = cli("data=custom", f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "arith compares each completion with the row's 'answer' column" in proc.stderr
    assert str(data) in proc.stderr
    assert "Loading weights" not in proc.stderr  # before any model loaded


def _eval_file_without_answers(tmp_path):
    """Training prompts with answers, and an eval file whose prompt has none (arith reads it)."""
    data, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    held_out.write_text('{"prompt": "3+3="}\n')
    return data, held_out


def test_eval_rows_without_the_answer_column_fail_before_loading(tmp_path, cli):
    """data.eval_path rows are checked as data.path's are: an eval file without the column a
    reward reads would otherwise give eval/reward NaN at every eval, after the whole run."""
    data, held_out = _eval_file_without_answers(tmp_path)
    proc = cli(
        "data=custom",
        f"data.path={data}",
        f"data.eval_path={held_out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert (
        f"arith compares each completion with the row's 'answer' column, and no row of "
        f"data.eval_path={held_out} has one"
    ) in proc.stderr
    assert "Loading weights" not in proc.stderr  # before any model loaded


def _trl_style(completions, **kwargs):
    return [1.0] * len(completions)


def _needs_level(prompts, completions, level, **kwargs):
    return [float(level[0])] * len(completions)


def test_a_function_that_cannot_take_the_columns_fails_before_any_rollout():
    """TRL's fn(completions, **kwargs) would fail on every sample, found only after 3 rollouts;
    a required column the data lacks likewise."""
    rows = [{"answer": "3"}, {"answer": "5"}]
    ok = rewards.RewardFunction("ok", _needs_level, 1.0)
    rewards.check_columns([ok], [{"answer": "3", "level": 1}], "data.path=x.jsonl")
    for f, message in [
        (rewards.RewardFunction("_trl_style", _trl_style, 1.0), r"_trl_style\(completions"),
        (ok, "missing a required argument: 'level'"),
    ]:
        with pytest.raises(rewards.RewardError, match=message) as err:
            rewards.check_columns([f], rows, "data.path=x.jsonl")
        assert "answer, completion_ids, truncated" in str(err.value)


def _editor(prompts, completions, **columns):
    prompts[0][0]["content"] = "edited"
    completions[0] = "edited"
    columns["answer"].clear()
    return [0.0] * len(completions)


def _reader(prompts, completions, **columns):
    return [float(prompts[0][0]["content"] == "q" and c == "a") for c in completions]


def test_a_function_editing_its_arguments_changes_nothing_for_the_others():
    prompts, completions = [[{"role": "user", "content": "q"}]], ["a"]
    columns = {"answer": ["1"]}
    fns = [
        rewards.RewardFunction("editor", _editor, 1.0),
        rewards.RewardFunction("r", _reader, 1.0),
    ]
    out = rewards.score(fns, prompts, completions, columns, timeout_s=5)
    assert out.values["r"] == [1.0] and out.errors == {"editor": 0, "r": 0}
    assert prompts[0][0]["content"] == "q" and completions == ["a"] and columns["answer"] == ["1"]


def test_retries_after_a_timeout_share_one_more_timeout():
    """A function that hangs on the batch: its per-sample retries get one timeout_s between
    them, not one each, so 6 samples cost 2 waits, not 7."""
    calls = []

    def hangs(prompts, completions, **columns):
        calls.append(len(completions))
        time.sleep(3)
        return [1.0] * len(completions)

    out = rewards.score(
        [rewards.RewardFunction("hangs", hangs, 1.0)], ["p"] * 6, ["c"] * 6, {}, timeout_s=0.2
    )
    assert calls == [6, 1]
    assert out.errors == {"hangs": 6} and out.total.isnan().all()
    assert "no time left" in out.last_error["hangs"]


def test_a_function_that_hangs_for_good_holds_a_bounded_number_of_threads():
    """A function whose batch calls never return (a socket read without a timeout) while
    single samples score: each rollout abandons one more thread at its timeout. Past
    MAX_HUNG_CALLS still running, the function gets no new call and its samples fail, so
    rollout after rollout the threads stop piling up (a run of 1,500 steps held 1,500 of
    them); once the hung calls return, it scores again."""
    release = threading.Event()
    inside = []  # one entry per call now running in the function

    def hangs_on_batches(prompts, completions, **columns):
        inside.append(1)
        try:
            if len(completions) > 1:
                release.wait()
            return [1.0] * len(completions)
        finally:
            inside.pop()

    fn = rewards.RewardFunction("hangs", hangs_on_batches, 1.0)
    try:
        for _ in range(reward_calls.MAX_HUNG_CALLS - 1):  # a rollout: a hung batch, retries score
            out = rewards.score([fn], ["p"] * 3, ["a", "b", "c"], {}, timeout_s=0.05)
            assert out.errors == {"hangs": 0}
        for _ in range(3):  # the first hangs its batch too, then no call starts
            out = rewards.score([fn], ["p"] * 3, ["a", "b", "c"], {}, timeout_s=0.05)
            assert out.errors == {"hangs": 3} and out.total.isnan().all()
            assert "still running past their reward.timeout_s" in out.last_error["hangs"]
        assert len(inside) == reward_calls.MAX_HUNG_CALLS
    finally:
        release.set()
    for thread in fn.hung:
        thread.join(5)
    out = rewards.score([fn], ["p"] * 3, ["a", "b", "c"], {}, timeout_s=5)
    assert out.errors == {"hangs": 0} and out.total.tolist() == [1.0, 1.0, 1.0]


def test_a_function_that_takes_one_sample_at_a_time_warns_once_then_counts(caplog):
    """A function that reads completions[0] alone fails on every batch and scores every sample
    on its retry. Each rollout still tries the batch first and scores the same as before; the
    failure is logged once (a 200-step run's log held 200 copies), and each step's
    batch_failures says that it happened again."""
    calls = []

    def one_at_a_time(prompts, completions, **columns):
        calls.append(len(completions))
        if len(completions) > 1:
            raise ValueError("one completion at a time, please")
        return [float(len(completions[0]))]

    single = rewards.RewardFunction("single", one_at_a_time, 1.0)
    steady = rewards.RewardFunction("steady", lambda p, c, **k: [0.5] * len(c), 1.0)
    failures = 0
    with caplog.at_level(logging.WARNING, logger=reward_calls.log.name):
        for _ in range(4):  # four rollouts
            out = rewards.score([single, steady], ["p"] * 3, ["a", "bb", "ccc"], {}, timeout_s=5)
            assert out.values["single"] == [1.0, 2.0, 3.0] and out.total.tolist() == [1.5, 2.5, 3.5]
            assert out.errors == {"single": 0, "steady": 0}
            assert out.batch_failures == {"single": 1, "steady": 0}
            failures += out.batch_failures["single"]
    assert calls == [3, 1, 1, 1] * 4
    assert failures == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert warned[0].startswith(
        "reward single failed on the batch (ValueError: one completion at a time, please (at "
    )
    assert "not logged, but counted in rewards/single/batch_failures" in warned[0]


def test_columns_named_like_the_callers_parameters_reach_the_function():
    """Data columns are passed as keyword arguments: one named `fn`, `timeout_s` or `hung`
    reaches the reward function instead of clashing with the timeout wrapper's parameters."""

    def reads(prompts, completions, fn, timeout_s, hung, **columns):
        return [float(a + b + c) for a, b, c in zip(fn, timeout_s, hung, strict=True)]

    columns = {"fn": [1, 2], "timeout_s": [10, 20], "hung": [100, 200]}
    out = rewards.score(
        [rewards.RewardFunction("reads", reads, 1.0)], ["p", "q"], ["a", "b"], columns, timeout_s=5
    )
    assert out.errors == {"reads": 0} and out.total.tolist() == [111.0, 222.0]


def test_a_failure_names_the_line_of_the_users_file_and_trls_completion_shape(tmp_path):
    """A reward function that fails steps into a run is found by its file and line: the
    innermost line of the user's code, past Python's own modules (here `re`, which raises the
    error). A TRL reward function that reads a message-list prompt's completions as
    `c[0]["content"]` is told that completions are strings here."""
    source = tmp_path / "my_rewards.py"
    source.write_text(
        "import re\n"
        "\n"
        "def trl_style(prompts, completions, **columns):\n"
        '    return [float(len(completions[0][0]["content"]))]\n'
        "\n"
        "def bad_regex(prompts, completions, **columns):\n"
        '    return [float(bool(re.match("(", completions[0])))]\n'
    )
    chat = [[{"role": "user", "content": "2+2?"}]] * 2
    trl_style = rewards.RewardFunction("trl", rewards.import_function(f"{source}:trl_style"), 1.0)
    bad_regex = rewards.RewardFunction("re", rewards.import_function(f"{source}:bad_regex"), 1.0)
    out = rewards.score([trl_style, bad_regex], chat, ["4", "5"], {}, timeout_s=5)
    assert out.errors == {"trl": 2, "re": 2}
    # (Python 3.10 says "string indices must be integers", later ones add ", not 'str'")
    assert out.last_error["trl"].startswith("TypeError: string indices must be integers")
    assert out.last_error["trl"].endswith(
        f" (at {source}:4, in trl_style); completions are the generated text (strings), also "
        "for message-list prompts, where TRL passes [{'role': 'assistant', 'content': ...}]"
    )
    assert "missing ), unterminated subpattern" in out.last_error["re"]
    assert out.last_error["re"].endswith(f"(at {source}:7, in bad_regex)")
    # string prompts: the same failure, without the hint about message-list prompts
    plain = rewards.score([trl_style], ["2+2?", "3+3?"], ["4", "6"], {}, timeout_s=5)
    assert plain.last_error["trl"].endswith(f"(at {source}:4, in trl_style)")


def test_a_failure_inside_eval_names_the_users_line_not_string(tmp_path):
    """An arithmetic reward that `eval`s the completion fails in code that has no file (its
    frame is `<string>`, line 1): the failure names the user's line that called eval."""
    source = tmp_path / "eval_rewards.py"
    source.write_text(
        "def evaluates(prompts, completions, **columns):\n"
        "    return [float(eval(c)) for c in completions]\n"
    )
    fn = rewards.RewardFunction("ev", rewards.import_function(f"{source}:evaluates"), 1.0)
    out = rewards.score([fn], ["1+1=", "2+2="], ["two", "1/0"], {}, timeout_s=5)
    assert out.last_error["ev"].startswith("ZeroDivisionError: division by zero (at ")
    assert f"(at {source}:2, in " in out.last_error["ev"]


def test_eval_rows_are_not_checked_when_no_eval_runs(tmp_path):
    """train.eval_samples=0 turns eval off: an eval file without the column a reward reads
    is never scored, so it is no reason to stop the run (as it is when eval runs, above)."""
    from rltune.cli import run

    data, held_out = _eval_file_without_answers(tmp_path)
    run_dir = run(
        [
            "data=custom",
            f"data.path={data}",
            f"data.eval_path={held_out}",
            "train.eval_samples=0",
            "train.max_steps=1",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert (run_dir / "final" / "config.json").exists()

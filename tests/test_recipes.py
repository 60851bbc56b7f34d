"""The recipes for real models and hub datasets, run on the shipped tiny model: the hub is
replaced by rows of each dataset's own shape (its columns, splits and subset), built from the
arithmetic task so that the tiny model can answer them."""

from __future__ import annotations

import datasets
import pytest

from rltune.cli import run
from rltune.data.formats import with_system_turn
from rltune.logging import read_metrics
from rltune.tasks import arith

pytestmark = pytest.mark.slow

TINY = ["model=tiny", "train.max_steps=2", "train.log_every=1", "train.save_every=0"]


def _problems(split: str, n: int) -> list[dict]:
    return arith.rows("prompt_answer", n, seed=1, split={"train": "train", "test": "eval"}[split])


def _gsm8k(split: str) -> list[dict]:
    """openai/gsm8k's shape: a question, and a solution whose last line is `#### <number>`."""
    return [
        {"question": p["prompt"][-1]["content"], "answer": f"Work it out.\n#### {p['answer']}"}
        for p in _problems(split, 64)
    ]


def _capybara(split: str) -> list[dict]:
    """trl-lib/Capybara's shape: source, messages (two turns here), num_turns."""
    rows = []
    for a, b in zip(_problems(split, 64)[::2], _problems(split, 64)[1::2], strict=True):
        turns = [
            [{"role": "user", "content": p["prompt"][-1]["content"]}]
            + [{"role": "assistant", "content": p["answer"]}]
            for p in (a, b)
        ]
        rows.append({"source": "arith", "messages": turns[0] + turns[1], "num_turns": 2})
    return rows


def _ultrafeedback(split: str) -> list[dict]:
    """trl-lib/ultrafeedback_binarized's shape: chosen and rejected conversations whose shared
    first turn is the prompt, and their scores."""
    rows = []
    for p in _problems(split, 64):
        user = {"role": "user", "content": p["prompt"][-1]["content"]}
        wrong = str(int(p["answer"]) + 1)
        rows.append(
            {
                "chosen": [user, {"role": "assistant", "content": p["answer"]}],
                "rejected": [user, {"role": "assistant", "content": wrong}],
                "score_chosen": 9.0,
                "score_rejected": 2.0,
            }
        )
    return rows


def _ultrafeedback_h4(split: str) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized's shape: the prompt as a string beside the pair,
    in splits train_prefs and test_prefs."""
    rows = _ultrafeedback(split.removesuffix("_prefs"))
    return [{"prompt": r["chosen"][0]["content"], "prompt_id": "0", **r} for r in rows]


HUB = {"openai/gsm8k": _gsm8k, "trl-lib/Capybara": _capybara}
HUB["trl-lib/ultrafeedback_binarized"] = _ultrafeedback
HUB["HuggingFaceH4/ultrafeedback_binarized"] = _ultrafeedback_h4


@pytest.fixture
def hub(monkeypatch):
    """`datasets.load_dataset` answered from HUB; returns the (name, subset, split) calls."""
    calls = []

    def load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return HUB[name](split)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_grpo_gsm8k_renders_questions_under_the_system_prompt_and_scores_every_completion(
    tmp_path, hub
):
    run_dir = run(
        [
            "+recipe=grpo_gsm8k_qwen2.5_7b_lora",
            *TINY,
            "train.batch_size=32",
            "train.micro_batch_size=16",
            "train.gradient_checkpointing=false",
            "train.eval_samples=32",
            "data.max_length=128",
            "data.max_new_tokens=16",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert hub == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    log = (run_dir / "cli.log").read_text()
    system = "Please reason step by step, and put your final answer within \\\\boxed{}."
    first = _gsm8k("train")[0]["question"]
    # the question renamed to the prompt, rendered as the user's turn after the system turn
    assert f"the first as the policy reads it: '<|im_start|>system\\n{system}" in log
    assert f"<|im_start|>user\\n{first}<|im_end|>\\n<|im_start|>assistant\\n'" in log
    assert "trainable (15.41%)" in log  # LoRA adapters only
    rows = read_metrics(run_dir / "metrics.jsonl")
    # every completion scored against its answer column (a missing one would leave NaN); the
    # tiny model never saw a system turn, so it answers none right: the marks' rule is
    # checked in test_rewards.py
    assert [r["rewards/math_answer/errors"] for r in rows if "loss" in r] == [0, 0]
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["eval/rewards/math_answer/mean"] for r in evals] == [0.0, 0.0]


def test_sft_capybara_trains_its_chats_and_evaluates_on_its_test_split(tmp_path, hub):
    run_dir = run(
        [
            "+recipe=sft_capybara_qwen2.5_0.5b",
            *TINY,
            "data.max_length=64",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert hub == [("trl-lib/Capybara", None, "train"), ("trl-lib/Capybara", None, "test")]
    log = (run_dir / "cli.log").read_text()
    assert "train data: 32 rows (chat)" in log
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2]
    assert all(r["loss"] > 0 for r in rows if "loss" in r)


def test_with_eval_off_the_eval_split_is_never_asked_for(tmp_path, hub, monkeypatch):
    """train.eval_samples=0 runs no eval, so the recipe's eval split (data.eval_split=test) is
    not read: a dataset whose test split cannot be loaded trains all the same."""

    def train_only(split: str) -> list[dict]:
        if split != "train":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train'].")
        return _capybara(split)

    monkeypatch.setitem(HUB, "trl-lib/Capybara", train_only)
    run_dir = run(
        [
            "+recipe=sft_capybara_qwen2.5_0.5b",
            *TINY,
            "data.max_length=64",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "train.eval_samples=0",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert hub == [("trl-lib/Capybara", None, "train")]
    assert "eval data not read: train.eval_samples=0" in (run_dir / "cli.log").read_text()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert not any(k.startswith("eval/") for r in rows for k in r)


def test_dpo_ultrafeedback_takes_the_shared_first_turn_as_the_prompt(tmp_path, hub):
    run_dir = run(
        [
            "+recipe=dpo_ultrafeedback_qwen2.5_0.5b",
            *TINY,
            "data.max_length=64",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "train.eval_samples=16",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert hub[0] == ("trl-lib/ultrafeedback_binarized", None, "train")
    assert hub[1] == ("trl-lib/ultrafeedback_binarized", None, "test")
    rows = read_metrics(run_dir / "metrics.jsonl")
    first = next(r for r in rows if "loss" in r)
    # the policy starts as the reference: every implicit reward is 0, the loss log 2
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert any("eval/rewards/accuracies" in r for r in rows)


def test_a_reward_model_from_the_rm_recipe_scores_the_ppo_recipes_rollouts(
    tmp_path, hub, monkeypatch
):
    """The reward model, trained on chats, scores each completion in the chat the policy had:
    the string prompt as the user's turn under the recipe's system prompt, not as plain text."""
    from rltune.rewards.model import RewardModelScorer

    scored_texts = []
    encode = RewardModelScorer._encode

    def spy(self, prompt, completion):
        ids = encode(self, prompt, completion)
        scored_texts.append(self.tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(RewardModelScorer, "_encode", spy)
    rm_dir = run(
        [
            "+recipe=rm_ultrafeedback_qwen2.5_0.5b",
            *TINY,
            "data.max_length=64",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "train.eval_samples=16",
            f"hydra.run.dir={tmp_path / 'rm'}",
        ]
    )
    rm_rows = read_metrics(rm_dir / "metrics.jsonl")
    assert [r["step"] for r in rm_rows if "eval/accuracy" in r] == [0, 2]
    ppo_dir = run(
        [
            "+recipe=ppo_ultrafeedback_qwen2.5_0.5b",
            *TINY,
            f"reward.model_path={rm_dir / 'final'}",
            "data.max_length=96",
            "data.max_new_tokens=16",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "train.eval_samples=8",
            f"hydra.run.dir={tmp_path / 'ppo'}",
        ]
    )
    assert hub[2:] == [
        ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs"),
        ("HuggingFaceH4/ultrafeedback_binarized", None, "test_prefs"),
    ]
    log = (ppo_dir / "cli.log").read_text()
    assert "reference: frozen copy | value model (trained, from reward model" in log
    # one rollout, trained on for algo.ppo_epochs steps: every completion scored, no errors
    [scored] = [r for r in read_metrics(ppo_dir / "metrics.jsonl") if "reward" in r]
    assert scored["rewards/reward_model/errors"] == 0
    assert scored["reward"] == scored["reward"]  # not NaN
    question = _ultrafeedback_h4("train_prefs")[0]["prompt"]
    chat = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert f"the first as the policy reads it: {chat!r}" in log
    assert scored_texts[0] == chat + "<|im_end|>\n"  # check_prompt's, with no completion
    assert all(text.startswith("<|im_start|>system\n") for text in scored_texts[1:])


def test_a_system_turn_opens_every_prompt_that_has_none():
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "2+2="}
    assert with_system_turn("2+2=", "Be brief.") == [system, user]
    assert with_system_turn([user], "Be brief.") == [system, user]
    own = [{"role": "system", "content": "Be long."}, user]
    assert with_system_turn(own, "Be brief.") == own

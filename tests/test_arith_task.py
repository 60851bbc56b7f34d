"""The embedded arithmetic task: deterministic, split-disjoint, exactly verifiable."""

import random
import re

import pytest

from rltune.tasks import arith

QUESTION = re.compile(r"^(\d+)([+\-*])(\d+)=$")


def _solve(question: str) -> int:
    """Independent reference: parse the question rather than trusting Problem.answer."""
    match = QUESTION.match(question)
    assert match is not None, question
    a, op, b = int(match[1]), match[2], int(match[3])
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_same_seed_and_split_give_the_same_problems():
    assert arith.make_problems(50, seed=3, split="train") == arith.make_problems(
        50, seed=3, split="train"
    )
    assert arith.make_problems(50, seed=3, split="train") != arith.make_problems(
        50, seed=4, split="train"
    )


def test_a_longer_list_extends_a_shorter_one():
    # Callers may ask for 200 eval problems in one place and 100 in another; they should agree.
    assert arith.make_problems(200, seed=0, split="eval")[:100] == arith.make_problems(
        100, seed=0, split="eval"
    )


def test_train_and_eval_never_share_a_question():
    train = {p.question for p in arith.make_problems(20_000, seed=0, split="train")}
    for seed in range(3):
        evals = {p.question for p in arith.make_problems(500, seed=seed, split="eval")}
        assert not train & evals
    assert all(arith.split_of(q) == "train" for q in train)


def test_answers_are_the_true_results_and_the_mix_covers_every_operation():
    problems = arith.make_problems(600, seed=0, split="train")
    for p in problems:
        assert p.answer == str(_solve(p.question))
    ops = {QUESTION.match(p.question)[2] for p in problems}
    assert ops == {"+", "-", "*"}
    assert any(p.answer.startswith("-") for p in problems)  # negative results occur
    assert max(len(p.question) for p in problems) <= len("99*9=") + 1  # short prompts


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="'train', 'eval'"):
        arith.make_problems(1, seed=0, split="test")


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("95", "95", True),
        ("  95\n", "95", True),  # surrounding whitespace is stripped
        ("95<|im_end|>", "95", True),  # the first integer is "95"; the rest is ignored
        ("95 is the answer", "95", True),
        ("The answer is 95.", "95", True),  # first integer, wherever it is
        ("-25", "-25", True),
        ("25", "-25", False),  # sign matters
        ("-25", "25", False),
        ("96", "95", False),
        ("950", "95", False),  # the whole integer must match, not a prefix
        ("095", "95", False),  # exact text: a leading zero is a different answer
        ("9 5", "95", False),  # first integer is "9"
        ("12 then 95", "95", False),  # only the first integer counts
        ("", "0", False),
        ("no digits", "0", False),
        ("0", "0", True),
    ],
)
def test_is_correct(completion, answer, expected):
    assert arith.is_correct(completion, answer) is expected


def test_wrong_answers_are_never_correct_and_stay_near_the_answer():
    rng = random.Random(0)
    problems = arith.make_problems(2000, seed=1, split="train")
    for p in problems:
        wrong = arith.wrong_answer(p, rng)
        assert not arith.is_correct(wrong, p.answer), (p, wrong)
        assert re.fullmatch(r"-?\d+", wrong)
        # Near misses: a small offset, a digit swap or a sign flip never exceeds ~10x the answer.
        assert abs(int(wrong)) <= 10 * abs(int(p.answer)) + 10
    # Deterministic given the rng state.
    p = problems[0]
    assert arith.wrong_answer(p, random.Random(5)) == arith.wrong_answer(p, random.Random(5))


def test_wrong_answer_of_zero():
    assert arith.wrong_answer(arith.Problem("0*7=", "0"), random.Random(0)) != "0"


def test_rows_have_the_columns_each_algorithm_reads():
    n = 5
    problems = arith.make_problems(n, seed=2, split="eval")
    expected_keys = {
        "prompt_completion": {"prompt", "completion"},
        "chat": {"messages"},
        "preference": {"prompt", "chosen", "rejected"},
        "prompt_answer": {"prompt", "answer"},
    }
    assert set(expected_keys) == set(arith.ROW_KINDS)
    for kind, keys in expected_keys.items():
        rows = arith.rows(kind, n, seed=2, split="eval")
        assert len(rows) == n
        assert all(set(row) == keys for row in rows), kind
        assert rows == arith.rows(kind, n, seed=2, split="eval")

    for p, row in zip(
        problems, arith.rows("prompt_completion", n, seed=2, split="eval"), strict=True
    ):
        assert row["prompt"] == [{"role": "user", "content": p.question}]
        assert row["completion"] == [{"role": "assistant", "content": p.answer}]
    for p, row in zip(problems, arith.rows("chat", n, seed=2, split="eval"), strict=True):
        assert row["messages"] == [
            {"role": "user", "content": p.question},
            {"role": "assistant", "content": p.answer},
        ]
    for p, row in zip(problems, arith.rows("preference", n, seed=2, split="eval"), strict=True):
        assert row["prompt"] == [{"role": "user", "content": p.question}]
        assert row["chosen"] == [{"role": "assistant", "content": p.answer}]
        assert row["rejected"][0]["role"] == "assistant"
        assert not arith.is_correct(row["rejected"][0]["content"], p.answer)
    for p, row in zip(problems, arith.rows("prompt_answer", n, seed=2, split="eval"), strict=True):
        assert row == {"prompt": [{"role": "user", "content": p.question}], "answer": p.answer}


def test_unknown_row_kind_names_the_valid_kinds():
    with pytest.raises(ValueError) as error:
        arith.rows("pairs", 3, seed=0, split="train")
    for kind in arith.ROW_KINDS:
        assert kind in str(error.value)
    assert "'pairs'" in str(error.value)

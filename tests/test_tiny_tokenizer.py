"""The tiny tokenizer: ids survive save -> reload, digits are single tokens, ChatML renders exactly.

transformers 5 rebuilds a Qwen2Tokenizer's pipeline from code on load, so a tokenizer trained
any other way would reload with different ids; these tests are the guard against that.
"""

import json
import os
import random
import string

import pytest
from conftest import small_model_config

from rltune.evaluation import task_accuracy

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer, Qwen2ForCausalLM  # noqa: E402

from rltune import tiny  # noqa: E402
from rltune.tasks import arith  # noqa: E402

CONVERSATION = [
    {"role": "user", "content": "37+58="},
    {"role": "assistant", "content": "95"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def _samples(tokenizer) -> list[str]:
    rng = random.Random(0)
    printable = [
        "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 60))) for _ in range(50)
    ]
    chats = [
        tokenizer.apply_chat_template(row["messages"], tokenize=False)
        for row in arith.rows("chat", 20, seed=0, split="eval")
    ]
    return [
        *(p.question for p in arith.make_problems(20, seed=0, split="train")),
        *chats,
        *printable,
        "The quick brown fox jumps over the lazy dog.",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n\n",
        "it's, they're; we'll -- don't!",
        "unicode: café, 東京, emoji 🙂",
        "",
    ]


def test_ids_survive_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for text in _samples(tokenizer):
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], repr(text)
    assert reloaded.apply_chat_template(
        CONVERSATION, tokenize=False
    ) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_shipped_tokenizer_matches_a_fresh_build(tokenizer):
    """The committed assets/tiny_init loads the ordinary way and equals what the code builds.

    The tokenizer corpus includes arith problems and seeded prose, so changing either changes the
    vocab: then rerun ``scripts/make_tiny_model.py`` (and retrain assets/tiny).
    """
    shipped = AutoTokenizer.from_pretrained(tiny.TINY_INIT_DIR)
    assert type(shipped).__name__ == "Qwen2Tokenizer"
    assert shipped.get_vocab() == tokenizer.get_vocab()
    for text in _samples(tokenizer):
        assert shipped(text)["input_ids"] == tokenizer(text)["input_ids"], repr(text)


def test_shipped_tokenizer_has_no_padding_baked_in():
    """A tokenizer saved after a padded call stores that padding (side included) in
    tokenizer.json, and reloads padding that way by default; the shipped one must not."""
    for folder in (tiny.TINY_INIT_DIR, tiny.TINY_DIR):
        assert json.loads((folder / "tokenizer.json").read_text())["padding"] is None
        assert AutoTokenizer.from_pretrained(folder).padding_side == "right"


def test_task_accuracy_leaves_the_tokenizer_as_it_was(tokenizer, tmp_path):
    model = Qwen2ForCausalLM(small_model_config(tokenizer))
    was_training = model.training
    accuracy, _ = task_accuracy(model, tokenizer, arith, n=6, seed=0)
    assert 0.0 <= accuracy <= 1.0
    assert model.training == was_training
    assert tokenizer.padding_side == "right"
    assert tokenizer.backend_tokenizer.padding is None
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is None


def test_special_tokens(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS)) == [0, 1, 2]
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None
    # Special tokens written in text are matched whole, not split into bytes.
    assert tokenizer("<|im_start|>user<|im_end|>")["input_ids"][0] == 1
    assert tokenizer("<|im_start|>user<|im_end|>")["input_ids"][-1] == 2


def test_digits_are_single_tokens(tokenizer):
    for digit in string.digits:
        assert tokenizer.tokenize(digit) == [digit]
    assert tokenizer.tokenize("1234567890") == list("1234567890")
    assert tokenizer.tokenize("37+58=") == ["3", "7", "+", "5", "8", "="]
    assert tokenizer.tokenize("-25") == ["-", "2", "5"]


def test_chat_template_renders_chatml(tokenizer):
    expected = "<|im_start|>user\n37+58=<|im_end|>\n<|im_start|>assistant\n95<|im_end|>\n"
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == expected

    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\n37+58=<|im_end|>\n<|im_start|>assistant\n"

    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n37+58=<|im_end|>\n"
    )


def test_assistant_mask_covers_the_reply_and_its_end_token(tokenizer):
    encoded = tokenizer.apply_chat_template(
        CONVERSATION, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.convert_ids_to_tokens(masked) == ["9", "5", "<|im_end|>"]


def test_decode_inverts_encode(tokenizer):
    for text in _samples(tokenizer):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text, repr(text)


def test_chat_prompts_are_short(tokenizer):
    # Sequence length is CPU time: a whole arithmetic conversation fits in about 20 tokens.
    # (transformers 5 returns a BatchEncoding here, not a list of ids.)
    for row in arith.rows("chat", 50, seed=0, split="train"):
        assert len(tokenizer.apply_chat_template(row["messages"])["input_ids"]) <= 20

"""SFT tokenisation, label masks, chunking, packing and collation (rltune/data/sft.py).

The tokenizer is a word-level one built here, so every expected id can be written out by hand:
spaces separate words, a newline is its own token, and the chat template is ChatML.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rltune.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    collate_sft,
    encode_sft,
    encode_sft_dataset,
    has_loss_tokens,
    pack,
)
from rltune.data.preference import encode_pair

# id:    0        1                2               3             4        5
WORDS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n"]
# id:    6         7       8            9       10    11     12      13      14
WORDS += ["system", "user", "assistant", "what", "is", "two", "plus", "four", "hello"]
# id:    15    16     17     18     19        20 ... 39
WORDS += ["hi", "bye", "you", "are", "helpful"] + [f"w{i}" for i in range(20)]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
X = IGNORE_INDEX


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS; EOS is <|im_end|> (3), as in Qwen instruct models."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" +"), behavior="removed"),
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|endoftext|>"]})
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_tokenizer_ids_are_the_listed_ones(tok):
    assert tok("what is two\nplus", add_special_tokens=False)["input_ids"] == [9, 10, 11, 5, 12]
    assert tok.eos_token_id == 3 and tok.pad_token_id == 0


def test_prompt_completion_strings_loss_on_completion_and_eos(tok):
    row = {"prompt": "what is two plus two", "completion": "four"}
    [ex] = encode_sft(row, "prompt_completion", tok, max_length=64)
    #                         what is two plus two  four eos
    assert ex["input_ids"] == [9, 10, 11, 12, 11, 13, 3]
    assert ex["labels"] == [X, X, X, X, X, 13, 3]


def test_text_already_ending_with_eos_gets_no_second_eos(tok):
    """Data written for TRL often ends its text or completion with the EOS token; appending one
    more would train the model to follow EOS with EOS (TRL appends it only when missing)."""
    row = {"prompt": "what is two plus two", "completion": "four<|im_end|>"}
    [ex] = encode_sft(row, "prompt_completion", tok, max_length=64)
    assert ex["input_ids"] == [9, 10, 11, 12, 11, 13, 3]
    assert ex["labels"] == [X, X, X, X, X, 13, 3]
    [doc] = encode_sft({"text": "w0 w1<|im_end|>"}, "text", tok, max_length=64)
    assert doc["input_ids"] == [20, 21, 3]
    # preference pairs are encoded the same way, so DPO and RM responses end with one EOS too
    pair = encode_pair({"prompt": "hi", "chosen": "four<|im_end|>", "rejected": "bye"}, tok)
    assert pair["chosen"]["input_ids"] == [15, 13, 3]
    assert pair["rejected"]["input_ids"] == [15, 16, 3]


def test_prompt_completion_messages_match_full_template(tok):
    row = {
        "prompt": [{"role": "user", "content": "what is two plus two"}],
        "completion": [{"role": "assistant", "content": "four"}],
    }
    [ex] = encode_sft(row, "prompt_completion", tok, max_length=64)
    # <|im_start|>user\n what is two plus two <|im_end|>\n <|im_start|>assistant\n four <|im_end|>\n
    assert ex["input_ids"] == [2, 7, 5, 9, 10, 11, 12, 11, 3, 5, 2, 8, 5, 13, 3, 5]
    assert ex["labels"] == [X] * 13 + [13, 3, X]  # content + end-of-turn; not the newline after
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    assert ex["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    # A string completion after a message prompt is the assistant turn.
    [same] = encode_sft({**row, "completion": "four"}, "prompt_completion", tok, max_length=64)
    assert same == ex


def test_prompt_completion_earlier_assistant_turns_in_prompt_get_no_loss(tok):
    prompt = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"},
    ]
    row = {"prompt": prompt, "completion": [{"role": "assistant", "content": "bye"}]}
    [ex] = encode_sft(row, "prompt_completion", tok, max_length=64)
    assert ex["input_ids"] == [
        2,
        7,
        5,
        14,
        3,
        5,
        2,
        8,
        5,
        15,
        3,
        5,
        2,
        7,
        5,
        16,
        3,
        5,
        2,
        8,
        5,
        16,
        3,
        5,
    ]
    assert ex["labels"] == [X] * 21 + [16, 3, X]


def test_instruction_through_chat_template(tok):
    row = {"instruction": "what is", "input": "two plus two", "output": "four"}
    [ex] = encode_sft(row, "instruction", tok, max_length=64)
    # user turn "what is\n\ntwo plus two", then the assistant turn "four"
    assert ex["input_ids"] == [2, 7, 5, 9, 10, 5, 5, 11, 12, 11, 3, 5, 2, 8, 5, 13, 3, 5]
    assert ex["labels"] == [X] * 15 + [13, 3, X]


def test_instruction_without_chat_template_is_plain_text():
    plain = make_tokenizer(chat_template=None)
    row = {"instruction": "what is", "input": "", "output": "four"}
    [ex] = encode_sft(row, "instruction", plain, max_length=64)
    assert ex["input_ids"] == [9, 10, 5, 5, 13, 3]  # "what is\n\n" + "four" + eos
    assert ex["labels"] == [X, X, X, X, 13, 3]


def test_chat_two_assistant_turns_both_have_loss(tok):
    messages = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye bye"},
    ]
    [ex] = encode_sft({"messages": messages}, "chat", tok, max_length=64)
    expected_ids = [2, 6, 5, 17, 18, 19, 3, 5]  # system: you are helpful
    expected_ids += [2, 7, 5, 14, 3, 5]  # user: hello
    expected_ids += [2, 8, 5, 15, 3, 5]  # assistant: hi
    expected_ids += [2, 7, 5, 16, 3, 5]  # user: bye
    expected_ids += [2, 8, 5, 16, 16, 3, 5]  # assistant: bye bye
    assert ex["input_ids"] == expected_ids
    expected_labels = [X] * 8 + [X] * 6
    expected_labels += [X, X, X, 15, 3, X]
    expected_labels += [X] * 6
    expected_labels += [X, X, X, 16, 16, 3, X]
    assert ex["labels"] == expected_labels

    sharegpt = [
        {
            "from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
            "value": m["content"],
        }
        for m in messages
    ]
    assert encode_sft({"conversations": sharegpt}, "sharegpt", tok, max_length=64) == [ex]

    [full] = encode_sft({"messages": messages}, "chat", tok, max_length=64, completion_only=False)
    assert full["labels"] == full["input_ids"] == expected_ids


def test_message_data_without_chat_template_fails():
    plain = make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        encode_sft({"messages": [{"role": "user", "content": "hi"}]}, "chat", plain, max_length=8)


def test_chat_span_fallback_without_offsets(tok):
    """A tokenizer that cannot return offsets gets the same labels from prefix token counts."""

    class NoOffsets:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, text, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError
            return self.inner(text, **kwargs)

    row = {
        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    }
    assert encode_sft(row, "chat", NoOffsets(tok), max_length=64) == encode_sft(
        row, "chat", tok, max_length=64
    )


def test_right_truncation_and_no_loss_example(tok):
    row = {"prompt": "what is two plus two", "completion": "four"}
    [ex] = encode_sft(row, "prompt_completion", tok, max_length=6)
    assert ex["input_ids"] == [9, 10, 11, 12, 11, 13] and ex["labels"] == [X] * 5 + [13]
    assert has_loss_tokens(ex)
    [cut] = encode_sft(row, "prompt_completion", tok, max_length=4)
    assert cut["labels"] == [X] * 4 and not has_loss_tokens(cut)

    records = [
        Record(row, "d.jsonl", 0),
        Record({"prompt": "hi", "completion": "bye"}, "d.jsonl", 1),
        Record({"prompt": "hi", "completion": "bye bye bye"}, "d.jsonl", 2),
    ]
    examples, stats = encode_sft_dataset(records, "prompt_completion", tok, max_length=4)
    assert examples == [
        {"input_ids": [15, 16, 3], "labels": [X, 16, 3]},
        {"input_ids": [15, 16, 16, 16], "labels": [X, 16, 16, 16]},
    ]
    # the first row is cut to no loss token: dropped, and not counted as truncated as well
    assert (stats.records, stats.examples, stats.dropped_no_loss, stats.truncated) == (3, 2, 1, 1)
    assert (stats.tokens, stats.loss_tokens) == (7, 5)


def test_long_text_is_chunked_with_eos_and_full_loss(tok):
    text = " ".join(f"w{i}" for i in range(10))  # ids 20..29
    chunks = encode_sft({"text": text}, "text", tok, max_length=4)
    assert [c["input_ids"] for c in chunks] == [[20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 3]]
    assert all(c["labels"] == c["input_ids"] for c in chunks)


def test_encode_errors_name_the_row(tok):
    plain = make_tokenizer(chat_template=None)
    records = [Record({"messages": [{"role": "user", "content": "hi"}]}, "c.jsonl", 7)]
    with pytest.raises(DataError, match=r"c\.jsonl, row 7: .*chat template"):
        encode_sft_dataset(records, "chat", plain, max_length=8)
    with pytest.raises(ValueError, match="cannot be used for SFT"):
        encode_sft(
            {"prompt": "hi", "chosen": "a", "rejected": "b"}, "preference", tok, max_length=8
        )
    no_eos = make_tokenizer()
    no_eos.eos_token = None  # preference pairs (DPO, RM) reach this too: no algorithm named
    with pytest.raises(
        ValueError, match=r"^the tokenizer has no eos_token, which ends each example$"
    ):
        encode_sft({"prompt": "hi", "completion": "a"}, "prompt_completion", no_eos, max_length=8)


def _ex(ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "labels": list(ids)}


def test_pack_best_fit_position_ids_restart():
    examples = [_ex([1] * 5), _ex([2] * 3), _ex([3] * 4), _ex([4] * 2)]
    rows = pack(examples, max_length=8)
    # Longest first: 5 opens row 0, 4 opens row 1, 3 fills row 0, 2 fills row 1.
    assert [r["input_ids"] for r in rows] == [[1] * 5 + [2] * 3, [3] * 4 + [4] * 2]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 0, 1]
    assert rows[0]["labels"] == rows[0]["input_ids"]
    with pytest.raises(ValueError, match="does not fit"):
        pack([_ex([1] * 9)], max_length=8)


def test_collate_pads_right():
    batch = collate_sft([_ex([5, 6, 7]), {"input_ids": [8, 9], "labels": [X, 9]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, 9, X]]  # the first token is never a target
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]


def test_collate_packed_rows_have_no_attention_mask():
    rows = pack([_ex([5, 6, 7]), _ex([8, 9]), _ex([4])], max_length=5)
    batch = collate_sft(rows, pad_token_id=0)
    assert "attention_mask" not in batch  # transformers then builds the mask from position_ids
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # Each packed example's first token has nothing before it in its own sequence: no loss.
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9], [X, X, X, X, X]]


def _tiny_qwen2(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).eval()


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1),  # [B * (T - 1), V]
        labels[:, 1:].flatten(),  # [B * (T - 1)]
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_matches_examples_run_separately(attn):
    """transformers 5 makes packed rows block-diagonal from position_ids (no mask, no cache)."""
    model = _tiny_qwen2(attn)
    g = torch.Generator().manual_seed(1)
    examples = [_ex(torch.randint(1, 128, (n,), generator=g).tolist()) for n in (7, 5, 4, 3)]
    rows = pack(examples, max_length=12)
    assert any(r["position_ids"].count(0) > 1 for r in rows)  # some row really is packed
    batch = collate_sft(rows, pad_token_id=0)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        packed_logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        separate = [model(torch.tensor([e["input_ids"]])).logits[0] for e in examples]  # [T_i, V]

    seen = 0
    for b, row in enumerate(rows):
        starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:], strict=False):
            i = next(
                i for i, e in enumerate(examples) if e["input_ids"] == row["input_ids"][start:end]
            )
            torch.testing.assert_close(
                packed_logits[b, start:end], separate[i], atol=1e-5, rtol=1e-4
            )
            seen += 1
    assert seen == len(examples)

    # And the summed token loss equals that of the examples one by one.
    one_by_one = sum(
        _loss_sum(separate[i][None], torch.tensor([e["labels"]])) for i, e in enumerate(examples)
    )
    torch.testing.assert_close(_loss_sum(packed_logits, batch["labels"]), one_by_one)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_matches_examples_run_separately(attn):
    model = _tiny_qwen2(attn)
    examples = [_ex([3, 4, 5, 6, 7]), _ex([9, 10])]
    batch = collate_sft(examples, pad_token_id=0)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        for b, e in enumerate(examples):
            alone = model(torch.tensor([e["input_ids"]])).logits[0]  # [T_b, V]
            torch.testing.assert_close(
                logits[b, : len(e["input_ids"])], alone, atol=1e-5, rtol=1e-4
            )


def test_encode_then_pack_end_to_end(tok):
    records = [
        Record({"prompt": "what is two plus two", "completion": "four"}, "d.jsonl", 0),
        Record({"prompt": "hello", "completion": "hi"}, "d.jsonl", 1),
    ]
    rows, stats = encode_sft_dataset(records, "prompt_completion", tok, max_length=16, packing=True)
    assert stats.examples == len(rows) == 1
    assert rows[0]["input_ids"] == [9, 10, 11, 12, 11, 13, 3, 14, 15, 3]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]


def test_a_last_chunk_of_one_token_takes_the_token_before_it(tok):
    """10 words + EOS = 11 tokens in chunks of 5: the lone EOS would be no target (a chunk's
    first token is context), so the last chunk starts one token earlier."""
    text = " ".join(f"w{i}" for i in range(10))  # ids 20..29
    chunks = encode_sft({"text": text}, "text", tok, max_length=5)
    assert [c["input_ids"] for c in chunks] == [[20, 21, 22, 23, 24], [25, 26, 27, 28, 29], [29, 3]]


def test_a_chat_that_opens_with_the_assistant_trains_on_its_words_not_the_header():
    """ShareGPT data often opens with a greeting by the assistant: its loss starts after the
    template's opening (here "<|im_start|>assistant\\n"), as every later turn's does."""
    from rltune.config import ModelConfig
    from rltune.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    messages = [
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
    ]
    (example,) = encode_sft({"messages": messages}, "chat", tokenizer, max_length=128)
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    trained = [t for t, label in pairs if label != -100]
    assert tokenizer.decode(trained) == "Hello!<|im_end|>2<|im_end|>"

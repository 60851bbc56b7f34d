"""scripts/bench.py --gpu (bench_gpu.py): the synthetic tokenizer of the Qwen2.5 vocabulary, and the exact
token counts of the GPU workloads. No model is built: these checks take seconds."""

import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_gpu as bench  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

SAMPLES = [
    "1234567890" * 3,
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "unicode: café, 東京, emoji 🙂",
    "<|im_start|>user\n37+58=<|im_end|>\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return bench.synthetic_tokenizer()


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """A work folder as `bench.py --gpu` lays it out: the tokenizer in model/ and the data."""
    root = tmp_path_factory.mktemp("bench")
    tokenizer.save_pretrained(root / "model")
    bench.write_data(root, bench.SIZES["full"])
    return root


def test_vocabulary_has_exactly_the_qwen25_ids(tokenizer):
    assert len(tokenizer) == bench.VOCAB_SIZE == 151936
    assert sorted(tokenizer.get_vocab().values()) == list(range(151936))
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644


def test_ids_survive_save_and_reload(tokenizer, folder):
    reloaded = AutoTokenizer.from_pretrained(folder / "model")
    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (151645, 151643)
    for text in SAMPLES:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], repr(text)
        assert reloaded.decode(reloaded(text)["input_ids"]) == text


def test_every_id_decodes(tokenizer):
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    assert all(isinstance(t, str) and t for t in texts)
    rng = random.Random(0)
    ids = [rng.randrange(len(tokenizer)) for _ in range(2000)]
    assert isinstance(tokenizer.decode(ids), str)


def test_a_digit_is_one_token(tokenizer):
    prompt = "".join(random.Random(0).choice("0123456789") for _ in range(128))
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) == 128
    assert tokenizer.decode(ids) == prompt


def test_workload_lengths(folder):
    """As rltune encodes the rows: A's prompt is its 128 digits (no BOS, no template); each DPO
    side is prompt 128 + response 256 + EOS = 385; an SFT row is 1023 digits + EOS = 1024."""
    lengths = bench.check_lengths(folder, bench.SIZES["full"])
    assert lengths == {
        "vocabulary": 151936,
        "eos_id": 151645,
        "pad_id": 151643,
        "A_prompt": 128,
        "B_chosen": 385,
        "B_rejected": 385,
        "C_row": 1024,
    }


def test_bench_logps_runs_forward_and_backward_at_a_tiny_size():
    """scripts/bench_logps.py (the output layer's chunked log-probs, timed and its peak memory
    measured) runs end to end, with and without an entropy gradient, and reports its shape."""
    import json
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_logps.py"
    for extra in ([], ["--entropy-grad"]):
        args = ["--tokens", "96", "--hidden", "16", "--vocab", "500", "--chunk", "32", *extra]
        proc = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (out["tokens"], out["vocab"], out["chunk"]) == (96, 500, 32)
        assert out["entropy_grad"] == bool(extra) and out["seconds"] > 0
        assert out["one_fp32_chunk_gib"] == round(32 * 500 * 4 / 2**30, 3)

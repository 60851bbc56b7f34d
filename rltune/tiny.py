"""The tiny embedded model: its tokenizer, its architecture, and where it lives in the package.

``scripts/make_tiny_model.py`` calls these functions to build ``assets/tiny_init`` (random
weights) and then trains it with rltune's own SFT into ``assets/tiny``; ``model=tiny`` loads that
folder through the ordinary ``AutoModelForCausalLM`` / ``AutoTokenizer`` path.

Why the tokenizer is built this way: transformers 5 picks the tokenizer class from the model's
``model_type`` (qwen2 -> ``Qwen2Tokenizer``) and that class rebuilds its normaliser, pre-tokeniser
and decoder from code on load, keeping only the vocab and merges from ``tokenizer.json``. So the
BPE is trained inside exactly the pipeline ``Qwen2Tokenizer`` builds, and the tokenizer is then
re-created from the trained vocab and merges the same way ``from_pretrained`` will re-create it.
Ids therefore survive save -> reload, and digits are one token each (Qwen2's split regex isolates
every ``\\p{N}``), which the arithmetic task needs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2Tokenizer

from rltune.tasks import arith

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_DIR = ASSETS_DIR / "tiny"
"""The trained tiny model shipped with the package (``model=tiny``)."""
TINY_INIT_DIR = ASSETS_DIR / "tiny_init"
"""The same architecture and tokenizer with random weights: the starting point of the SFT run."""

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: 0, 1, 2 (the same relative order as Qwen2.5's 151643, 151644, 151645).
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

MAX_POSITIONS = 512
"""Context length of the tiny model and ``model_max_length`` of its tokenizer."""

# ChatML as Qwen2.5 renders it, without Qwen's default system prompt (tokens cost CPU time).
# The {% generation %} block marks assistant content plus <|im_end|> so that
# ``apply_chat_template(..., return_assistant_tokens_mask=True)`` can mask the loss to the reply;
# the newline after <|im_end|> stays outside since generation stops at <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# One word per entry would be 90 lines; split strings keep the lists readable.
_NOUNS = (  # noqa: SIM905
    "model cat dog river city teacher student garden number answer question paper engine "
    "window mountain friend story market machine letter language problem system world day "
    "house road child table light reward policy value token data sum result"
).split()
_VERBS = (  # noqa: SIM905
    "sees takes finds writes reads makes learns builds counts moves opens keeps gives holds "
    "trains solves checks adds follows answers"
).split()
_ADJECTIVES = (  # noqa: SIM905
    "small large quick slow bright old new red green happy quiet simple hard easy first last "
    "good wrong right short long"
).split()
_ADVERBS = "quickly slowly often never always carefully again together".split()  # noqa: SIM905
_OPENERS = ("The", "A", "This", "Every", "One", "That", "Our", "My", "Your", "No")


def _sentence(rng: random.Random) -> str:
    """One simple English-like sentence, with the punctuation and casing of ordinary prose."""
    subject = f"{rng.choice(_OPENERS)} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    obj = f"the {rng.choice(_NOUNS)}"
    shape = rng.randrange(5)
    if shape == 0:
        return f"{subject} {rng.choice(_VERBS)} {obj}."
    if shape == 1:
        adverb, adjective = rng.choice(_ADVERBS), rng.choice(_ADJECTIVES)
        return f"{subject} {rng.choice(_VERBS)} {obj} {adverb}, and it is {adjective}."
    if shape == 2:
        return f"Why does {subject.lower()} {rng.choice(_VERBS)[:-1]} {obj}?"
    if shape == 3:
        return f'"{rng.choice(_NOUNS).capitalize()}!" said the {rng.choice(_NOUNS)}.'
    count, noun, adjective = rng.randint(2, 999), rng.choice(_NOUNS), rng.choice(_ADJECTIVES)
    return f"It has {count} {noun}s; I'm sure they're {adjective}."


def tokenizer_corpus(
    *, seed: int = 0, n_problems: int = 4000, n_sentences: int = 4000
) -> list[str]:
    """Training text for the tokenizer: chat-shaped arithmetic plus synthetic prose.

    The chat markers are left out of the text (they are special tokens and never go through
    BPE), but the role names and newlines around them are kept so ``user``/``assistant`` merge.
    """
    rng = random.Random(seed)
    texts = []
    for p in arith.make_problems(n_problems, seed=seed, split="train"):
        texts.append(
            f"system\nYou are a helpful assistant.\nuser\n{p.question}\nassistant\n{p.answer}\n"
        )
    texts.extend(_sentence(rng) for _ in range(n_sentences))
    return texts


def build_tokenizer(vocab_size: int = 512, *, seed: int = 0) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE ``Qwen2Tokenizer`` with ChatML special tokens and chat template.

    ``vocab_size`` counts the 3 special tokens and the 256 byte symbols (so any text, ASCII or
    not, tokenizes), which leaves ``vocab_size - 259`` merges. The same arguments give the same
    tokenizer. ``eos_token`` is ``<|im_end|>`` (the end of an assistant turn) and ``pad_token``
    is ``<|endoftext|>``; there is no BOS and no UNK, as in Qwen2.5's instruct tokenizer.
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    # An untrained Qwen2Tokenizer supplies the exact normaliser / pre-tokeniser / decoder that
    # transformers will rebuild on load; only its (empty) BPE model is replaced by training.
    backend = json.loads(Qwen2Tokenizer().backend_tokenizer.to_str())
    backend["added_tokens"] = []
    backend["model"]["vocab"] = {}
    backend["model"]["merges"] = []
    trainer_backend = Tokenizer.from_str(json.dumps(backend))
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_backend.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    trained = json.loads(trainer_backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return chatml_tokenizer(trained["vocab"], merges)


def chatml_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], *, model_max_length: int = MAX_POSITIONS
) -> PreTrainedTokenizerBase:
    """A byte-level BPE `Qwen2Tokenizer` from `vocab` and `merges` with the ChatML specials and
    chat template of Qwen2.5's instruct tokenizer: EOS <|im_end|>, pad <|endoftext|>, no BOS or
    UNK. `vocab` must hold the specials."""
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )


def build_model_config(
    vocab_size: int,
    *,
    pad_token_id: int,
    eos_token_id: int,
    bos_token_id: int | None = None,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = MAX_POSITIONS,
) -> Qwen2Config:
    """A Qwen2 causal-LM config of about 0.9M parameters (with the default sizes, vocab 512).

    Small enough to train in minutes on two CPU cores, but a real architecture: grouped-query
    attention (4 query heads share 2 KV heads), RoPE, SwiGLU MLP, RMSNorm, tied embeddings.
    """
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )

"""Loading and wrapping models: policy (with optional LoRA), tokenizer, dtype, device.

Later algorithms add the reference, value and reward models here; this file owns every
`from_pretrained` call so dtype, attention and LoRA handling stay in one place (the adapters
themselves are put on by `rltune.lora`). `rltune.export` writes the trained model out.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from pathlib import Path

import torch
from torch import nn

from rltune.config import ConfigError, ModelConfig, PeftConfig
from rltune.lora import apply_lora, is_peft

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED = {"tiny": ASSETS / "tiny", "tiny_init": ASSETS / "tiny_init"}
"""Models that ship inside the package (built by scripts/make_tiny_model.py)."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

OWN_RECOMPILES = (
    {"isolate_recompiles": True}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters
    else {}
)
"""torch.compile's option that counts one call's compiles apart from every other call's on the
same code, where torch has it (2.13 does). Dynamo keeps compiles per code object, and once
there are `torch._dynamo.config.recompile_limit` (8) of them it runs that code eagerly for any
input none of them fits, for the rest of the process, with one warning in the log. What rltune
compiles more than once is such shared code: every model's decoder stack runs transformers' one
decorated `forward` (PPO's three models, in train and eval mode, with and without grad, took
all 8 in 30 steps of the tiny job), and every static decoder's step
`decoders.StaticDecoder._forward`.
Without the option (an older torch) they share the 8."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return device


QWEN2_5_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
"""Qwen2.5-0.5B's architecture (`Qwen2Config` keywords): the randomly initialised model that the
GPU benchmarks and GPU tests use, since nothing is downloaded there."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype. auto: bf16 on a GPU that supports it, else fp32. (fp16 would need loss
    scaling, which bf16's range makes unnecessary, so it is not offered for training.)"""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in ("fp32", "bf16"):
        raise ConfigError(f"train.dtype={name!r} is not one of: auto, fp32, bf16")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in `dtype` while the trained weights (and AdamW) stay fp32, which
    keeps small updates from vanishing in bf16 rounding. A no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def resolve_path(path: str, key: str = "model.path") -> str:
    """Map a shipped model name to its folder; pass anything else through (hub id or path).
    A missing local folder is a ConfigError naming `key`."""
    if path in SHIPPED:
        folder = SHIPPED[path]
        if not (folder / "config.json").exists():
            raise ConfigError(
                f"{key}={path}: the shipped model is missing at {folder}; "
                "rebuild it with `python scripts/make_tiny_model.py`"
            )
        return str(folder)
    # "org/name" is a hub id; only an explicit filesystem path that is missing is an error here
    # (a missing hub id fails in from_pretrained, with the hub's own message)
    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) and not local.exists():
        raise ConfigError(f"{key}={path}: no such folder")
    return str(local) if path.startswith("~") else path


def check_model_folder(path: str, key: str, *, scalar_head: bool = False) -> None:
    """Before anything loads: a local folder given as a model must hold a Hugging Face config
    of a model type transformers knows (and, for `scalar_head`, one of a sequence-classification
    model: a reward model)."""
    import json

    folder = Path(resolve_path(path, key))
    if folder.is_file():
        raise ConfigError(
            f"{key}={path}: a file, not a model folder (give the folder that holds config.json "
            "and the weights, or a hub id)"
        )
    if not folder.is_dir():
        return  # a hub id: from_pretrained reports its own errors
    config = folder / "config.json"
    if not config.exists():
        raise ConfigError(f"{key}={path}: no config.json there; not a Hugging Face model folder")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}={path}: config.json is not a JSON object ({err})") from None
    if not isinstance(settings, dict):
        raise ConfigError(
            f"{key}={path}: config.json is not a JSON object (a {type(settings).__name__})"
        )
    model_type = settings.get("model_type")
    if "auto_map" not in settings:  # a model with code of its own names its classes there
        from transformers import CONFIG_MAPPING, __version__

        if model_type is None and not any(name in str(folder) for name in CONFIG_MAPPING):
            # (without one, transformers takes the first known type in the folder's name)
            raise ConfigError(
                f"{key}={path}: config.json has no model_type, which transformers needs to "
                "choose the model's classes"
            )
        if model_type is not None and model_type not in CONFIG_MAPPING:
            raise ConfigError(
                f"{key}={path}: config.json's model_type {model_type!r} is not one transformers "
                f"{__version__} knows (a newer transformers may; a model with code of its own "
                "names it in an auto_map, with model.trust_remote_code=true)"
            )
    if scalar_head:
        architectures = settings.get("architectures") or []
        if architectures and not any(
            a.endswith("ForSequenceClassification") for a in architectures
        ):
            raise ConfigError(
                f"{key}={path}: a {architectures[0]}, not a reward model (a sequence-"
                "classification model with one output; train one with algo=rm)"
            )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    key = "model.tokenizer_path" if cfg.tokenizer_path else "model.path"
    path = resolve_path(cfg.tokenizer_path or cfg.path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:  # not on the hub, no network, gated, no tokenizer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = (
            " (HF_HUB_OFFLINE is set: only local files and the cache are used)"
            if os.environ.get("HF_HUB_OFFLINE")
            else ""
        )
        raise ConfigError(f"{key}={path}: cannot load the tokenizer{offline}: {first}") from None
    if tokenizer.eos_token is None:
        # every algorithm ends its examples or completions with EOS, and pads with it when the
        # tokenizer has no pad token
        raise ConfigError(
            f"{key}={path}: the tokenizer has no eos_token; rltune needs one to end examples and "
            "completions (set eos_token in its tokenizer_config.json)"
        )
    if tokenizer.pad_token is None:
        # Llama-style tokenizers have no pad token; padding is always masked, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """`dtype` is the weights' dtype when model.dtype is auto."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    load_dtype = dtype if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        resolve_path(cfg.path),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=load_dtype,
        **kwargs,
    )
    return model.to(device)


def load_policy(
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """The trainable causal LM: full weights, or the base frozen under LoRA adapters.

    `dtype` is the compute dtype. Trained weights load in fp32 (master weights; autocast runs the
    matmuls in `dtype`); a frozen LoRA base loads directly in `dtype` to halve its memory, and
    peft keeps the adapters themselves in fp32."""
    if peft_cfg.method == "qlora":
        model = load_4bit(model_cfg, dtype=dtype, device=device)
    else:
        weights = dtype if peft_cfg.method == "lora" else torch.float32
        model = load_causal_lm(model_cfg, dtype=weights, device=device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if peft_cfg.method in ("lora", "qlora"):
        model = apply_lora(model, peft_cfg)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    elif peft_cfg.method != "none":
        raise ConfigError(f"peft.method={peft_cfg.method!r} is not one of: none, lora, qlora")
    return model


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout in `model` to 0 and return how many were not: `nn.Dropout` modules
    (LoRA's included) and the attention-probability dropout that transformers' attention
    layers read from their `attention_dropout` attribute at each forward."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout = 0.0
            changed += 1
    return changed


def check_qlora(device_name: str) -> None:
    """peft=qlora needs CUDA and bitsandbytes; say so before anything loads."""
    if device_name == "cpu" or not torch.cuda.is_available():
        raise ConfigError(
            "peft=qlora quantises the base model to 4 bits with bitsandbytes, which needs a CUDA "
            "GPU; use peft=lora on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("peft=qlora needs bitsandbytes: pip install bitsandbytes") from None


def load_4bit(model_cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The frozen base in 4-bit NF4 (QLoRA), computing in `dtype`, ready for adapters."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_path(model_cfg.path),
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        quantization_config=quant,
        device_map={"": device},
        dtype=dtype,
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def scalar_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The weights' dtype of a scalar-head model (a trained reward model, PPO's value model):
    bf16 with model.dtype=bf16, else fp32 (master weights: fp16 is never trained in place)."""
    return torch.bfloat16 if model_cfg.dtype == "bf16" else torch.float32


def load_scalar_model(
    path: str, model_cfg: ModelConfig, *, device: torch.device, pad_token_id: int
) -> nn.Module:
    """`AutoModelForSequenceClassification` with one output from `path` (a causal LM gets a new,
    randomly initialised score head), its weights in `scalar_dtype`: a reward model or PPO's
    value model.

    Its config's pad_token_id becomes `pad_token_id`, the tokenizer's, which pads the batches:
    the head scores each row's last token that is not that id."""
    from transformers import AutoModelForSequenceClassification

    kwargs = (
        {"attn_implementation": model_cfg.attn_implementation}
        if model_cfg.attn_implementation
        else {}
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_path(path),
        num_labels=1,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=scalar_dtype(model_cfg),
        **kwargs,
    ).to(device)
    if model.config.pad_token_id != pad_token_id:
        log.info(
            "%s: pad_token_id %s -> %d (the tokenizer's padding)",
            path,
            model.config.pad_token_id,
            pad_token_id,
        )
        model.config.pad_token_id = pad_token_id
    return model


def load_reward_model(
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig,
    *,
    device: torch.device,
    pad_token_id: int,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """A trainable reward model initialised from model.path (see `load_scalar_model`)."""
    model = load_scalar_model(model_cfg.path, model_cfg, device=device, pad_token_id=pad_token_id)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft_cfg.method == "qlora":
        raise ConfigError("peft=qlora is for policies; train a reward model with peft=lora")
    if peft_cfg.method == "lora":
        model = apply_lora(model, peft_cfg, task_type="SEQ_CLS")
    return model


def load_value_model(
    path: str, model_cfg: ModelConfig, *, device: torch.device, pad_token_id: int
) -> nn.Module:
    """PPO's critic: a scalar-head model from a reward model or the policy's base, fully trained."""
    return load_scalar_model(path, model_cfg, device=device, pad_token_id=pad_token_id)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


class Reference:
    """The frozen reference policy that DPO, GRPO and PPO measure the policy against.

    Full fine-tuning: a frozen fp32 copy of the starting weights (fp32 like the policy's master
    weights, so at step 0 both compute the very same log-probs under autocast). peft=lora: no
    second model; the reference is the policy with its adapters disabled.
    """

    def __init__(
        self,
        policy: nn.Module,
        model_cfg: ModelConfig,
        *,
        device: torch.device,
        untrained_policy: bool = False,
    ):
        """`untrained_policy=True`: the policy itself serves as the reference (valid only before
        its first update; DPO's precompute_ref pass)."""
        self.policy = policy
        self.copy: nn.Module | None = None
        if untrained_policy:
            self.description = "the policy itself, before training"
        elif is_peft(policy):
            self.description = "the policy with its LoRA adapters disabled (no second model)"
        else:
            self.copy = load_causal_lm(model_cfg, dtype=torch.float32, device=device)
            self.copy.eval().requires_grad_(False)
            self.description = (
                f"a frozen copy of {model_cfg.path} ({count_parameters(self.copy)[1]:,} parameters)"
            )

    @contextlib.contextmanager
    def active(self):
        """The reference as a module, in eval mode, for the duration of the block."""
        model = self.copy if self.copy is not None else self.policy
        was_training = model.training
        model.eval()
        try:
            adapters_off = self.copy is None and is_peft(self.policy)
            with self.policy.disable_adapter() if adapters_off else contextlib.nullcontext():
                yield model
        finally:
            model.train(was_training)

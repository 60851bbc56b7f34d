"""Training data, from files or the hub to batches.

`loading` reads files, folders and hub datasets into records; `formats` detects and checks
their format; `source` chooses the train and eval rows (data.path, splits, eval_ratio);
`sft`, `preference` and `prompts` encode them for SFT, for DPO and reward models, and for the
online algorithms' prompts; `stream` orders examples across epochs and processes."""

from rltune.data.formats import (
    FORMATS,
    DataError,
    FormatSpec,
    check_records,
    conversation,
    detect_format,
    preference_parts,
    require_kind,
    resolve_format,
    to_messages,
)
from rltune.data.loading import Record, load_records
from rltune.data.sft import (
    IGNORE_INDEX,
    SFT_FORMATS,
    EncodeStats,
    collate_sft,
    encode_sft,
    encode_sft_dataset,
    has_loss_tokens,
    pack,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "SFT_FORMATS",
    "DataError",
    "EncodeStats",
    "FormatSpec",
    "Record",
    "check_records",
    "collate_sft",
    "conversation",
    "detect_format",
    "encode_sft",
    "encode_sft_dataset",
    "has_loss_tokens",
    "load_records",
    "pack",
    "preference_parts",
    "require_kind",
    "resolve_format",
    "to_messages",
]

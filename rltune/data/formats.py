"""Dataset formats: what columns each one has, how a format is detected, and row validation.

A format is a named set of columns. The algorithms say which formats they accept (``require_kind``),
and every row is validated up front (``check_records``) so a bad row fails before any model loads,
with the file, the row and the column in the message.

Detection order (first match wins, so it is well defined when a file has several columns):

    preference > chat > sharegpt > instruction > prompt_completion > prompt_answer > text

``text`` is last because many files carry a ``text`` column next to the real ones (Alpaca ships
``instruction``/``input``/``output`` *and* ``text``).

Messages are TRL-style ``{"role", "content"}`` dicts; ShareGPT's ``{"from", "value"}`` turns are
mapped to them by ``to_messages``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rltune.data.loading import Record


class DataError(ValueError):
    """A problem with the training data. The message names the file (and the row and column)."""


@dataclass(frozen=True)
class FormatSpec:
    """The columns of one dataset format."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def describe(self) -> str:
        """``name (a, b, [c])``: required columns plain, optional ones in brackets."""
        cols = list(self.required) + [f"[{c}]" for c in self.optional]
        return f"{self.name} ({', '.join(cols)})"


# In detection order. A value in a "str or messages" column may be a string or a message list.
FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in [
        FormatSpec("preference", ("chosen", "rejected"), ("prompt",)),
        FormatSpec("chat", ("messages",)),
        FormatSpec("sharegpt", ("conversations",)),
        FormatSpec("instruction", ("instruction", "output"), ("input",)),
        FormatSpec("prompt_completion", ("prompt", "completion")),
        FormatSpec("prompt_answer", ("prompt",), ("answer",)),
        FormatSpec("text", ("text",)),
    ]
}

CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def detect_format(columns: Iterable[str], file: str) -> str:
    """The first format (in ``FORMATS`` order) whose required columns are all in ``columns``."""
    cols = set(columns)
    for spec in FORMATS.values():
        if cols.issuperset(spec.required):
            return spec.name
    expected = "; ".join(spec.describe() for spec in FORMATS.values())
    raise DataError(
        f"{file}: cannot tell the data format from its columns {sorted(cols)}. "
        f"Expected one of: {expected}. Rename the columns (in the file, or as they are read: "
        "data.columns={question: prompt}), or set data.format."
    )


def resolve_format(records: Sequence[Record], fmt: str | None = None) -> str:
    """The format of ``records``: ``fmt`` if given (checked to exist), else detected per file.

    Every file must detect to the same format; otherwise the message names two that differ.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"data.format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        return fmt
    columns: dict[str, set[str]] = {}
    for record in records:
        columns.setdefault(record.file, set()).update(record.data)
    if not columns:
        raise DataError("data.path: no rows loaded")
    detected = {file: detect_format(cols, file) for file, cols in columns.items()}
    first_file, first = next(iter(detected.items()))
    for file, found in detected.items():
        if found != first:
            raise DataError(
                f"data.path: files have different formats: {first_file} is {first!r} "
                f"but {file} is {found!r}"
            )
    return first


def require_kind(
    fmt: str,
    allowed: Iterable[str],
    algo: str,
    file: str,
    *,
    forced: bool = False,
    key: str = "data.path",
) -> None:
    """Fail unless ``fmt`` is one of the formats ``algo`` can train on; a ``forced`` format is
    data.format's, not the file's; ``key`` is the setting that named ``file``."""
    allowed = [name for name in FORMATS if name in set(allowed)]
    if fmt not in allowed:
        what = f"data.format={fmt}" if forced else f"{key} {file} has format {fmt!r}"
        raise DataError(
            f"{what} but algo={algo} needs one of: "
            + ", ".join(FORMATS[name].describe() for name in allowed)
        )


# ----------------------------------------------------------------------------- row validation


def check_records(records: Sequence[Record], fmt: str, *, max_errors: int = 5) -> None:
    """Validate every row for ``fmt``; raise one DataError listing the first ``max_errors`` problems.

    Required fields must be present, non-null and non-empty; message lists must have a known role
    and string content on every turn.
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    problems: list[str] = []
    for record in records:
        where = record.where
        problems.extend(f"{where}, {p}" for p in _row_problems(record.data, fmt))
    if problems:
        shown = "\n  ".join(problems[:max_errors])
        more = (
            f"\n  ... and {len(problems) - max_errors} more" if len(problems) > max_errors else ""
        )
        raise DataError(f"{len(problems)} invalid field(s) for format {fmt!r}:\n  {shown}{more}")


def _row_problems(row: dict[str, Any], fmt: str) -> list[str]:
    """Problems in one row, each starting with ``column '<name>'``."""
    if fmt == "text":
        return _check_str(row, "text")
    if fmt == "instruction":
        return (
            _check_str(row, "instruction")
            + _check_str(row, "output")
            + _check_str(row, "input", optional=True)
        )
    if fmt == "chat":
        return _check_messages(row, "messages", style="chat")
    if fmt == "sharegpt":
        return _check_messages(row, "conversations", style="sharegpt")
    if fmt == "prompt_completion":
        problems = _check_str_or_messages(row, "prompt") + _check_str_or_messages(row, "completion")
        if not problems and isinstance(row["prompt"], str) and isinstance(row["completion"], list):
            problems.append("column 'completion': a message list needs a message-list prompt")
        return problems
    if fmt == "prompt_answer":
        problems = _check_str_or_messages(row, "prompt")
        answer = row.get("answer")
        if answer is not None and (
            isinstance(answer, bool) or not isinstance(answer, str | int | float)
        ):
            problems.append(
                f"column 'answer': expected a string or number, got {type(answer).__name__}"
            )
        return problems
    if fmt == "preference":
        return _check_preference(row)
    raise AssertionError(fmt)


def _check_str(row: dict[str, Any], col: str, *, optional: bool = False) -> list[str]:
    value = row.get(col)
    if value is None:
        return [] if optional else [f"column '{col}': {'missing' if col not in row else 'null'}"]
    if not isinstance(value, str):
        return [f"column '{col}': expected a string, got {type(value).__name__}"]
    if not value.strip() and not optional:
        return [f"column '{col}': empty string"]
    return []


def _check_str_or_messages(row: dict[str, Any], col: str) -> list[str]:
    if isinstance(row.get(col), list):
        return _check_messages(row, col, style="chat")
    return _check_str(row, col)


def _check_messages(row: dict[str, Any], col: str, *, style: str) -> list[str]:
    value = row.get(col)
    if value is None:
        return [f"column '{col}': {'missing' if col not in row else 'null'}"]
    if not isinstance(value, list):
        return [f"column '{col}': expected a list of messages, got {type(value).__name__}"]
    if not value:
        return [f"column '{col}': empty message list"]
    role_key, content_key = ("from", "value") if style == "sharegpt" else ("role", "content")
    roles = SHAREGPT_ROLES if style == "sharegpt" else CHAT_ROLES
    for j, message in enumerate(value):
        where = f"column '{col}', message {j}"
        if not isinstance(message, dict):
            return [f"{where}: expected an object, got {type(message).__name__}"]
        role, content = message.get(role_key), message.get(content_key)
        if role is None or content is None:
            missing = [k for k, v in ((role_key, role), (content_key, content)) if v is None]
            return [f"{where}: missing {' and '.join(repr(k) for k in missing)}"]
        if role not in roles:
            return [f"{where}: {role_key} {role!r} is not one of {', '.join(roles)}"]
        if not isinstance(content, str):
            return [f"{where}: {content_key} must be a string, got {type(content).__name__}"]
        canonical = SHAREGPT_ROLES[role] if style == "sharegpt" else role
        if not content.strip() and canonical != "system":  # an empty system prompt is common
            return [f"{where}: empty {content_key}"]
    return []


def _check_preference(row: dict[str, Any]) -> list[str]:
    problems = _check_str_or_messages(row, "chosen") + _check_str_or_messages(row, "rejected")
    if problems:
        return problems
    if row.get("prompt") is not None:
        problems = _check_str_or_messages(row, "prompt")
        kinds = {col: isinstance(row[col], list) for col in ("prompt", "chosen", "rejected")}
        if not problems and len(set(kinds.values())) > 1:
            problems.append(
                "columns 'prompt', 'chosen', 'rejected' must all be strings or all "
                "message lists, got "
                + ", ".join(f"{c}={'messages' if m else 'string'}" for c, m in kinds.items())
            )
        return problems
    if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
        return [
            "column 'prompt': missing (string chosen/rejected need a prompt; an implicit "
            "prompt needs chosen and rejected as full conversations)"
        ]
    prefix = _common_prefix_len(row["chosen"], row["rejected"])
    if prefix == 0 or prefix in (len(row["chosen"]), len(row["rejected"])):
        return [
            "columns 'chosen'/'rejected': without a prompt they must share a non-empty first "
            "part of the conversation (the implicit prompt) and then differ"
        ]
    firsts = to_messages([row["chosen"][prefix], row["rejected"][prefix]])
    if any(m.get("role") != "assistant" for m in firsts):
        roles = " / ".join(sorted({str(m.get("role")) for m in firsts}))
        return [
            f"columns 'chosen'/'rejected': they first differ at message {prefix} ({roles}), "
            "not at an assistant turn, so they answer different prompts"
        ]
    return []


# ----------------------------------------------------------------------------- normalisation


def to_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Role/content messages from chat (``role``/``content``) or ShareGPT (``from``/``value``) turns.

    Other keys (``tool_calls``, ``name``, ...) are kept, except null ones: parquet fills every key
    of every message, and a template would see ``name: None`` as a name.
    """
    out = []
    for message in messages:
        kept = {k: v for k, v in message.items() if v is not None}
        if "from" in kept and "role" not in kept:
            kept["role"] = SHAREGPT_ROLES[kept.pop("from")]
            kept["content"] = kept.pop("value")
        out.append(kept)
    return out


def with_system_turn(prompt: str | list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """`prompt` as messages that open with the system turn `system` (data.system_prompt): a
    string becomes the user's turn after it; a message list gets it first, unless it opens
    with a system turn of its own."""
    turn = {"role": "system", "content": system}
    if isinstance(prompt, str):
        return [turn, {"role": "user", "content": prompt}]
    return prompt if prompt and prompt[0].get("role") == "system" else [turn, *prompt]


def conversation(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The role/content messages of a ``chat`` or ``sharegpt`` row."""
    return to_messages(row["messages"] if fmt == "chat" else row["conversations"])


def preference_parts(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a ``preference`` row, each a string or a message list.

    With no prompt column, chosen and rejected are full conversations: their shared first messages
    become the prompt and the rest are the two responses (TRL's "implicit prompt").
    """
    if row.get("prompt") is not None:
        return row["prompt"], row["chosen"], row["rejected"]
    n = _common_prefix_len(row["chosen"], row["rejected"])
    return row["chosen"][:n], row["chosen"][n:], row["rejected"][n:]


def _common_prefix_len(a: list[Any], b: list[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n

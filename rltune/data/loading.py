"""Read training data from files, folders or the hub into plain row dicts.

Tables (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) give one record per row. Raw documents
(``.txt``, ``.md``, ``.pdf``, ``.docx``) give one ``{"text": ...}`` record per file, for continued
pretraining. A folder loads every supported file in it (recursively, sorted by path).

JSON, JSON Lines and CSV are parsed with the standard library rather than ``datasets`` so that a bad
line is reported by its line number, mixed string/message-list columns load without an Arrow schema
error, and nothing is written to a cache. CSV cells are always strings, so CSV can hold the flat
formats only (text, instruction, string prompt_completion / preference, prompt_answer); parquet,
JSON and JSON Lines hold every format, message lists included.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rltune.data.formats import DataError

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf", ".docx")
SUPPORTED_SUFFIXES = TABLE_SUFFIXES + DOCUMENT_SUFFIXES
# Never tried as hub ids: a missing "x.tsv" is a missing file, not a dataset name.
_FILE_LIKE_SUFFIXES = (*SUPPORTED_SUFFIXES, ".tsv", ".gz", ".zip", ".xlsx", ".arrow", ".yml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DOCS_HINT = "pip install 'rltune[docs]'"


@dataclass
class Record:
    """One row of training data and where it came from (for error messages)."""

    data: dict[str, Any]
    """The row: column name to value."""
    file: str
    """The file (or hub dataset id) the row was read from."""
    index: int
    """0-based row number within ``file``."""
    line: int | None = None
    """1-based line of ``file`` where the row starts (JSON Lines and CSV), as an editor shows it."""

    @property
    def where(self) -> str:
        """Where the row is, for error messages: its line where the file has lines, else its
        0-based row (as ``rows[i]`` or ``dataset[i]`` reads it)."""
        return (
            f"{self.file}, line {self.line}"
            if self.line is not None
            else f"{self.file}, row {self.index}"
        )


def is_hub_id(path: Any) -> bool:
    """Whether `path` names a hub dataset: shaped like `org/name` and not a local file or folder
    (a list of paths: every one of them does)."""
    if isinstance(path, list | tuple):
        return bool(path) and all(is_hub_id(p) for p in path)
    name = os.fspath(path)
    return (
        not Path(name).expanduser().exists()
        and _HUB_ID.match(name) is not None
        and Path(name).suffix.lower() not in _FILE_LIKE_SUFFIXES
    )


def load_records(
    path: str | os.PathLike[str] | list[str],
    key: str = "data.path",
    *,
    subset: str | None = None,
    split: str = "train",
) -> list[Record]:
    """Load every row of a file, a list of files, a folder, or a hub dataset id (its `subset`
    and `split`); errors name `key`, the setting that gave `path`."""
    if isinstance(path, list | tuple):
        if not path:
            raise DataError(f"{key}: empty list of files")
        # each hub id in the list at the same subset and split
        return [record for p in path for record in load_records(p, key, subset=subset, split=split)]
    name = os.fspath(path)
    if is_hub_id(name):
        return _load_hub(name, key, subset, split)
    p = Path(name).expanduser()
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"{key}: folder {name} has no {', '.join(SUPPORTED_SUFFIXES)} files")
        return [record for f in files for record in _load_file(f)]
    if p.is_file():
        return _load_file(p)
    raise DataError(f"{key}: file not found: {name}")


def _load_file(p: Path) -> list[Record]:
    file, suffix = str(p), p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{file}: unsupported file type {suffix or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if p.stat().st_size == 0:
        raise DataError(f"{file}: file is empty")
    if suffix in DOCUMENT_SUFFIXES:
        text = _read_document(p, suffix)
        if not text.strip():
            raise DataError(f"{file}: no text found in the document")
        return [Record({"text": text}, file, 0)]
    rows = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }[suffix](p)
    if not rows:
        raise DataError(f"{file}: file has no rows")
    return [Record(row, file, i, line) for i, (row, line) in enumerate(rows)]


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 text (byte {e.start})") from e


Rows = list[tuple[dict[str, Any], int | None]]
"""A table's rows, each with the line it starts on (None where the file has no lines)."""


def _read_jsonl(p: Path) -> Rows:
    rows = []
    # lines end at "\n" only: str.splitlines would also split at U+2028, U+2029 and U+0085,
    # which JSON allows unescaped inside strings (a trailing "\r" is whitespace to json.loads)
    for lineno, line in enumerate(_read_text(p).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}, line {lineno}: malformed JSON ({e.msg}, column {e.colno})"
            ) from e
        if not isinstance(row, dict):
            raise DataError(f"{p}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((row, lineno))
    return rows


def _read_json(p: Path) -> Rows:
    text = _read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects, one per line: JSON Lines named .json
            return _read_jsonl(p)
        raise DataError(f"{p}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f'{p}: expected a JSON list of objects (or {{"data": [...]}}), '
            f"got {type(data).__name__}"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{p}, row {i}: expected a JSON object, got {type(row).__name__}")
    return [(row, None) for row in data]


def _read_csv(p: Path) -> Rows:
    old_limit = csv.field_size_limit(2**31 - 1)  # a cell may hold a whole document
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next((cells for cells in reader if cells), [])  # blank lines skipped
            while header and not header[-1].strip():  # "a,b," names no third column
                header.pop()
            if not header:
                raise DataError(f"{p}: CSV file has no header row")
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise DataError(f"{p}, line {reader.line_num}: the header repeats {twice}")
            # Cells missing at the end of a short line are None (null). Extra cells (an
            # unquoted comma shifts a row's columns) would be silently lost: an error instead.
            rows, end = [], reader.line_num
            for cells in reader:
                line, end = end + 1, reader.line_num  # a quoted cell may span lines
                if not cells:
                    continue  # a blank line
                extra = cells[len(header) :]
                if any(cell.strip() for cell in extra):  # trailing empty cells lose nothing
                    raise DataError(
                        f"{p}, line {line}: {len(extra)} more cells than the header's "
                        f"{len(header)} columns (quote cells that hold a comma)"
                    )
                cells = cells[: len(header)]
                row = dict(zip(header, cells + [None] * (len(header) - len(cells)), strict=True))
                rows.append((row, line))
            return rows
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 text (byte {e.start})") from e
    except csv.Error as e:
        raise DataError(f"{p}: malformed CSV: {e}") from e
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(p: Path) -> Rows:
    import pyarrow as pa  # a dependency of `datasets`, so always installed
    import pyarrow.parquet as pq

    try:
        return [(row, None) for row in pq.read_table(p).to_pylist()]
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{p}: not a readable parquet file: {e}") from e


def _read_document(p: Path, suffix: str) -> str:
    if suffix in (".txt", ".md"):
        return _read_text(p)
    if suffix == ".pdf":
        try:
            import pypdf
        except ImportError as e:
            raise DataError(f"{p}: reading PDF needs pypdf: {_DOCS_HINT}") from e
        try:
            return "\n\n".join(page.extract_text() or "" for page in pypdf.PdfReader(p).pages)
        except pypdf.errors.PyPdfError as e:
            raise DataError(f"{p}: not a readable PDF: {e}") from e
    try:
        import docx
    except ImportError as e:
        raise DataError(f"{p}: reading .docx needs python-docx: {_DOCS_HINT}") from e
    try:
        document = docx.Document(str(p))
    except Exception as e:  # python-docx raises zipfile/KeyError/lxml errors on a bad file
        raise DataError(f"{p}: not a readable .docx file: {e}") from e
    return "\n".join(paragraph.text for paragraph in document.paragraphs)


def _load_hub(name: str, key: str, subset: str | None, split: str) -> list[Record]:
    chosen = (f"subset {subset!r}, " if subset is not None else "") + f"split {split!r}"
    try:
        import datasets

        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        offline = any(flag in ("1", "true", "yes", "on") for flag in flags)
        hint = (
            " HF_HUB_OFFLINE is set, so no hub is reachable: use a local file." if offline else ""
        )
        raise DataError(
            f"{key}: {name!r} is not a local file or folder, and loading it as a "
            f"hub dataset ({chosen}) failed ({type(e).__name__}: {e}).{hint}"
        ) from e
    source = f"{name}:{subset}" if subset is not None else name
    source += f"[{split}]"
    rows = [Record(dict(row), source, i) for i, row in enumerate(dataset)]
    if not rows:
        raise DataError(f"{key}: hub dataset {name!r} has no rows in {chosen}")
    return rows

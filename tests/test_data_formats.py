"""Loading every file type, format detection and row validation (rltune/data/loading.py, formats.py).

Which file types hold which formats: JSON Lines, JSON and parquet hold all of them; CSV cells are
plain strings, so CSV holds only the flat formats (no message lists): text, instruction,
string prompt_completion, string preference and prompt_answer.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rltune.config import DataConfig
from rltune.data import (
    FORMATS,
    DataError,
    Record,
    check_records,
    detect_format,
    load_records,
    preference_parts,
    require_kind,
    resolve_format,
    to_messages,
)
from rltune.data.source import checked, renamed, split_records

PROMPTS = {"prompt_answer", "prompt_completion"}

U = {"role": "user", "content": "what is 2+2?"}
A = {"role": "assistant", "content": "4"}
B = {"role": "assistant", "content": "5"}

# (case name, format, rows, flat: can be written as CSV). Rows are rectangular so every file type
# round-trips them exactly.
CASES = [
    ("text", "text", [{"text": "a document"}, {"text": "another one"}], True),
    (
        "instruction",
        "instruction",
        [
            {"instruction": "add", "input": "2 and 2", "output": "4"},
            {"instruction": "say hi", "input": "", "output": "hi"},
        ],
        True,
    ),
    ("prompt_completion", "prompt_completion", [{"prompt": "2+2=", "completion": "4"}], True),
    (
        "prompt_completion_messages",
        "prompt_completion",
        [{"prompt": [U], "completion": [A]}],
        False,
    ),
    ("chat", "chat", [{"messages": [{"role": "system", "content": "be brief"}, U, A]}], False),
    (
        "sharegpt",
        "sharegpt",
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
        False,
    ),
    ("preference", "preference", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}], True),
    ("preference_messages", "preference", [{"prompt": [U], "chosen": [A], "rejected": [B]}], False),
    ("preference_implicit", "preference", [{"chosen": [U, A], "rejected": [U, B]}], False),
    ("prompt_answer", "prompt_answer", [{"prompt": "2+2=", "answer": "4"}], True),
    ("prompt_answer_messages", "prompt_answer", [{"prompt": [U], "answer": "4"}], False),
]
FILE_TYPES = ["jsonl", "json", "json_data", "csv", "parquet"]


def write_rows(path: Path, rows: list[dict], kind: str) -> Path:
    """Write rows as ``kind`` (jsonl, json, json_data = {"data": [...]}, csv, parquet)."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "json_data":
        path.write_text(json.dumps({"data": rows}))
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def suffix(kind: str) -> str:
    return ".json" if kind == "json_data" else "." + kind


# CSV cells are strings: the message-list cases are not written as CSV.
FILE_CASES = [(kind, *case) for case in CASES for kind in FILE_TYPES if kind != "csv" or case[3]]


@pytest.mark.parametrize(
    ("kind", "name", "fmt", "rows", "flat"), FILE_CASES, ids=[f"{c[1]}-{c[0]}" for c in FILE_CASES]
)
def test_every_format_in_every_file_type(tmp_path, kind, name, fmt, rows, flat):
    path = write_rows(tmp_path / f"{name}{suffix(kind)}", rows, kind)
    records = load_records(str(path))
    assert [r.data for r in records] == rows
    assert [(r.file, r.index) for r in records] == [(str(path), i) for i in range(len(rows))]
    assert resolve_format(records) == fmt
    check_records(records, fmt)


def _minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica, built by hand (pypdf cannot write text)."""
    content = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return out


def test_raw_documents_become_text_records(tmp_path):
    import docx

    (tmp_path / "notes.txt").write_text("plain notes\nsecond line\n")
    (tmp_path / "readme.md").write_text("# Title\n\nSome *markdown*.\n")
    (tmp_path / "paper.pdf").write_bytes(_minimal_pdf("Hello from a PDF"))
    document = docx.Document()
    document.add_paragraph("First paragraph.")
    document.add_paragraph("Second paragraph.")
    document.save(tmp_path / "report.docx")

    assert load_records(str(tmp_path / "notes.txt"))[0].data == {
        "text": "plain notes\nsecond line\n"
    }
    assert load_records(str(tmp_path / "readme.md"))[0].data["text"].startswith("# Title")
    assert "Hello from a PDF" in load_records(str(tmp_path / "paper.pdf"))[0].data["text"]
    [docx_record] = load_records(str(tmp_path / "report.docx"))
    assert docx_record.data == {"text": "First paragraph.\nSecond paragraph."}

    # A folder loads every supported file, sorted by path; hidden files and other types are skipped.
    (tmp_path / ".hidden.txt").write_text("skip me")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    records = load_records(str(tmp_path))
    assert [Path(r.file).name for r in records] == [
        "notes.txt",
        "paper.pdf",
        "readme.md",
        "report.docx",
    ]
    assert resolve_format(records) == "text"


@pytest.mark.parametrize(("module", "file"), [("pypdf", "x.pdf"), ("docx", "x.docx")])
def test_missing_docs_extra_says_what_to_install(tmp_path, monkeypatch, module, file):
    (tmp_path / file).write_bytes(b"not empty")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(DataError, match=r"x\.(pdf|docx).*pip install 'rltune\[docs\]'"):
        load_records(str(tmp_path / file))


def test_unsupported_file_type_and_bad_json_shape(tmp_path):
    (tmp_path / "data.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match=r"data\.tsv: unsupported file type '\.tsv'; supported: "):
        load_records(str(tmp_path / "data.tsv"))
    (tmp_path / "obj.json").write_text('{"text": "one object"}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of objects"):
        load_records(str(tmp_path / "obj.json"))
    (tmp_path / "broken.json").write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"broken\.json, line 3: malformed JSON"):
        load_records(str(tmp_path / "broken.json"))


def test_list_of_files_and_json_lines_named_json(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"text": "one"}], "jsonl")
    b = write_rows(tmp_path / "b.json", [{"text": "two"}, {"text": "three"}], "jsonl")  # JSONL
    records = load_records([str(a), str(b)])
    assert [(Path(r.file).name, r.index, r.data["text"]) for r in records] == [
        ("a.jsonl", 0, "one"),
        ("b.json", 0, "two"),
        ("b.json", 1, "three"),
    ]


@pytest.mark.parametrize(
    ("columns", "fmt"),
    [
        ({"text"}, "text"),
        ({"text", "meta", "id"}, "text"),
        ({"instruction", "output"}, "instruction"),
        ({"instruction", "input", "output", "text"}, "instruction"),  # Alpaca also ships `text`
        ({"prompt", "completion"}, "prompt_completion"),
        ({"prompt", "completion", "answer"}, "prompt_completion"),
        ({"messages"}, "chat"),
        ({"messages", "text"}, "chat"),
        ({"conversations"}, "sharegpt"),
        ({"prompt", "chosen", "rejected"}, "preference"),
        ({"chosen", "rejected"}, "preference"),
        ({"prompt", "completion", "chosen", "rejected"}, "preference"),
        ({"prompt", "answer"}, "prompt_answer"),
        ({"prompt"}, "prompt_answer"),
    ],
)
def test_detection_precedence(columns, fmt):
    assert detect_format(columns, "f.jsonl") == fmt


def test_unknown_columns_name_file_columns_and_formats(tmp_path):
    path = write_rows(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}], "jsonl")
    with pytest.raises(DataError) as e:
        resolve_format(load_records(str(path)))
    message = str(e.value)
    assert str(path) in message and "['question', 'reply']" in message
    for spec in FORMATS.values():
        assert spec.describe() in message
    assert "instruction (instruction, output, [input])" in message


def test_missing_file_and_unknown_hub_id(monkeypatch):
    with pytest.raises(DataError, match=r"data\.path: file not found: nowhere/data\.jsonl"):
        load_records("nowhere/data.jsonl")

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'some-org/some-data' on the Hub (OfflineModeIsEnabled)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'some-org/some-data'.*no hub is reachable"):
        load_records("some-org/some-data")


def test_hub_id_loads_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake(name, subset, split):
        calls.append((name, subset, split))
        return [{"text": "from the hub"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    [record] = load_records("org/corpus")
    [other] = load_records("org/corpus", subset="en", split="test")
    assert calls == [("org/corpus", None, "train"), ("org/corpus", "en", "test")]
    assert (record.data, record.where) == ({"text": "from the hub"}, "org/corpus[train], row 0")
    assert other.where == "org/corpus:en[test], row 0"


def _data(tmp_path, **fields) -> DataConfig:
    return DataConfig(**{"task": None, "path": str(tmp_path / "d.jsonl"), **fields})


def _split(data: DataConfig):
    return split_records(data, eval_n=10, task_kind="prompt_answer", allowed=PROMPTS, algo="grpo")


def test_columns_are_renamed_before_the_format_is_told(tmp_path):
    rows = [{"question": "1+1=", "solution": "#### 2"}, {"question": "2+2=", "solution": "4"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (train, fmt), _ = _split(_data(tmp_path, columns={"question": "prompt", "solution": "answer"}))
    assert fmt == "prompt_answer"
    assert [r.data for r in train] == [
        {"prompt": "1+1=", "answer": "#### 2"},
        {"prompt": "2+2=", "answer": "4"},
    ]
    assert train[1].where == f"{tmp_path / 'd.jsonl'}, line 2"  # still found where it was
    swapped = renamed(train, {"prompt": "answer", "answer": "prompt"})
    assert swapped[0].data == {"answer": "1+1=", "prompt": "#### 2"}


def test_a_column_rename_that_matches_nothing_or_collides_names_it(tmp_path):
    rows = [{"question": "1+1=", "answer": "2"}, {"question": "2+2=", "prompt": "x"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"d\.jsonl: data.columns renames 'qestion', which no row"):
        _split(_data(tmp_path, columns={"qestion": "prompt"}))
    with pytest.raises(DataError, match=r"line 2: data.columns renames 'question' to 'prompt', wh"):
        _split(_data(tmp_path, columns={"question": "prompt"}))


def test_hub_subset_and_splits_are_refused_for_local_data(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"data.subset='main' picks a subset of a hub dataset"):
        _split(_data(tmp_path, subset="main"))
    with pytest.raises(DataError, match=r"data.eval_split='test' names a split of a hub dataset"):
        _split(_data(tmp_path, eval_split="test"))
    with pytest.raises(DataError, match=r"data.split='test' names a split of a hub dataset, but"):
        _split(_data(tmp_path, split="test"))
    local_eval = _data(tmp_path, eval_path=str(tmp_path / "d.jsonl"), eval_split="test")
    with pytest.raises(DataError, match=r"but data.eval_path='.*d.jsonl' is local data: all of"):
        _split(local_eval)


def test_a_list_of_hub_ids_reads_each_at_the_subset_and_splits(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake(name, subset, split):
        calls.append((name, subset, split))
        return [{"prompt": f"{name} {split}", "answer": "2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = _data(tmp_path, path=["org/a", "org/b"], subset="main", split="dev", eval_split="test")
    (train, _), (evals, _) = _split(data)
    assert calls == [
        ("org/a", "main", "dev"),
        ("org/b", "main", "dev"),
        ("org/a", "main", "test"),
        ("org/b", "main", "test"),
    ]
    assert [r.data["prompt"] for r in train + evals] == [
        "org/a dev", "org/b dev", "org/a test", "org/b test",
    ]  # fmt: skip
    # a list with a local file in it has no hub split to hold out
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    mixed = _data(tmp_path, path=["org/a", str(tmp_path / "d.jsonl")], eval_split="test")
    with pytest.raises(DataError, match=r"data.eval_split='test' names a split of a hub dataset"):
        _split(mixed)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "txt"])
def test_empty_file_names_the_file(tmp_path, kind):
    path = tmp_path / f"empty.{kind}"
    path.write_text("")
    with pytest.raises(DataError, match=rf"empty\.{kind}: file is empty"):
        load_records(str(path))
    path.write_text("[]" if kind == "json" else "\n\n" if kind == "jsonl" else "  \n")
    if kind in ("jsonl", "json", "txt"):
        with pytest.raises(DataError, match=rf"empty\.{kind}: (file has no rows|no text)"):
            load_records(str(path))


def test_malformed_jsonl_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_records(str(path))
    path.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: expected a JSON object, got list"):
        load_records(str(path))


def test_null_in_row_3_names_file_line_and_column(tmp_path):
    rows = [{"instruction": "i", "output": "o"} for _ in range(5)]
    rows[3]["output"] = None
    path = write_rows(tmp_path / "inst.jsonl", rows, "jsonl")
    with pytest.raises(DataError, match=rf"{path}, line 4, column 'output': null"):
        checked(load_records(str(path)), "auto", set(FORMATS), "any")


def test_rows_are_named_by_the_line_an_editor_shows_where_the_file_has_lines(tmp_path):
    """JSON Lines and CSV rows are named by the 1-based line they start on, counting blank
    lines and cells that span lines; JSON lists and parquet by their 0-based index."""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n\n\n{"text": "b"}\n{"text": ""}\n')
    assert [r.line for r in load_records(str(jsonl))] == [1, 4, 5]
    with pytest.raises(DataError, match=r"d\.jsonl, line 5, column 'text': empty string"):
        checked(load_records(str(jsonl)), "auto", set(FORMATS), "any")
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('prompt,completion\n"two\nlines",x\n\nq,\n')
    assert [r.line for r in load_records(str(csv_file))] == [2, 5]
    with pytest.raises(DataError, match=r"d\.csv, line 5, column 'completion': empty string"):
        checked(load_records(str(csv_file)), "auto", set(FORMATS), "any")
    csv_file.write_text('prompt,completion\n"carriage\rreturn",x\n')  # a lone CR ends a line too
    assert [r.line for r in load_records(str(csv_file))] == [2]
    rows = [{"text": "a"}, {"text": ""}]
    for kind in ("json", "parquet"):
        path = write_rows(tmp_path / f"d{suffix(kind)}", rows, kind)
        with pytest.raises(DataError, match=rf"d\.{kind}, row 1, column 'text': empty string"):
            checked(load_records(str(path)), "auto", set(FORMATS), "any")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"instruction": "i", "output": ""}, "column 'output': empty string"),
        ({"instruction": "i", "output": "   "}, "column 'output': empty string"),
        ({"instruction": "i", "output": 4}, "column 'output': expected a string, got int"),
        ({"instruction": "", "output": "o", "input": None}, "column 'instruction': empty string"),
    ],
)
def test_bad_values(row, problem):
    with pytest.raises(DataError, match=rf"d\.jsonl, row 1, {problem}"):
        check_records(
            [Record({"instruction": "i", "output": "o"}, "d.jsonl", 0), Record(row, "d.jsonl", 1)],
            "instruction",
        )


def test_missing_column_in_one_row_and_csv_short_line(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl, row 0, column 'completion': missing"):
        check_records([Record({"prompt": "p"}, "d.jsonl", 0)], "prompt_completion")
    path = tmp_path / "short.csv"
    path.write_text("prompt,completion\na,b\nc\n")
    with pytest.raises(DataError, match=r"short\.csv, line 3, column 'completion': null"):
        checked(load_records(str(path)), "auto", set(FORMATS), "any")


@pytest.mark.parametrize(
    ("fmt", "row", "problem"),
    [
        ("chat", {"messages": []}, "column 'messages': empty message list"),
        ("chat", {"messages": "hi"}, "column 'messages': expected a list of messages, got str"),
        (
            "chat",
            {"messages": [U, {"role": "bot", "content": "x"}]},
            "message 1: role 'bot' is not one of",
        ),
        ("chat", {"messages": [{"role": "user"}]}, "message 0: missing 'content'"),
        ("chat", {"messages": [{"content": "x"}]}, "message 0: missing 'role'"),
        (
            "chat",
            {"messages": [U, {"role": "assistant", "content": ""}]},
            "message 1: empty content",
        ),
        ("chat", {"messages": [{"role": "user", "content": ["x"]}]}, "content must be a string"),
        (
            "sharegpt",
            {"conversations": [{"from": "robot", "value": "x"}]},
            "from 'robot' is not one of",
        ),
        (
            "sharegpt",
            {"conversations": [{"role": "user", "content": "x"}]},
            "missing 'from' and 'value'",
        ),
        ("prompt_completion", {"prompt": "p", "completion": [A]}, "needs a message-list prompt"),
        ("preference", {"prompt": "p", "chosen": [A], "rejected": [B]}, "all be strings or all"),
        ("preference", {"chosen": "a", "rejected": "b"}, "column 'prompt': missing"),
        ("preference", {"chosen": [U, A], "rejected": [U, A]}, "share a non-empty first part"),
        (
            "prompt_answer",
            {"prompt": "p", "answer": [1]},
            "column 'answer': expected a string or number",
        ),
    ],
)
def test_malformed_messages_and_mixed_types(fmt, row, problem):
    with pytest.raises(DataError, match=r"m\.jsonl, row 0, .*" + problem.replace("(", r"\(")):
        check_records([Record(row, "m.jsonl", 0)], fmt)


def test_empty_system_prompt_and_missing_optional_fields_are_fine():
    check_records([Record({"messages": [{"role": "system", "content": ""}, U, A]}, "f", 0)], "chat")
    check_records(
        [Record({"instruction": "i", "output": "o", "input": None}, "f", 0)], "instruction"
    )
    check_records(
        [Record({"prompt": "p", "answer": 42}, "f", 0), Record({"prompt": "q"}, "f", 1)],
        "prompt_answer",
    )


def test_many_bad_rows_are_summarised():
    records = [Record({"text": ""}, "t.jsonl", i) for i in range(8)]
    with pytest.raises(DataError, match=r"(?s)8 invalid field.*t\.jsonl, row 4.*and 3 more") as e:
        check_records(records, "text")
    assert "row 5" not in str(e.value)


def test_wrong_kind_for_algo():
    with pytest.raises(DataError) as e:
        require_kind("preference", {"text", "instruction", "chat"}, "sft", "x.jsonl")
    assert str(e.value) == (
        "data.path x.jsonl has format 'preference' but algo=sft needs one of: "
        "chat (messages), instruction (instruction, output, [input]), text (text)"
    )
    require_kind("chat", {"chat"}, "sft", "x.jsonl")


def test_a_forced_format_the_algorithm_cannot_use_names_data_format():
    """data.format=chat on prompt rows for GRPO: the setting is wrong, not the file."""
    records = [Record({"prompt": "1+1=", "answer": "2"}, "q.jsonl", 0, 1)]
    with pytest.raises(DataError) as e:
        checked(records, "chat", PROMPTS, "grpo")
    assert str(e.value) == (
        "data.format=chat but algo=grpo needs one of: prompt_completion (prompt, completion), "
        "prompt_answer (prompt, [answer])"
    )


def test_forced_format_and_mixed_files(tmp_path):
    records = [Record({"prompt": "p", "completion": "c"}, "a.jsonl", 0)]
    assert resolve_format(records, "prompt_answer") == "prompt_answer"
    with pytest.raises(DataError, match="unknown format 'alpaca'"):
        resolve_format(records, "alpaca")
    mixed = records + [Record({"text": "t"}, "b.txt", 0)]
    with pytest.raises(DataError, match=r"a\.jsonl is 'prompt_completion' but b\.txt is 'text'"):
        resolve_format(mixed)


def test_checked_rejects_wrong_kind(tmp_path):
    path = write_rows(tmp_path / "prefs.jsonl", CASES[6][2], "jsonl")
    records = load_records(str(path))
    with pytest.raises(DataError, match=r"prefs\.jsonl has format 'preference' but algo=sft"):
        checked(records, "auto", {"text", "chat"}, "sft")
    assert checked(records, "auto", {"preference"}, "dpo") == "preference"


def test_preference_parts_splits_an_implicit_prompt():
    system = {"role": "system", "content": "be brief"}
    assert preference_parts({"chosen": [system, U, A], "rejected": [system, U, B]}) == (
        [system, U],
        [A],
        [B],
    )
    assert preference_parts({"prompt": "p", "chosen": "c", "rejected": "r"}) == ("p", "c", "r")


def test_to_messages_maps_sharegpt_and_drops_nulls():
    turns = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
    ]
    assert to_messages(turns) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    # Parquet gives every message every key; the null ones are dropped, the rest kept.
    assert to_messages([{"role": "user", "content": "hi", "name": None, "id": "7"}]) == [
        {"role": "user", "content": "hi", "id": "7"}
    ]


def test_an_implicit_prompt_must_end_where_the_assistants_answers_begin(tmp_path):
    """chosen and rejected that first differ at a user turn answer two different questions:
    splitting at their shared system message would compare those answers."""
    system = {"role": "system", "content": "be brief"}
    other = {"role": "user", "content": "what is 3+3?"}
    rows = [
        {"chosen": [system, U, A], "rejected": [system, U, B]},
        {"chosen": [system, U, A], "rejected": [system, other, B]},
    ]
    records = load_records(str(write_rows(tmp_path / "prefs.jsonl", rows, "jsonl")))
    with pytest.raises(DataError, match=r"prefs\.jsonl, line 2, .*first differ at message 1"):
        check_records(records, "preference")
    check_records(records[:1], "preference")


def test_csv_extra_cells_and_unicode_line_separators(tmp_path):
    """An unquoted comma shifts a CSV row's cells: an error naming the line, not a silently
    wrong row. U+2028 inside a JSON string is valid JSON and stays inside its line."""
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("prompt,completion\n1+1=,2\nWhat is 1,2 and 3?,six\n")
    with pytest.raises(DataError, match=r"rows\.csv, line 3: 1 more cells than the header's 2"):
        load_records(str(csv_file))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"text": "line one\u2028line two"}, ensure_ascii=False) + "\n")
    assert [r.data for r in load_records(str(jsonl))] == [{"text": "line one\u2028line two"}]


def test_a_csv_header_that_repeats_a_column_is_an_error(tmp_path):
    """Two cells of a row under one name: one would be silently lost."""
    path = tmp_path / "twice.csv"
    path.write_text("\nprompt,completion,prompt\n1+1=,2,3\n")
    with pytest.raises(DataError, match=r"twice\.csv, line 2: the header repeats \['prompt'\]"):
        load_records(str(path))


def test_csv_trailing_empty_cells_are_not_extra_cells(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\n1+1=,2,\n2+2=,4,,\n")
    assert [r.data for r in load_records(str(path))] == [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "2+2=", "completion": "4"},
    ]


def test_a_missing_eval_file_names_data_eval_path(tmp_path):
    from rltune.config import DataConfig
    from rltune.data.source import split_records

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    data = DataConfig(path=str(train), task=None, eval_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"^data.eval_path: file not found: .*nope.jsonl"):
        split_records(data, eval_n=8, task_kind="prompt_completion", allowed=None, algo="sft")


def test_with_eval_off_no_eval_file_or_split_is_read(tmp_path, monkeypatch):
    """eval_n=0 (train.eval_samples=0): neither data.eval_path nor data.eval_split is loaded,
    so one that is missing stops nothing; data.eval_ratio still holds its share out."""
    import datasets

    calls = []

    def train_only(name, subset, split):
        calls.append((name, subset, split))
        if split != "train":
            raise ValueError(f"Unknown split {split!r}")
        return [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]

    monkeypatch.setattr(datasets, "load_dataset", train_only)
    off = {"eval_n": 0, "task_kind": "prompt_answer", "allowed": PROMPTS, "algo": "grpo"}
    hub = DataConfig(task=None, path="org/a", eval_split="test")
    (train, _), evals = split_records(hub, **off)
    assert (len(train), evals, calls) == (4, None, [("org/a", None, "train")])
    with pytest.raises(DataError, match=r"org/a.*split 'test'.*Unknown split 'test'"):
        _split(hub)  # with eval on, the same split is read, and its failure stops the run

    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    missing = _data(tmp_path, eval_path=str(tmp_path / "nope.jsonl"))
    assert split_records(missing, **off)[1] is None
    rows = "".join(json.dumps({"prompt": f"{i}+1=", "answer": "x"}) + "\n" for i in range(10))
    (tmp_path / "d.jsonl").write_text(rows)
    (train, _), (held_out, _) = split_records(_data(tmp_path, eval_ratio=0.2), **off)
    assert (len(train), len(held_out)) == (8, 2)
    # beside a data.eval_path, data.eval_ratio holds nothing out, read or not
    beside = _data(tmp_path, eval_path=str(tmp_path / "nope.jsonl"), eval_ratio=0.2)
    (train, _), evals = split_records(beside, **off)
    assert (len(train), evals) == (10, None)


def test_eval_rows_of_a_format_the_algorithm_cannot_use_name_data_eval_path(tmp_path):
    """The eval file was named as data.path, the training file's setting."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "some words"}) + "\n")
    with pytest.raises(DataError) as e:
        _split(_data(tmp_path, eval_path=str(tmp_path / "e.jsonl")))
    assert str(e.value).startswith(
        f"data.eval_path {tmp_path / 'e.jsonl'} has format 'text' but algo=grpo needs one of"
    )


def test_an_eval_ratio_that_leaves_no_training_row_says_so(tmp_path):
    """One row and data.eval_ratio=0.5: the one row held out is at least one, so none trains;
    the error was 'data.path: no rows loaded', about a file that has a row."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(DataError) as e:
        _split(_data(tmp_path, eval_ratio=0.5))
    assert str(e.value) == (
        f"data.eval_ratio=0.5 holds out all 1 row(s) of data.path={tmp_path / 'd.jsonl'}: none "
        "are left to train on (add rows, or set data.eval_ratio=0)"
    )


def test_the_eval_rows_of_another_hub_dataset_are_read_at_their_own_subset(tmp_path, monkeypatch):
    """data.subset is data.path's: the eval rows of another dataset are read at
    data.eval_subset (no subset when null), those of the same dataset at data.subset unless
    data.eval_subset says otherwise; rows are named by the subset they came from."""
    import datasets

    calls = []

    def fake(name, subset, split):
        calls.append((name, subset, split))
        if name == "org/bad":
            return [{"prompt": None, "answer": "2"}]
        return [{"prompt": f"{name} {subset} {split}", "answer": "2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    hub = {"path": "org/a", "subset": "main", "eval_split": "test"}

    def eval_read(**fields) -> tuple[tuple, str]:
        calls.clear()
        _, (evals, _) = _split(_data(tmp_path, **hub, **fields))
        assert calls[0] == ("org/a", "main", "train")
        [call] = calls[1:]
        [record] = evals
        return call, record.where

    assert eval_read() == (("org/a", "main", "test"), "org/a:main[test], row 0")
    assert eval_read(eval_path="org/a") == (("org/a", "main", "test"), "org/a:main[test], row 0")
    assert eval_read(eval_path="org/b") == (("org/b", None, "test"), "org/b[test], row 0")
    assert eval_read(eval_path="org/b", eval_subset="en") == (
        ("org/b", "en", "test"),
        "org/b:en[test], row 0",
    )
    assert eval_read(eval_subset="other") == (
        ("org/a", "other", "test"),
        "org/a:other[test], row 0",
    )
    with pytest.raises(DataError, match=r"\n  org/bad\[test\], row 0, column 'prompt': null"):
        _split(_data(tmp_path, **hub, eval_path="org/bad"))


def test_eval_subset_is_refused_for_local_eval_data(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    local_eval = _data(
        tmp_path, path="org/a", eval_path=str(tmp_path / "d.jsonl"), eval_subset="en"
    )
    with pytest.raises(
        DataError, match=r"data.eval_subset='en' picks a subset of a hub dataset, b"
    ):
        _split(local_eval)
    with pytest.raises(
        DataError, match=r"but data.path='.*d.jsonl' is local data: set data.eval_p"
    ):
        _split(_data(tmp_path, eval_subset="en"))

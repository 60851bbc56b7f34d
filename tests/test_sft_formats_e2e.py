"""Every SFT data format, in every file type that can hold it, trains two steps through the CLI
entry point; raw documents too."""

from __future__ import annotations

import pytest
from test_data_formats import CASES, FILE_TYPES, _minimal_pdf, suffix, write_rows

from rltune.cli import run
from rltune.data import SFT_FORMATS
from rltune.logging import read_metrics

pytestmark = pytest.mark.slow

RUNS = [
    (name, kind)
    for name, fmt, _, flat in CASES
    if fmt in SFT_FORMATS
    for kind in FILE_TYPES
    if flat or kind != "csv"
]


def _two_steps(tmp_path, data_path):
    run_dir = run(
        [
            "algo=sft",
            f"data.path={data_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "model=tiny_init",
            "train.max_steps=2",
            "train.batch_size=1",
            "train.micro_batch_size=1",
            "train.log_every=1",
        ]
    )
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]
    assert (run_dir / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("name, kind", RUNS, ids=[f"{n}-{k}" for n, k in RUNS])
def test_format_in_file_type_trains(tmp_path, name, kind):
    rows = next(rows for n, _, rows, _ in CASES if n == name)
    path = write_rows(tmp_path / f"data{suffix(kind)}", rows, kind)
    _two_steps(tmp_path, path)


@pytest.mark.parametrize("ext", ["txt", "md", "pdf", "docx"])
def test_raw_document_trains(tmp_path, ext):
    text = "Integers add up. " * 40
    path = tmp_path / f"doc.{ext}"
    if ext == "pdf":
        path.write_bytes(_minimal_pdf(text))
    elif ext == "docx":
        import docx

        document = docx.Document()
        document.add_paragraph(text)
        document.save(path)
    else:
        path.write_text(text)
    _two_steps(tmp_path, path)

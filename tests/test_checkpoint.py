"""Checkpoint discovery and metrics bookkeeping: what a crash leaves behind is never resumed from,
and nothing written is lost."""

import json

from rltune.checkpoint import STATE_FILE, _rotate, find_resume, list_checkpoints
from rltune.config import LoggerConfig
from rltune.logging import MetricsLogger, read_metrics


def _complete(root, step):
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    return folder


def test_resume_auto_skips_a_half_written_checkpoint(tmp_path):
    _complete(tmp_path, 4)
    _complete(tmp_path, 8)
    (tmp_path / ".tmp-step-12").mkdir()  # the crash came mid-save
    (tmp_path / "step-16").mkdir()  # no trainer_state.json: not complete either
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-8"]
    assert find_resume("auto", tmp_path).name == "step-8"
    assert find_resume(None, tmp_path) is None
    assert find_resume("auto", tmp_path / "nothing-here") is None


def test_numeric_order_and_rotation(tmp_path):
    for step in (2, 10, 100):
        _complete(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-10", "step-100"]
    _rotate(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10", "step-100"]


def test_truncate_after_moves_rows_and_tolerates_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(7))
        + '{"step": 7, "lo'
    )
    logger = MetricsLogger(tmp_path, LoggerConfig(), config={}, total_steps=10)
    logger.truncate_after(4)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.orphaned.jsonl")] == [5, 6]
    logger.log({"step": 5, "loss": float("nan")})
    logger.close()
    assert read_metrics(path)[-1] == {"step": 5, "loss": "nan"}

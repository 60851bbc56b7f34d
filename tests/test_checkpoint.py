"""Checkpoint discovery and metrics bookkeeping: what a crash leaves behind is never resumed from,
and nothing written is lost."""

import errno
import json
import os
import stat
from collections import Counter

import pytest

from rltune.checkpoint import (
    STATE_FILE,
    check_resumable,
    clear_temporaries,
    config_changes,
    find_resume,
    list_checkpoints,
    replace_dir,
    rotate,
    set_aside_after,
)
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


def test_a_resume_path_that_is_no_checkpoint_says_what_it_is(tmp_path):
    from rltune.config import ConfigError

    with pytest.raises(ConfigError, match=f"train.resume={tmp_path}/nope: no such folder$"):
        find_resume(str(tmp_path / "nope"), tmp_path)
    run_dir = tmp_path / "run"
    _complete(run_dir / "checkpoints", 2)
    newest = _complete(run_dir / "checkpoints", 10)
    for given in (run_dir, run_dir / "checkpoints"):  # the run, not one of its checkpoints
        with pytest.raises(ConfigError) as err:
            find_resume(str(given), tmp_path)
        assert str(err.value) == (
            f"train.resume={given}: not a complete checkpoint (no {STATE_FILE}); its newest "
            f"checkpoint is {newest} (or train.resume=auto with hydra.run.dir set to the run's "
            "directory)"
        )
    assert find_resume(str(newest), tmp_path) == newest


def test_numeric_order_and_rotation(tmp_path):
    for step in (2, 10, 100):
        _complete(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-10", "step-100"]
    rotate(tmp_path, keep=2)
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


def test_a_torn_last_line_is_dropped_before_new_rows_land_on_it(tmp_path):
    """No rows to move, but the last line is torn: appending to it would glue the next row onto
    the fragment, making the file unreadable."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 10}\n{"step": 20, "lo')
    logger = MetricsLogger(tmp_path, LoggerConfig(), config={}, total_steps=30)
    logger.truncate_after(10)
    logger.log({"step": 11})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 10, 11]
    assert path.read_text().endswith("\n")


def test_samples_after_the_resumed_step_are_moved_too(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(json.dumps({"step": s, "completion": "x"}) + "\n" for s in (1, 5, 9))
    )
    MetricsLogger(tmp_path, LoggerConfig(), config={}, total_steps=10).truncate_after(5)
    assert [r["step"] for r in read_metrics(samples)] == [1, 5]
    assert [r["step"] for r in read_metrics(tmp_path / "samples.orphaned.jsonl")] == [9]


def test_checkpoints_past_the_resumed_step_are_set_aside_not_deleted(tmp_path):
    """Resuming from step 6 of a run that reached step 8: step-8 belongs to the abandoned
    future. Left under its name it would outrank the new run's step-7 in rotation (deleting
    the checkpoint just written) and in resume=auto."""
    for step in (6, 8):
        _complete(tmp_path, step)
    moved = set_aside_after(tmp_path, 6)
    assert moved == [("step-8", tmp_path / "step-8.superseded")]
    assert (tmp_path / "step-8.superseded" / STATE_FILE).exists()
    _complete(tmp_path, 7)
    rotate(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-7"]
    assert find_resume("auto", tmp_path).name == "step-7"
    _complete(tmp_path, 8)  # the same step superseded twice keeps both
    set_aside_after(tmp_path, 7)
    assert (tmp_path / "step-8.superseded-2").is_dir()


def test_replace_dir_never_leaves_no_complete_copy(tmp_path):
    """A crash between moving the old folder aside and renaming the new one into place leaves
    .tmp-old-<name> as the only complete copy: the next save's cleanup puts it back."""
    old, new = tmp_path / "step-4", tmp_path / ".tmp-step-4"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "x").write_text(text)
    replace_dir(new, old)
    assert (old / "x").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]
    # the crash window, by hand: step-4 moved aside, the new copy not yet renamed
    (tmp_path / "step-4").rename(tmp_path / ".tmp-old-step-4")
    (tmp_path / ".tmp-step-4").mkdir()  # a half-written save
    clear_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]
    assert (old / "x").read_text() == "new"


def test_wandb_run_continues_only_when_a_checkpoint_is_resumed(tmp_path):
    from rltune.logging import _wandb_run_id

    first = _wandb_run_id(tmp_path, resuming=False)
    assert _wandb_run_id(tmp_path, resuming=True) == first
    fresh = _wandb_run_id(tmp_path, resuming=False)  # a fresh start in the same folder
    assert fresh != first and _wandb_run_id(tmp_path, resuming=True) == fresh


def test_config_changes_resolve_interpolations_and_spellings_of_a_path(tmp_path, monkeypatch):
    """The checkpoint's config.yaml is saved unresolved: ${oc.env:...} there and its value here
    are the same setting, and so are `tiny` and the shipped folder's path."""
    from rltune.models import SHIPPED

    monkeypatch.setenv("RLTUNE_TEST_LR", "0.001")
    (tmp_path / "config.yaml").write_text(
        "model:\n  path: tiny\ntrain:\n  lr: ${oc.env:RLTUNE_TEST_LR}\n  seed: 0\n"
    )
    now = {"model": {"path": str(SHIPPED["tiny"]) + "/"}, "train": {"lr": "0.001", "seed": 1}}
    assert config_changes(tmp_path, now) == {"train.seed": (0, 1)}
    check_resumable(tmp_path, now)  # the same model: no error


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Disk:
    """What a power loss would keep, by the strict POSIX rule, as far as os.fsync has been
    called: a file's bytes up to its last fsync, and a folder's entries (name -> inode) as they
    were at its last fsync. Renames keep inodes, so a file synced under a temporary name is
    still known under its final one."""

    def __init__(self, real_fsync):
        self.real_fsync = real_fsync
        self.sizes: dict[tuple[int, int], int] = {}  # a file -> its size when last synced
        self.entries: dict[tuple[int, int], dict[str, int]] = {}  # a folder -> its entries
        self.folder_syncs: Counter = Counter()  # a folder -> how often it was synced

    def fsync(self, fd: int) -> None:
        self.real_fsync(fd)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(fd) as found:
                self.entries[_key(st)] = {e.name: e.inode() for e in found}
            self.folder_syncs[_key(st)] += 1
        else:
            self.sizes[_key(st)] = st.st_size

    def named(self, path) -> bool:
        """Whether `path`'s folder was synced since `path` got its present name."""
        kept = self.entries.get(_key(os.stat(path.parent)), {})
        return kept.get(path.name) == os.stat(path).st_ino

    def written(self, path) -> bool:
        """Whether the file's last fsync reached its present length."""
        st = os.stat(path)
        return self.sizes.get(_key(st)) == st.st_size

    def kept(self, path) -> bool:
        """Whether a power loss now would leave `path` as it is (a folder: its name)."""
        return self.named(path) and (path.is_dir() or self.written(path))

    def syncs_of(self, folder) -> int:
        return self.folder_syncs[_key(os.stat(folder))]


@pytest.fixture
def disk(monkeypatch):
    recorder = Disk(os.fsync)
    monkeypatch.setattr(os, "fsync", recorder.fsync)
    return recorder


def test_rows_are_on_disk_before_the_checkpoint_of_their_step(tmp_path, monkeypatch, disk):
    """A checkpoint is on disk before it is renamed into place, every file and every folder's
    entries (model/'s weights are named in model/), and so must be every metrics and samples
    row up to its step: after a machine crash, a resume from that checkpoint does not write
    those rows again. The rename itself is on disk when the save returns: its folder was synced
    after it. final/ likewise."""
    from rltune import checkpoint
    from rltune.cli import run

    real_replace, lost = checkpoint.replace_dir, []

    def replace_dir(tmp, final):
        lost.extend((final.name, p.relative_to(tmp)) for p in tmp.rglob("*") if not disk.kept(p))
        named = [final]
        if final.parent.name == "checkpoints":
            named.append(final.parent)  # created by the first save
            for name in ("metrics.jsonl", "samples.jsonl"):
                if not disk.kept(final.parent.parent / name):
                    lost.append((final.name, name))
        real_replace(tmp, final)
        lost.extend((final.name, p.name) for p in named if not disk.named(p))

    monkeypatch.setattr(checkpoint, "replace_dir", replace_dir)
    run_dir = run(
        [
            "algo=sft",
            f"hydra.run.dir={tmp_path}",
            "train.max_steps=2",
            "train.save_every=1",
            "train.log_every=1",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "train.eval_samples=4",
            "data.train_size=16",
        ]
    )
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert (run_dir / "final" / "config.json").exists()
    assert lost == []


def test_a_resume_syncs_the_rewritten_metrics_and_the_orphans(tmp_path, monkeypatch, disk):
    """The rewrite without the abandoned rows replaces metrics.jsonl by a rename: unsynced, a
    machine crash could leave an empty file under the name, every row to the checkpoint's step
    lost; and the rows moved out must be on disk, and named, in the orphans' file before they
    leave. The rename is on disk once truncate_after returns."""
    path, orphans = tmp_path / "metrics.jsonl", tmp_path / "metrics.orphaned.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(10)))
    real_replace, at_rename = os.replace, []

    def replace(src, dst):
        at_rename.append((disk.written(src), disk.kept(orphans)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    MetricsLogger(tmp_path, LoggerConfig(), config={}, total_steps=10).truncate_after(5)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5]
    assert at_rename == [(True, True)]
    assert disk.kept(path) and disk.kept(orphans)


def test_a_new_log_file_is_named_on_disk_once_not_per_row(tmp_path, disk):
    """metrics.jsonl and samples.jsonl are synced before each checkpoint, which keeps their rows
    only if their names are on disk too: the run directory is synced when each is created, and
    not again for the rows that follow."""
    logger = MetricsLogger(tmp_path, LoggerConfig(), config={}, total_steps=10)
    for step in range(5):
        logger.log({"step": step, "loss": 1.0})
        logger.log_samples(step, ["prompt", "completion"], [["p", "c"]])
    logger.close()
    assert disk.named(tmp_path / "metrics.jsonl") and disk.named(tmp_path / "samples.jsonl")
    assert disk.syncs_of(tmp_path) == 2


def test_a_new_checkpoints_folder_is_named_in_the_run_directory(tmp_path, disk):
    """save_checkpoint creates checkpoints/ on the first save: unsynced, a power loss could
    take the whole folder, and every checkpoint in it, with it."""
    from rltune.durable import make_dirs

    make_dirs(tmp_path / "run" / "checkpoints")
    assert disk.named(tmp_path / "run") and disk.named(tmp_path / "run" / "checkpoints")


def test_a_folder_that_cannot_be_synced_is_skipped_quietly(tmp_path, monkeypatch):
    """Windows cannot open a folder to sync it, and a file system may answer EINVAL (it cannot
    sync a folder): neither stops a save. Any other failure (EIO: the disk lost the data) does."""
    from rltune.durable import fsync_dir

    def refuse(*args):
        raise PermissionError(errno.EACCES, "a folder cannot be opened on Windows")

    with monkeypatch.context() as windows:
        windows.setattr(os, "name", "nt")
        windows.setattr(os, "open", refuse)
        fsync_dir(tmp_path)

    def fails(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))

        return fsync

    monkeypatch.setattr(os, "fsync", fails(errno.EINVAL))
    fsync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", fails(errno.EIO))
    with pytest.raises(OSError) as raised:
        fsync_dir(tmp_path)
    assert raised.value.errno == errno.EIO


def test_rows_moved_aside_by_a_resume_cut_short_are_not_moved_twice(tmp_path, monkeypatch):
    """A crash after the abandoned rows reach the orphans' file, before metrics.jsonl is
    rewritten without them, leaves them in both files, and the next resume moves them again:
    they must end up in the orphans' file once. A crash in the middle of that append tears its
    last line, which the next append must not glue a row onto."""
    path, orphans = tmp_path / "metrics.jsonl", tmp_path / "metrics.orphaned.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(8))
    earlier = json.dumps({"step": 9, "loss": 0.0}) + "\n"  # moved aside by an earlier resume

    class Crash(BaseException):
        pass

    def replace(src, dst):
        raise Crash

    def truncate_after(step):
        MetricsLogger(tmp_path, LoggerConfig(), config={}, total_steps=10).truncate_after(step)

    path.write_text(rows)
    orphans.write_text(earlier)
    with monkeypatch.context() as crashing:
        crashing.setattr(os, "replace", replace)
        with pytest.raises(Crash):
            truncate_after(4)
    assert [r["step"] for r in read_metrics(path)] == list(range(8))  # still all there
    truncate_after(4)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(orphans)] == [9, 5, 6, 7]

    path.write_text(rows)  # the crash came mid-append: row 5 written, row 6 in part
    orphans.write_text(earlier + json.dumps({"step": 5, "loss": 0.5}) + '\n{"step": 6, "lo')
    truncate_after(4)
    assert [r["step"] for r in read_metrics(orphans)] == [9, 5, 6, 7]
    assert orphans.read_text().endswith("\n")

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach a hub, and wandb never goes online.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def rltune_cli(
    *overrides: str, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m rltune *overrides` in a subprocess (for exit codes, signals and os._exit)."""
    return subprocess.run(
        [sys.executable, "-m", "rltune", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli():
    return rltune_cli


def crash_and_resume(tmp_path: Path, common: list[str], *, fail_at: int) -> tuple[Path, Path]:
    """The run of `common` straight through, and the same run killed right after step
    `fail_at` (train.fail_at_step) then resumed with train.resume=auto: their run folders."""
    from rltune.cli import run

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run([*common, f"hydra.run.dir={straight}"])
    proc = rltune_cli(*common, f"hydra.run.dir={crashed}", f"train.fail_at_step={fail_at}")
    assert proc.returncode == 3, proc.stderr[-2000:]
    run([*common, f"hydra.run.dir={crashed}", "train.resume=auto"])
    return straight, crashed


def small_model_config(tokenizer):
    """A one-layer, width-32 Qwen2 config for `tokenizer`: a real model, fast to build."""
    from rltune import tiny

    return tiny.build_model_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
    )

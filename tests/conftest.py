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

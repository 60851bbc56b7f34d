"""Checkpoints: atomic save, rotation, and everything exact resume needs.

Layout of `checkpoints/step-<N>/`:

    model/              the policy's weights (Hugging Face folder; with LoRA only the adapter)
    optimizer.pt        AdamW state
    scheduler.pt        learning-rate schedule position
    rng.pt              Python, NumPy and torch (CPU and CUDA) generator states
    trainer_state.json  step, the algorithm's data position, metrics totals
    config.yaml         the resolved config of the run that wrote it

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed to
`step-<N>` in one `os.rename`; a crash mid-save leaves only the temporary folder, which
`resume=auto` never considers (and the next save removes).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rltune.config import ConfigError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int,
    extra_models: dict[str, nn.Module] | None = None,
) -> Path:
    """Write `root/step-<step>` atomically, then delete all but the newest `keep` checkpoints.
    `extra_models` (e.g. PPO's value model) go to `<role>/` beside `model/`."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir()
    model.save_pretrained(tmp / "model")
    for role, extra in (extra_models or {}).items():
        extra.save_pretrained(tmp / role)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    _fsync_tree(tmp)

    final = root / f"step-{step}"
    if final.exists():  # re-saving a step after a resume: replace it, never half-overwrite it
        old = root / f".tmp-old-step-{step}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)  # make the rename itself durable
    _rotate(root, keep)
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rotate(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_resume(resume: str | None, root: Path) -> Path | None:
    """Turn train.resume into a checkpoint folder (or None for a fresh start)."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        if not found:
            log.info("train.resume=auto: no checkpoint in %s, starting fresh", root)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra_models: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Restore model(s), optimizer, schedule and RNG from `path`; return the trainer state."""
    load_model_weights(model, path / "model")
    for role, extra in (extra_models or {}).items():
        load_model_weights(extra, path / role)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def load_model_weights(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings save_pretrained stores the matrix once; lm_head shares it after loading.
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    really_missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if really_missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {really_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )

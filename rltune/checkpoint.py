"""Checkpoints: atomic save, rotation, and everything exact resume needs.

Layout of `checkpoints/step-<N>/`:

    model/              the policy's weights (Hugging Face folder; with LoRA only the adapter)
    optimizer.pt        AdamW state
    scheduler.pt        learning-rate schedule position
    rng.pt              Python, NumPy and torch (CPU and CUDA) generator states
    algo-<rank>.pt      the algorithm's state on that process: data position, running
                        baselines, and the rollout a step was in the middle of (GRPO with
                        num_iterations > 1, PPO's minibatches)
    trainer_state.json  step, metrics totals
    config.yaml         the resolved config of the run that wrote it

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed to
`step-<N>` in one `os.rename`; a crash mid-save leaves only the temporary folder, which
`resume=auto` never considers (and the next save removes). Folders leave the same way: renamed
to a hidden name first, then deleted, so a crash never leaves a half-deleted `step-<N>`. Every
rename is followed by a sync of the folder it happened in (see rltune.durable), so that after a
power loss too `step-<N>` is there, complete, or not there at all.

Before a resume, `check_resumable` refuses a checkpoint whose run trained other models (another
algorithm, base model or adapter: SHAPING_KEYS), and `config_changes` lists the settings that
differ from its config.yaml, for the trainer to report.
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
from rltune.durable import fsync_dir, make_dirs

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the entries of every folder in it (its own too), to
    disk: done before the rename that names the tree, so that the name never leads to missing
    or short files (`model/`'s weights are named in `model/`, not in `folder`)."""
    for path in folder.rglob("*"):
        if path.is_dir():
            fsync_dir(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


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
    algo_state: Any,
    config_yaml: str,
    keep: int,
    extra_models: dict[str, nn.Module] | None = None,
) -> Path:
    """Write `root/step-<step>` atomically, then delete all but the newest `keep` checkpoints.
    `extra_models` (e.g. PPO's value model) go to `<role>/` beside `model/`."""
    make_dirs(root)
    clear_temporaries(root)
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir()
    model.save_pretrained(tmp / "model")
    for role, extra in (extra_models or {}).items():
        extra.save_pretrained(tmp / role)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    torch.save(algo_state, tmp / algo_file(0))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    fsync_tree(tmp)
    final = root / f"step-{step}"
    replace_dir(tmp, final)
    rotate(root, keep)
    return final


def algo_file(rank: int) -> str:
    return f"algo-{rank}.pt"


def load_algo_state(
    path: Path, rank: int, trainer_state: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """The algorithm's state that process `rank` saved in checkpoint `path`, its tensors on
    `device` (checkpoints from before algo-<rank>.pt kept it in trainer_state.json)."""
    file = path / algo_file(rank)
    if file.exists():
        return torch.load(file, weights_only=False, map_location=device)
    return trainer_state["algo"]


def clear_temporaries(root: Path) -> None:
    """Remove what an interrupted save, replace or rotation left behind; a folder that a
    replace had moved aside but not yet replaced goes back under its name."""
    restored = False
    for old in root.glob(".tmp-old-*"):
        name = root / old.name.removeprefix(".tmp-old-")
        if not name.exists():
            os.rename(old, name)
            restored = True
    if restored:
        fsync_dir(root)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def remove_dir(folder: Path) -> None:
    """Rename `folder` to a hidden temporary name, then delete it: a crash midway leaves a
    folder that `clear_temporaries` removes, never a half-deleted one under its own name."""
    doomed = folder.with_name(f".tmp-del-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder, doomed)
    fsync_dir(folder.parent)
    shutil.rmtree(doomed)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing any folder there; at every moment
    one of the two complete versions is in place or about to be renamed into it. `tmp`'s
    contents must already be on disk (`fsync_tree`): the rename only names them."""
    if final.exists():  # re-saving a step after a resume, re-exporting final/
        old = final.with_name(f".tmp-old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)  # the new version is named on disk before the old one goes
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
        fsync_dir(final.parent)  # the rename itself on disk, not only in the page cache


def set_aside_after(root: Path, step: int) -> list[tuple[str, Path]]:
    """Rename the checkpoints of steps after `step` to `step-<N>.superseded`: a run resumed
    from `step` (or started afresh, step 0) replaces their future, and left under their names
    they would outrank its new checkpoints in rotation and in resume=auto. They are kept, not
    deleted."""
    moved = []
    for path in list_checkpoints(root):
        if int(STEP_DIR.match(path.name).group(1)) > step:
            target = path.with_name(f"{path.name}.superseded")
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"{path.name}.superseded-{n}")
            os.rename(path, target)
            moved.append((path.name, target))
    if moved:
        fsync_dir(root)
    return moved


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        remove_dir(old)


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
    path = Path(resume).expanduser()
    if not path.exists():
        raise ConfigError(f"train.resume={resume}: no such folder")
    if not (path / STATE_FILE).exists():
        # a run directory or its checkpoints/ folder, given for one of the checkpoints in it
        inside = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        hint = (
            f"; its newest checkpoint is {inside[-1]} (or train.resume=auto with "
            "hydra.run.dir set to the run's directory)"
            if inside
            else ""
        )
        raise ConfigError(
            f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE}){hint}"
        )
    return path


IGNORED_CHANGES = ("train.resume", "train.fail_at_step", "train.max_steps", "train.epochs")
"""Keys expected to differ when a run is resumed: not reported."""


def config_changes(checkpoint: Path, config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys (dotted) whose value in this run's config differs from the one in the checkpoint's
    config.yaml, with (saved, now)."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out

    path = checkpoint / "config.yaml"
    if not path.exists():
        return {}
    saved, now = flat(_resolved_yaml(path)), flat(config)
    return {
        key: (saved.get(key), now.get(key))
        for key in sorted(saved.keys() | now.keys())
        if normal_value(key, saved.get(key)) != normal_value(key, now.get(key))
        and key not in IGNORED_CHANGES
    }


def _resolved_yaml(path: Path) -> dict[str, Any]:
    """A saved config with its interpolations (${oc.env:...}) resolved as this run resolved its
    own; as written where one cannot be resolved here."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...}, which needs Hydra's runtime
        return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def normal_value(key: str, value: Any) -> Any:
    """model.path spelled any way that names the same folder (a shipped name, a relative or
    absolute path, a trailing slash) compares as that folder."""
    if key == "model.path" and isinstance(value, str):
        from rltune.models import resolve_path

        try:
            folder = Path(resolve_path(value))
        except ConfigError:
            return value
        return str(folder.resolve()) if folder.exists() else value
    return value


SHAPING_KEYS = ("algo.name", "model.path", "peft.method", "peft.r", "peft.target_modules")
"""Config keys a checkpoint's weights and optimizer state depend on: a resume must keep them."""


def check_resumable(checkpoint: Path, config: dict[str, Any]) -> None:
    """ConfigError, before anything loads, when `checkpoint` was written by a run whose models
    differ from this one's (another algorithm, base model or adapter)."""
    changed = {k: v for k, v in config_changes(checkpoint, config).items() if k in SHAPING_KEYS}
    if changed:
        diffs = "; ".join(f"{k}={saved} there, {now} here" for k, (saved, now) in changed.items())
        raise ConfigError(
            f"train.resume={checkpoint}: the checkpoint's run trained other models ({diffs})"
        )


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

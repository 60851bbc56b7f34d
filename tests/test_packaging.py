"""A built wheel (and sdist) carries everything an installed rltune needs: the Hydra config
(conf/, with the recipes that conf/recipe links to) and the shipped tiny model, so the command
starts from a non-editable install, far from any checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The build runs without isolation (no network), so the test environment must hold the build
# backend; setuptools 70.1+ writes wheels without the separate `wheel` package.
pytest.importorskip("setuptools")

REPO = Path(__file__).resolve().parent.parent
# What a build reads: copied so the build writes its build/ and *.egg-info/ in tmp_path, not in
# the checkout (where a stale build/lib could also slip old files into the wheel).
SOURCES = ("pyproject.toml", "README.md", "rltune", "conf", "recipes")


def _source_copy(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            # symlinks=True: conf/recipe stays a link (to the copied recipes/), as in the checkout
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(src, dest / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _pip_wheel(source: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    cmd += ["--no-index", "--disable-pip-version-check", "-w", str(out), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("rltune-*.whl")
    return wheel


def _expected_files() -> set[str]:
    """Paths (as in the wheel) of every module, shipped model file and config file of the
    checkout; conf/ is walked through its recipe link."""
    files = {p.relative_to(REPO).as_posix() for p in (REPO / "rltune").rglob("*.py")}
    files |= {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "rltune" / "assets").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    for root, _, names in os.walk(REPO / "conf", followlinks=True):
        for name in names:
            if name.endswith(".yaml"):
                rel = (Path(root) / name).relative_to(REPO / "conf").as_posix()
                files.add(f"rltune/conf/{rel}")
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    return _pip_wheel(_source_copy(tmp / "src"), tmp / "dist")


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` with the unpacked wheel as the only addition to the import path, run
    outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_wheel_holds_modules_model_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "rltune/conf/recipe/sft_tiny_arith.yaml" in names
    assert "rltune/assets/tiny/model.safetensors" in names


def test_command_starts_from_the_unpacked_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # the recipe link became an ordinary folder of copies
    recipe = site / "rltune" / "conf" / "recipe"
    assert recipe.is_dir() and not recipe.is_symlink()
    assert (recipe / "sft_tiny_arith.yaml").read_bytes() == (
        REPO / "recipes" / "sft_tiny_arith.yaml"
    ).read_bytes()
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = _run_installed(
        site,
        work,
        "-c",
        "import rltune.cli, rltune.models; "
        "print(rltune.cli.__file__); print(rltune.cli.conf_dir()); "
        "print(rltune.models.SHIPPED['tiny'] / 'model.safetensors')",
    )
    assert where.returncode == 0, where.stderr[-3000:]
    module, conf, model = (Path(line) for line in where.stdout.splitlines())
    assert module.is_relative_to(site) and conf == site / "rltune" / "conf"
    assert model.is_file() and model.is_relative_to(site)

    proc = _run_installed(site, work, "-m", "rltune", "--cfg", "job", "algo=sft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name: sft" in proc.stdout and "name: tiny" in proc.stdout

    proc = _run_installed(site, work, "-m", "rltune", "--cfg", "job", "+recipe=sft_tiny_arith")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name: tiny_init" in proc.stdout and "max_steps: 1600" in proc.stdout
    assert not (work / "outputs").exists()  # --cfg job only prints


def test_sdist_carries_the_config_and_builds_the_same_wheel(wheel, tmp_path):
    src = _source_copy(tmp_path / "src")
    backend = "from setuptools import build_meta as b; print(b.build_sdist(r'{}'))"
    proc = subprocess.run(
        [sys.executable, "-c", backend.format(tmp_path / "sdist")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=src,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = (tmp_path / "sdist").glob("rltune-*.tar.gz")
    with tarfile.open(sdist) as tar:
        member = tar.getmember(f"{sdist.name[: -len('.tar.gz')]}/conf/recipe/sft_tiny_arith.yaml")
        assert member.isfile()  # a copy, not a link that could dangle
    from_sdist = _pip_wheel(sdist, tmp_path / "dist")
    assert set(zipfile.ZipFile(from_sdist).namelist()) == set(zipfile.ZipFile(wheel).namelist())

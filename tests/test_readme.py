"""The README's config reference is the one the dataclasses generate."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "config_reference.py"


def test_readme_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.readme_section(mod.README.read_text()) == mod.reference().strip(), (
        "README config reference is stale: run `python scripts/config_reference.py --write`"
    )


def test_readme_test_command_is_what_ci_runs():
    repo = SCRIPT.parent.parent
    assert "make test" in (repo / "README.md").read_text()
    assert "make test" in (repo / ".ci" / "run").read_text()

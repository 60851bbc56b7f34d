"""Print the README's config reference from the dataclasses' field docstrings.

    python scripts/config_reference.py            # print it
    python scripts/config_reference.py --write    # replace it in README.md between the markers

tests/test_readme.py checks that the README holds exactly this text, so the reference never
drifts from the code.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rltune.config import ALGO_CONFIGS, GROUPS, RolloutConfig, TrainConfig, field_docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    return "null" if value is None else str(value)


def section(prefix: str, cls: type, title: str | None = None) -> str:
    docs = field_docs(cls)
    heading = f"**`{title or prefix}`** ({cls.__name__})"
    lines = [heading, "", "| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        doc = docs.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{prefix}.{f.name}` | `{_default(f)}` | {doc} |")
    return "\n".join(lines)


def reference() -> str:
    parts = [section("train", TrainConfig), section("rollout", RolloutConfig)]
    parts += [section(group, cls) for group, cls in GROUPS.items()]
    parts += [section("algo", cls, title=f"algo={name}") for name, cls in ALGO_CONFIGS.items()]
    return "\n\n".join(parts)


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_section(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = README.read_text()
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(f"{head}{START}\n{reference()}\n{END}{tail}")
    else:
        print(reference())

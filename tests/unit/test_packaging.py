"""The wheel's package list is written out in pyproject.toml (migrations/ maps into the package):
a package under supervisor/ missing from it installs a daemon without that code, which editable
installs (and so every other test) never notice."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_under_supervisor_ships_in_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "supervisor").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    # And nothing listed that no longer exists (a stale entry breaks the build).
    mapped = {"supervisor.migrations", "supervisor.migrations.versions"}
    assert listed - on_disk - mapped == set()

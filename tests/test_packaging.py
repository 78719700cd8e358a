"""The tap's wheel carries the tap alone: the sandbox and its dependencies stay out of a user's install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_tap_declares_no_sandbox_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [requirement.split(">")[0].split("=")[0].split("[")[0].strip() for requirement in project["dependencies"]]
    assert "werkzeug" not in names and "commerce-exports-sandbox" not in names
    assert "tap-commerce-exports-sandbox" not in project["scripts"]


def test_running_the_tap_imports_neither_the_sandbox_nor_werkzeug():
    probe = (
        "import sys, tap_commerce_exports.tap;"
        "tap_commerce_exports.tap.TapCommerceExports.config_jsonschema;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('werkzeug', 'commerce_sandbox')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_the_wheel_holds_the_tap_and_its_specs_but_not_the_sandbox(tmp_path):
    # Built from a copy: setuptools leaves a build/ folder beside the sources it builds.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "tap_commerce_exports", source / "tap_commerce_exports", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    # The build backend's own warnings (pyproject's license table, say) show only with -v.
    assert "DeprecationWarning" not in build.stdout + build.stderr, build.stdout[-3000:]
    (wheel,) = tmp_path.glob("tap_commerce_exports-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tap_commerce_exports/tap.py" in names
    assert any(name.startswith("tap_commerce_exports/specs/") for name in names)
    assert not [name for name in names if "sandbox" in name.split("/")[0] or "/sandbox/" in name]
    assert any(name.endswith("licenses/LICENSE") for name in names)  # project.license = "Apache-2.0"

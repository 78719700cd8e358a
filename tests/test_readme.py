"""The README's settings and streams tables are the tap's own (`--about --format markdown`)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "update_readme.py"


def test_readme_tables_match_the_tap():
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.README.read_text() == module.rendered(), "run: .venv/bin/python scripts/update_readme.py"

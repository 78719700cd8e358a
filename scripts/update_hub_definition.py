"""Regenerate the settings of plugins/extractors/tap-commerce-exports.yml (the Meltano Hub-style
definition) from meltano.yml's extractor block, so the two never drift; tests/test_project_files.py
fails when they do. Run: .venv/bin/python scripts/update_hub_definition.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HUB_DEFINITION = ROOT / "plugins" / "extractors" / "tap-commerce-exports.yml"


def extractor_settings() -> list[dict]:
    project = yaml.safe_load((ROOT / "meltano.yml").read_text())
    (extractor,) = [e for e in project["plugins"]["extractors"] if e["name"] == "tap-commerce-exports"]
    return extractor["settings"]


def main() -> None:
    text = HUB_DEFINITION.read_text()
    head, _, _ = text.partition("\nsettings:\n")
    settings = yaml.safe_dump({"settings": extractor_settings()}, sort_keys=False, width=100, allow_unicode=True)
    HUB_DEFINITION.write_text(f"{head}\n{settings}")
    print(f"{HUB_DEFINITION.relative_to(ROOT)} updated")


if __name__ == "__main__":
    main()

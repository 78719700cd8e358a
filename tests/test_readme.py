"""The README's settings and streams tables are the tap's own (`--about --format markdown`)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "update_readme.py"


def test_readme_tables_match_the_tap():
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.README.read_text() == module.rendered(), "run: .venv/bin/python scripts/update_readme.py"


def test_every_tap_setting_is_declared_in_meltano_yml():
    """Meltano silently drops settings an extractor does not declare."""
    import yaml

    from tap_commerce_exports.tap import TapCommerceExports

    project = yaml.safe_load((SCRIPT.parents[1] / "meltano.yml").read_text())
    extractor = project["plugins"]["extractors"][0]
    declared = {setting["name"] for setting in extractor["settings"]}
    own = set(TapCommerceExports.config_jsonschema["properties"])
    assert own <= declared, f"declare in meltano.yml: {sorted(own - declared)}"
    secrets = {name for name, prop in TapCommerceExports.config_jsonschema["properties"].items() if prop.get("secret")}
    assert secrets == {s["name"] for s in extractor["settings"] if s.get("sensitive")}

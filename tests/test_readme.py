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

    from tap_commerce_exports.sources import SOURCES
    from tap_commerce_exports.tap import COMMON_SETTINGS

    project = yaml.safe_load((SCRIPT.parents[1] / "meltano.yml").read_text())
    extractor = project["plugins"]["extractors"][0]
    declared = {setting["name"] for setting in extractor["settings"]}
    # The tap's own settings; Meltano adds the SDK's built-in ones (stream_maps, ...) from capabilities.
    own = [*COMMON_SETTINGS, *(setting for source in SOURCES for setting in source.settings)]
    assert {s.name for s in own} <= declared, f"declare in meltano.yml: {sorted({s.name for s in own} - declared)}"
    # The SDK's built-in settings users set (TAP_COMMERCE_EXPORTS_BATCH_CONFIG was ignored without this).
    assert {"batch_config", "stream_maps", "stream_map_config", "flattening_enabled"} <= declared
    secrets = {s.name for s in own if s.to_dict()[s.name].get("secret")}
    assert secrets == {s["name"] for s in extractor["settings"] if s.get("sensitive")}

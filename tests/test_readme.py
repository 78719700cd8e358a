"""The README's settings and streams tables are the tap's own (`--about --format markdown`)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "update_readme.py"


def test_readme_tables_match_the_tap():
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.README.read_text() == module.rendered(), "run: .venv/bin/python scripts/update_readme.py"


#: The Meltano kind each JSON type of the tap's settings is declared with. `number` settings are
#: `integer`: Meltano 4.4.1 cannot pass a `decimal` setting given as text (meltano.yml, README "Settings").
MELTANO_KINDS = {
    "string": {"string", "date_iso8601"},
    "integer": {"integer"},
    "number": {"integer"},
    "boolean": {"boolean"},
    "array": {"array"},
    "object": {"object"},
}


def test_every_tap_setting_is_declared_in_meltano_yml():
    """Meltano silently drops settings an extractor does not declare: every setting of the tap's
    `--about` schema, its own and the SDK's built-in ones (batch_config, stream_maps, faker_config,
    flattening_*), is declared, with a kind that parses its JSON type."""
    import yaml

    from tap_commerce_exports.sources import SOURCES
    from tap_commerce_exports.tap import COMMON_SETTINGS

    about = subprocess.run(
        [str(Path(sys.executable).parent / "tap-commerce-exports"), "--about", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    properties = json.loads(about.stdout)["settings"]["properties"]
    project = yaml.safe_load((SCRIPT.parents[1] / "meltano.yml").read_text())
    extractor = project["plugins"]["extractors"][0]
    declared = {setting["name"]: setting for setting in extractor["settings"]}
    own = [*COMMON_SETTINGS, *(setting for source in SOURCES for setting in source.settings)]
    assert {s.name for s in own} <= set(properties)  # the --about schema holds the tap's own settings too
    builtin = set(properties) - {s.name for s in own}
    assert {"batch_config", "stream_maps", "faker_config", "flattening_separator"} <= builtin
    assert set(properties) <= set(declared), f"declare in meltano.yml: {sorted(set(properties) - set(declared))}"
    for name, schema in properties.items():
        (json_type,) = [t for t in schema["type"] if t != "null"]
        assert declared[name]["kind"] in MELTANO_KINDS[json_type], (name, json_type, declared[name]["kind"])
    secrets = {s.name for s in own if s.to_dict()[s.name].get("secret")}
    assert secrets == {name for name, s in declared.items() if s.get("sensitive")}

"""Regenerate the README's settings and streams tables from the tap itself.

The settings table is `tap-commerce-exports --about --format markdown`'s; tests/test_readme.py
fails when the README drifts from either. Run: .venv/bin/python scripts/update_readme.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def settings_table() -> str:
    about = subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--about", "--format", "markdown"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"\| Setting \|.*?(?=\n\n|\Z)", about, re.S)
    assert match, "no settings table in --about output"
    return match.group(0).strip()


def streams_table() -> str:
    from tap_commerce_exports.sources import SOURCES

    lines = [
        "| Stream | API | Partition | Replication key | Primary key | Windows filter on |",
        "|:--|:--|:--|:--|:--|:--|",
    ]
    for source in SOURCES:
        for stream in source.stream_types:
            partition = getattr(stream, "partition_key", None) or ""
            replication = stream.replication_key or "(full table)"
            lines.append(
                f"| `{stream.name}` | {source.name} | {partition} | {replication} | "
                f"{', '.join(stream.primary_keys)} | {windows_filter_on(stream)} |"
            )
    return "\n".join(lines)


def windows_filter_on(stream) -> str:
    if not stream.replication_key:
        return "(read whole each run)"
    if hasattr(stream, "windows_follow"):
        return stream.windows_follow()
    return getattr(stream, "window_filters_on", "")


def replace_block(text: str, name: str, content: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    assert pattern.search(text), f"README has no {name} block"
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)


def rendered() -> str:
    text = README.read_text()
    text = replace_block(text, "settings", settings_table())
    return replace_block(text, "streams", streams_table())


if __name__ == "__main__":
    README.write_text(rendered())
    print("README.md tables updated")

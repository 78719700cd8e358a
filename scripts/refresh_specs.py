"""Copy the vendors' published OpenAPI fragments into the sandbox as JSON.

The sandbox validates every request body against these documents. JSON loads in
milliseconds where the 900 KB Intelligems YAML takes seconds, so we ship JSON.
Run: python scripts/refresh_specs.py ../shared/reference
"""

import json
import sys
from pathlib import Path

import yaml

SPECS_DIR = Path(__file__).resolve().parents[1] / "tap_commerce_exports" / "specs"


def main(reference_dir: str) -> None:
    for source in sorted(Path(reference_dir).glob("*.openapi.yaml")):
        document = yaml.load(source.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        target = SPECS_DIR / source.name.replace(".yaml", ".json")
        target.write_text(json.dumps(document, separators=(",", ":"), sort_keys=True))
        print(f"{source.name} -> {target.relative_to(Path.cwd()) if target.is_relative_to(Path.cwd()) else target}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/reference")

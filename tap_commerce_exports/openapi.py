"""The vendors' published OpenAPI documents, and validation of request bodies against them.

The tap validates user-supplied request parts (Intelligems `filters`) with these schemas before
sending them; the sandbox validates every request body it receives. The documents are JSON copies
of ../shared/reference/*.openapi.yaml made by scripts/refresh_specs.py.
"""

from __future__ import annotations

import json
import threading
from functools import cache
from importlib import resources
from typing import Any

import jsonschema


def _openapi30_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 says `nullable: true`; JSON Schema says `type: [..., "null"]`."""
    if isinstance(node, list):
        return [_openapi30_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _openapi30_to_jsonschema(value) for key, value in node.items()}
    if converted.pop("nullable", False):
        if isinstance(converted.get("type"), str):
            converted["type"] = [converted["type"], "null"]
        if "enum" in converted and None not in converted["enum"]:
            converted["enum"] = [*converted["enum"], None]
    return converted


@cache
def load_spec(filename: str) -> dict:
    """A vendor OpenAPI document shipped in tap_commerce_exports/specs/."""
    text = resources.files("tap_commerce_exports").joinpath("specs").joinpath(filename).read_text()
    document = json.loads(text)
    if str(document.get("openapi", "")).startswith("3.0"):
        document = _openapi30_to_jsonschema(document)
    return document


class SpecValidator:
    """Validates request bodies against the requestBody schema of one operation in a vendor spec."""

    def __init__(self, spec_filename: str) -> None:
        self.spec = load_spec(spec_filename)
        self._validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
        self._lock = threading.Lock()

    def _validator(self, path: str, method: str) -> jsonschema.protocols.Validator:
        key = (path, method.lower())
        with self._lock:
            if key not in self._validators:
                operation = self.spec["paths"][path][method.lower()]
                content = operation["requestBody"]["content"]
                schema = dict(content.get("application/json", next(iter(content.values())))["schema"])
                schema["components"] = self.spec.get("components", {})
                self._validators[key] = jsonschema.Draft202012Validator(schema)
            return self._validators[key]

    def errors(self, path: str, method: str, body: Any) -> list[str]:
        """Human-readable validation errors; empty when the body matches the published schema."""
        validator = self._validator(path, method)
        return [
            f"{'/'.join(str(p) for p in error.absolute_path) or '(body)'}: {error.message}"
            for error in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
        ]

    def property_errors(self, path: str, method: str, property_name: str, value: Any) -> list[str]:
        """Errors of one request-body property's value, for settings passed through to the API."""
        operation = self.spec["paths"][path][method.lower()]
        content = operation["requestBody"]["content"]
        body_schema = content.get("application/json", next(iter(content.values())))["schema"]
        schema = {**body_schema["properties"][property_name], "components": self.spec.get("components", {})}
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{'/'.join(str(p) for p in error.absolute_path) or '(value)'}: {error.message}"
            for error in validator.iter_errors(value)
        ]

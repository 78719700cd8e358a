"""The Singer SDK internals the tap relies on still exist, with the signatures it calls them with.

An SDK upgrade that renames or reshapes one of them fails here, naming it, rather than somewhere in
the middle of a sync (sdk_adapter.py is the only module that touches them).
"""

from __future__ import annotations

import inspect

import pytest
from singer_sdk import Tap
from singer_sdk.streams import Stream

from tap_commerce_exports.sdk_adapter import STREAM_MEMBERS, TAP_MEMBERS


def _check(owner: type, name: str, parameters: tuple[str, ...] | None, instance_attributes: set[str]) -> None:
    if parameters is None:
        source = inspect.getsource(owner)
        assert hasattr(owner, name) or name in instance_attributes or f"self.{name}" in source, (
            f"singer-sdk {owner.__name__} no longer has {name}: update sdk_adapter.py"
        )
        return
    member = getattr(owner, name, None)
    assert callable(member), f"singer-sdk {owner.__name__}.{name} is gone: update sdk_adapter.py"
    actual = [p for p in inspect.signature(member).parameters if p != "self"]
    assert all(p in actual for p in parameters), (
        f"singer-sdk {owner.__name__}.{name} takes {actual}, the tap calls it with {list(parameters)}: "
        "update sdk_adapter.py"
    )


@pytest.mark.parametrize("name", sorted(STREAM_MEMBERS))
def test_each_stream_internal_the_adapter_uses_is_still_there(name):
    _check(Stream, name, STREAM_MEMBERS[name], set())


@pytest.mark.parametrize("name", sorted(TAP_MEMBERS))
def test_each_tap_internal_the_adapter_uses_is_still_there(name):
    _check(Tap, name, TAP_MEMBERS[name], set())


def test_no_other_module_of_the_tap_touches_those_internals():
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "tap_commerce_exports"
    members = [*STREAM_MEMBERS, *TAP_MEMBERS]
    offenders = [
        f"{path.relative_to(package)}: {name}"
        for path in package.rglob("*.py")
        if path.name != "sdk_adapter.py"
        for name in members
        if f".{name}" in path.read_text() or f"def {name}(" in path.read_text()
    ]
    assert offenders == []

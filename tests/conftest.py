"""Shared fixtures: a fresh sandbox per test (its own data, request log and faults) on free ports.

Every test runs against one of several sandbox seeds, chosen from its name: each seed is another
plausible shape of what the vendors leave unpublished (id formats, column order and spelling,
optional columns and headers), so the suite as a whole tests a range of realities, not one guess.
`TAP_SANDBOX_SEED=N pytest` runs every test against seed N instead.
"""

from __future__ import annotations

import os
import zlib

import pytest

from commerce_sandbox.server import SEED_VARIABLE, Sandbox

FAST_EXPORTS = 0.05  # seconds before an emulated export is ready
#: The realities the suite rotates through.
SEEDS = (7, 11, 23, 42)
_CHOSEN_SEED = os.environ.get(SEED_VARIABLE)


def seed_for(test_id: str) -> int:
    return int(_CHOSEN_SEED) if _CHOSEN_SEED else SEEDS[zlib.crc32(test_id.encode()) % len(SEEDS)]


@pytest.fixture(autouse=True)
def sandbox_seed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The seed every Sandbox() in this test gets, unless the test names one."""
    seed = seed_for(request.node.nodeid)
    monkeypatch.setenv(SEED_VARIABLE, str(seed))
    return seed


@pytest.fixture(params=(int(_CHOSEN_SEED),) if _CHOSEN_SEED else SEEDS, ids=lambda seed: f"seed{seed}")
def every_seed(request: pytest.FixtureRequest, sandbox_seed: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Runs a test once per seed in SEEDS, for the point tests whose answer depends on what a seed varies
    (optional headers, their formats): one rotated seed would prove one reality. Pass the seed to
    Sandbox(seed=...) too: fixtures the test asks for before this one already read the variable."""
    monkeypatch.setenv(SEED_VARIABLE, str(request.param))
    return request.param


def pytest_report_header(config: pytest.Config) -> str:
    return f"sandbox seeds: {_CHOSEN_SEED or ', '.join(map(str, SEEDS)) + ' (rotated by test)'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The SDK's standard check that records hold only the catalog's columns, skipped for the streams
    whose files bring new columns (tests/test_core.py says which, for the seed it runs)."""
    for item in items:
        module_streams = getattr(item.module, "RECORDS_MAY_HOLD_NEW_COLUMNS", None)
        if not module_streams or "record_schema_matches_transformed_catalog" not in item.name:
            continue
        stream = item.name.rsplit("[", 1)[-1].rstrip("]")
        if stream in module_streams:
            item.add_marker(pytest.mark.skip(reason=f"{stream}: files bring columns discovery cannot know"))


def _sandbox(*apis: str):
    with Sandbox(apis, export_latency_seconds=FAST_EXPORTS) as running:
        yield running


@pytest.fixture
def voucherify_sandbox(sandbox_seed):
    yield from _sandbox("voucherify")


@pytest.fixture
def nextcommerce_sandbox(sandbox_seed):
    yield from _sandbox("nextcommerce")


@pytest.fixture
def intelligems_sandbox(sandbox_seed):
    yield from _sandbox("intelligems")


@pytest.fixture
def full_sandbox(sandbox_seed):
    yield from _sandbox("voucherify", "nextcommerce", "intelligems")

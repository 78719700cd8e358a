"""Shared fixtures: a fresh sandbox per test (its own data, request log and faults) on free ports."""

from __future__ import annotations

import pytest

from tap_commerce_exports.sandbox.server import Sandbox

FAST_EXPORTS = 0.05  # seconds before an emulated export is ready


def _sandbox(*apis: str):
    with Sandbox(apis, export_latency_seconds=FAST_EXPORTS) as running:
        yield running


@pytest.fixture
def voucherify_sandbox():
    yield from _sandbox("voucherify")


@pytest.fixture
def nextcommerce_sandbox():
    yield from _sandbox("nextcommerce")


@pytest.fixture
def intelligems_sandbox():
    yield from _sandbox("intelligems")


@pytest.fixture
def full_sandbox():
    yield from _sandbox("voucherify", "nextcommerce", "intelligems")

"""The Singer SDK's standard tap tests, against the sandbox (all three APIs) over HTTP."""

from __future__ import annotations

import atexit

from singer_sdk.testing import get_tap_test_class

from tap_commerce_exports.sandbox.server import Sandbox
from tap_commerce_exports.tap import TapCommerceExports
from tests.harness import FAST_SETTINGS

# get_tap_test_class takes its config when the module is imported, so the sandbox starts here.
SANDBOX = Sandbox(export_latency_seconds=0.05).start()
atexit.register(SANDBOX.stop)
SANDBOX.nextcommerce.rate_per_second = SANDBOX.nextcommerce.rate_burst = 200

# The standard suite compares records with the catalog of discovery time. Next Commerce files from
# February on bring a column discovery cannot know (the tap announces it with a new SCHEMA, see
# test_nextcommerce.py), so this suite reads January only.
TestTapCommerceExports = get_tap_test_class(
    tap_class=TapCommerceExports,
    config={
        **FAST_SETTINGS,
        "end_date": "2024-01-31T00:00:00Z",
        "export_window_days": 30,
        "nextcommerce_requests_per_second": 100,
        **SANDBOX.tap_config(),
    },
)

"""API calls of a daily incremental Voucherify run over many campaigns (issue 17).

Voucherify's Business plan allows 100 requests a minute and 100,000 a billing cycle
(../shared/reference/NOTES.md), so what a daily run costs is counted in calls, not seconds. This
starts a sandbox with `campaigns` gift card and loyalty campaigns on that plan's limits, runs a
first sync of every Voucherify stream up to yesterday, then the daily run from that state to now
(one window per stream), and counts from the sandbox's request log what the daily run asked of
the API host (file downloads, on the download host, are counted apart).

    .venv/bin/python benchmarks/voucherify_calls.py [--campaigns 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from commerce_sandbox.server import Sandbox
from tests.harness import run_tap

UTC = dt.timezone.utc
TRANSACTION_CAMPAIGN_TYPES = ("GIFT_VOUCHERS", "LOYALTY_PROGRAM")
#: Rows the daily run finds: new orders, and new transactions of a few campaigns.
NEW_ROWS = 3
CAMPAIGNS_WITH_NEW_TRANSACTIONS = 3
EXPORT_ID = re.compile(r"/exp_[A-Za-z0-9]+")


@dataclass
class CallCount:
    """What the daily run asked of Voucherify."""

    campaigns: int
    api_calls: int
    downloads: int
    by_endpoint: Counter
    records: int
    refused: int

    def report(self) -> str:
        lines = [
            f"daily incremental run over {self.campaigns} campaigns: {self.api_calls} API calls "
            f"(target <= 20), {self.downloads} file downloads, {self.records} records, {self.refused} answered 429"
        ]
        lines += [f"  {count:4d}  {endpoint}" for endpoint, count in sorted(self.by_endpoint.items())]
        return "\n".join(lines)


def add_transaction_campaigns(emulator, campaigns: int) -> list[str]:
    """Gift card and loyalty campaigns, half each, until there are `campaigns` of them."""
    have = sum(len(emulator.campaign_ids(kind)) for kind in TRANSACTION_CAMPAIGN_TYPES)
    missing = max(0, campaigns - have)
    emulator.add_campaigns(missing // 2, "GIFT_VOUCHERS")
    emulator.add_campaigns(missing - missing // 2, "LOYALTY_PROGRAM")
    return [campaign for kind in TRANSACTION_CAMPAIGN_TYPES for campaign in emulator.campaign_ids(kind)]


def count_daily_run_calls(
    campaigns: int = 200,
    *,
    seed: int | None = None,
    export_latency_seconds: float = 1.0,
    poll_interval_seconds: float = 2.0,
    rows_per_type: int = 5,
) -> CallCount:
    """Counts the API calls of the daily run (the defaults are the tap's and the sandbox CLI's)."""
    with Sandbox(
        ("voucherify",), seed=seed, export_latency_seconds=export_latency_seconds, rows_per_type=rows_per_type
    ) as sandbox:
        emulator = sandbox.voucherify
        emulator.use_plan("business")
        ids = add_transaction_campaigns(emulator, campaigns)
        now = dt.datetime.now(UTC)
        yesterday = now - dt.timedelta(days=1)
        config = {
            **emulator.tap_config(),
            "start_date": "2024-01-01T00:00:00Z",
            "poll_interval_seconds": poll_interval_seconds,
            "poll_max_interval_seconds": 60,
            "export_timeout_seconds": 600,
        }
        # The first sync, in one window per stream: its cost is not what is measured.
        first = run_tap({**config, "end_date": yesterday.isoformat(), "export_window_days": 3650})
        if first.error is not None:
            raise RuntimeError(f"the first sync failed: {first.error}")
        emulator.add_rows("voucherify_orders", NEW_ROWS, yesterday, now)
        for campaign in ids[:CAMPAIGNS_WITH_NEW_TRANSACTIONS]:
            emulator.add_rows("voucherify_campaign_transactions", NEW_ROWS, yesterday, now, {"campaign_id": campaign})
        sandbox.log.clear()
        refused_before = emulator.rate_limited
        daily = run_tap({**config, "end_date": None, "export_window_days": 30}, state=first.final_state)
        if daily.error is not None:
            raise RuntimeError(f"the daily run failed: {daily.error}")
        calls = sandbox.log.entries(host="voucherify-api")
        return CallCount(
            campaigns=len(ids),
            api_calls=len(calls),
            downloads=len(sandbox.log.entries(host="voucherify-download")),
            by_endpoint=Counter(f"{e.method} {EXPORT_ID.sub('/{id}', e.path)}" for e in calls),
            records=sum(1 for m in daily.messages if m["type"] == "RECORD"),
            refused=emulator.rate_limited - refused_before,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    print(count_daily_run_calls(args.campaigns, seed=args.seed).report())


if __name__ == "__main__":
    main()

"""Issue 17: one Voucherify transactions export for every campaign, polls through one listing, the
migration of per-campaign state, the calls a daily run costs, and metadata columns for every object."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from benchmarks.voucherify_calls import count_daily_run_calls
from tap_commerce_exports.sources.base import ConfigError
from tap_commerce_exports.tap import TapCommerceExports
from tests.harness import FAST_SETTINGS, by_key, run_tap

STREAM = "voucherify_campaign_transactions"
UTC = dt.timezone.utc
START = dt.datetime(2024, 1, 1, tzinfo=UTC)
END = dt.datetime(2024, 3, 1, tzinfo=UTC)


def transaction_campaigns(emulator) -> list[str]:
    return emulator.campaign_ids("GIFT_VOUCHERS") + emulator.campaign_ids("LOYALTY_PROGRAM")


def expected(emulator, campaigns: list[str], start=None, end=None) -> dict:
    rows = [
        row
        for campaign in campaigns
        for row in emulator.expected_records(STREAM, partition={"campaign_id": campaign}, start=start, end=end)
    ]
    return by_key(rows, ("id",))


def transaction_exports(sandbox) -> list:
    return [
        e
        for e in sandbox.log.entries(host="voucherify-api", method="POST")
        if e.body.get("exported_object") == "voucher_transactions"
    ]


def window_after(entry) -> dt.datetime:
    """The window start an export asked for ($after is sent 1 ms early)."""
    after = entry.body["parameters"]["filters"]["created_at"]["conditions"]["$after"][0]
    return dt.datetime.fromisoformat(after.replace("Z", "+00:00")) + dt.timedelta(milliseconds=1)


# ------------------------------------------------------------------ one export for all campaigns


def test_one_export_per_window_covers_every_campaign_and_rows_keep_their_campaign_id(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    output = run_tap(emulator.tap_config(), streams={STREAM})

    assert output.error is None, output.error
    campaigns = transaction_campaigns(emulator)
    assert by_key(output.records(STREAM), ("id",)) == expected(emulator, campaigns)
    assert {r["campaign_id"] for r in output.records(STREAM)} == set(campaigns)
    exports = transaction_exports(voucherify_sandbox)
    assert len(exports) == 4, "one export per 15-day window of the two months, whatever the campaigns"
    assert all(e.path == "/v1/exports" and "campaign_id" not in e.body["parameters"]["filters"] for e in exports)
    assert not voucherify_sandbox.log.entries(host="voucherify-api", path_pattern="/campaigns/.+/transactions")
    # No campaign is listed: only the connection check reads /v1/campaigns.
    assert len(voucherify_sandbox.log.entries(host="voucherify-api", method="GET", path_pattern="^/v1/campaigns")) == 1
    state = output.final_state["bookmarks"][STREAM]
    assert state["replication_key_value"] == END.isoformat() and not state.get("partitions")


def test_campaign_ids_filter_the_one_export_to_those_campaigns(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    chosen = [emulator.campaign_ids("GIFT_VOUCHERS")[0], emulator.campaign_ids("LOYALTY_PROGRAM")[1]]
    output = run_tap({**emulator.tap_config(), "voucherify_campaign_ids": chosen}, streams={STREAM})

    assert output.error is None, output.error
    assert by_key(output.records(STREAM), ("id",)) == expected(emulator, chosen)
    exports = transaction_exports(voucherify_sandbox)
    assert len(exports) == 4
    for entry in exports:  # ExportVoucherTransactionsFilters.campaign_id: FieldConditions, list values
        assert entry.body["parameters"]["filters"]["campaign_id"] == {"conditions": {"$in": chosen}}
    assert output.final_state["bookmarks"][STREAM]["campaign_ids_covered"] == sorted(chosen)


# ---------------------------------------------------------------------------- state migration


def per_campaign_state(bookmarks: dict[str, str | None]) -> dict:
    """The state the stream wrote while it had one partition per campaign (singer-sdk partitions)."""
    partitions = []
    for campaign, value in bookmarks.items():
        partition: dict = {
            "context": {"campaign_id": campaign},
            "exports_in_flight": [
                {"export_id": f"exp_old_{campaign}", "window_start": value, "window_end": END.isoformat()}
            ],
        }
        if value is not None:
            partition |= {"replication_key": "created_at", "replication_key_value": value}
        partitions.append(partition)
    return {"bookmarks": {STREAM: {"partitions": partitions}}}


def test_per_campaign_state_is_migrated_from_the_oldest_bookmark_without_losing_a_row(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    campaigns = transaction_campaigns(emulator)
    days = (20, 35, 41, 50)
    bookmarks = {c: (START + dt.timedelta(days=d)).isoformat() for c, d in zip(campaigns, days, strict=True)}
    oldest = START + dt.timedelta(days=min(days))
    output = run_tap({**emulator.tap_config(), "export_window_days": 60}, state=per_campaign_state(bookmarks))

    assert output.error is None, output.error
    exports = transaction_exports(voucherify_sandbox)
    assert [window_after(e) for e in exports] == [oldest]
    # Every campaign's rows since the oldest bookmark: none skipped; rows before it never read again.
    assert by_key(output.records(STREAM), ("id",)) == expected(emulator, campaigns, start=oldest)
    assert "migrated" in output.log_text
    state = output.final_state["bookmarks"][STREAM]
    assert state["partitions"] == [], "emptied, not removed: Meltano merges states key by key"
    assert state["replication_key"] == "created_at" and state["replication_key_value"] == END.isoformat()
    assert state["campaign_ids_covered"] is None
    # The old per-campaign exports in flight are not resumed: a per-campaign file is not this export.
    assert not voucherify_sandbox.log.entries(host="voucherify-api", path_pattern="exp_old_")

    voucherify_sandbox.log.clear()
    again = run_tap(emulator.tap_config(), state=output.final_state, streams={STREAM})
    assert again.error is None and again.records(STREAM) == []
    assert "migrated" not in again.log_text


def test_a_campaign_with_no_bookmark_in_the_old_state_starts_the_stream_at_start_date(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    campaigns = transaction_campaigns(emulator)
    bookmarks: dict[str, str | None] = {c: "2024-02-10T00:00:00+00:00" for c in campaigns}
    bookmarks[campaigns[2]] = None  # its first run never finished a window
    output = run_tap({**emulator.tap_config(), "export_window_days": 60}, state=per_campaign_state(bookmarks))

    assert output.error is None, output.error
    assert min(window_after(e) for e in transaction_exports(voucherify_sandbox)) == START
    assert by_key(output.records(STREAM), ("id",)) == expected(emulator, campaigns)


def test_a_campaign_added_to_the_setting_later_is_read_from_start_date(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    first_campaign, added = transaction_campaigns(emulator)[:2]
    config = {**emulator.tap_config(), "export_window_days": 60}
    first = run_tap({**config, "voucherify_campaign_ids": [first_campaign]}, streams={STREAM})
    assert first.error is None and first.final_state["bookmarks"][STREAM]["replication_key_value"] == END.isoformat()

    voucherify_sandbox.log.clear()
    later = {**config, "voucherify_campaign_ids": [first_campaign, added], "end_date": "2024-03-02T00:00:00Z"}
    second = run_tap(later, state=first.final_state, streams={STREAM})

    assert second.error is None, second.error
    assert min(window_after(e) for e in transaction_exports(voucherify_sandbox)) == START
    got = by_key(second.records(STREAM), ("id",))
    assert expected(emulator, [added]).items() <= got.items(), "the added campaign's history was skipped"
    assert second.final_state["bookmarks"][STREAM]["campaign_ids_covered"] == sorted([first_campaign, added])


# ---------------------------------------------------------------------------------- polling


def test_exports_waiting_together_are_polled_through_one_listing_with_documented_parameters(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    voucherify_sandbox.ctx.export_latency_seconds = 0.5  # every export of the run is waiting at once
    output = run_tap({**emulator.tap_config(), "export_window_days": 60, "poll_interval_seconds": 0.3})

    assert output.error is None, output.error
    api = voucherify_sandbox.log.entries(host="voucherify-api")
    creates = [e for e in api if e.method == "POST"]
    listings = [e for e in api if e.method == "GET" and e.path == "/v1/exports"]
    single_polls = [e for e in api if e.method == "GET" and e.path.startswith("/v1/exports/")]
    assert len(creates) == 7 and listings, "seven exports were waiting: one listing answers for all"
    assert len(listings) + len(single_polls) < len(creates)
    for listing in listings:  # list-exports documents limit (1-100), page and order only
        assert listing.query == {"limit": "100", "page": "1", "order": "-created_at"}
    assert all(e.status == 200 for e in api)


# -------------------------------------------------------------------------------- call count


def test_a_daily_runs_api_calls_do_not_grow_with_campaigns():
    few = count_daily_run_calls(4, export_latency_seconds=0.05, poll_interval_seconds=2.0, rows_per_type=2)
    many = count_daily_run_calls(40, export_latency_seconds=0.05, poll_interval_seconds=2.0, rows_per_type=2)

    assert few.records > 0 and many.records > 0
    assert many.api_calls == few.api_calls, (few.report(), many.report())
    assert many.api_calls <= 20 and many.refused == 0, many.report()
    assert many.by_endpoint["POST /v1/exports"] + many.by_endpoint["POST /v1/orders/export"] == 7
    assert many.downloads == few.downloads == 7


# ---------------------------------------------------------------------------- metadata columns

#: Each object's metadata setting, and properties the sandbox's rows hold (plus one none holds).
METADATA_CASES = {
    "voucherify_orders": ("voucherify_order_metadata_fields", ["payment_mean", "channel", "absent"]),
    "voucherify_vouchers": ("voucherify_voucher_metadata_fields", ["source", "region", "absent"]),
    "voucherify_redemptions": ("voucherify_redemption_metadata_fields", ["locale", "store", "absent"]),
    "voucherify_publications": ("voucherify_publication_metadata_fields", ["source", "note", "absent"]),
    "voucherify_customers": ("voucherify_customer_metadata_fields", ["tier", "newsletter", "absent"]),
}


def as_metadata_cell(value):
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.parametrize("stream", list(METADATA_CASES))
def test_each_objects_metadata_properties_become_columns(voucherify_sandbox, stream):
    emulator = voucherify_sandbox.voucherify
    setting, names = METADATA_CASES[stream]
    output = run_tap({**emulator.tap_config(), setting: names}, streams={stream})

    assert output.error is None, output.error
    records = output.records(stream)
    assert records
    schema = output.schemas(stream)[-1]["properties"]
    for name in names:
        column = f"metadata_{name}"
        assert schema[column] == {"type": ["string", "null"]}
        for record in records:
            assert record.get(column) == as_metadata_cell((record["metadata"] or {}).get(name)), (column, record)
    assert any(record.get(f"metadata_{names[0]}") for record in records), "no row holds the property"
    (create,) = voucherify_sandbox.log.entries(host="voucherify-api", method="POST")[:1]
    fields = create.body["parameters"]["fields"]
    # `metadata.X` fields are documented for orders only; the others read the documented `metadata`.
    documented = stream == "voucherify_orders"
    assert ("metadata.absent" in fields) is documented and "metadata" in fields
    assert [e for e in voucherify_sandbox.log.entries(host="voucherify-api") if e.status == 400] == []


@pytest.mark.parametrize(
    ("names", "named"),
    [
        (["payment.mean"], "'payment.mean'"),
        (["payment mean"], "'payment mean'"),
        (["größe"], "'größe'"),
        (["tier", "Tier"], "'tier' and 'Tier' would both be column 'metadata_tier'"),
        (["a-b", "a_b"], "would both be column 'metadata_a_b'"),
    ],
)
@pytest.mark.parametrize("setting", [setting for setting, _ in METADATA_CASES.values()])
def test_a_metadata_name_the_tap_cannot_export_is_a_config_error_naming_setting_and_name(
    voucherify_sandbox, setting, names, named
):
    config = {**FAST_SETTINGS, **voucherify_sandbox.voucherify.tap_config(), setting: names}
    with pytest.raises(ConfigError) as error:
        TapCommerceExports(config=config, parse_env_config=False)
    assert f"setting {setting!r}" in str(error.value) and named in str(error.value)


# ----------------------------------------------------------------------- campaigns at scale


def test_a_deleted_campaign_named_in_the_setting_matches_no_row_and_fails_nothing(voucherify_sandbox):
    """The filter names campaigns; one Voucherify no longer has is a filter value no row matches
    (per-campaign exports answered 404 for it)."""
    emulator = voucherify_sandbox.voucherify
    campaigns = transaction_campaigns(emulator)
    emulator.delete_campaign(campaigns[1])
    output = run_tap({**emulator.tap_config(), "voucherify_campaign_ids": campaigns}, streams={STREAM})

    assert output.error is None, output.error
    live = [campaign for campaign in campaigns if campaign != campaigns[1]]
    assert by_key(output.records(STREAM), ("id",)) == expected(emulator, live)
    assert output.final_state["bookmarks"][STREAM]["replication_key_value"] == END.isoformat()


def test_two_hundred_campaigns_sync_in_one_export(voucherify_sandbox):
    emulator = voucherify_sandbox.voucherify
    added = emulator.add_campaigns(100, "GIFT_VOUCHERS") + emulator.add_campaigns(100, "LOYALTY_PROGRAM")
    output = run_tap({**emulator.tap_config(), "export_window_days": 60}, streams={STREAM})

    assert output.error is None, output.error
    campaigns = transaction_campaigns(emulator)
    assert set(added) <= set(campaigns)
    assert by_key(output.records(STREAM), ("id",)) == expected(emulator, campaigns)
    assert {r["campaign_id"] for r in output.records(STREAM)} == set(campaigns)
    assert len(transaction_exports(voucherify_sandbox)) == 1
    assert output.final_state["bookmarks"][STREAM]["replication_key_value"] == END.isoformat()

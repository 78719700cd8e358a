"""The connection check: seconds, one cheap call per configured source, a clear PASS or FAIL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import FAST_SETTINGS, run_tap

#: One wrong credential per source: each source's refusal must name the source once.
WRONG_CREDENTIALS = {
    "intelligems": {"intelligems_api_token": "not-the-token"},
    "nextcommerce": {"nextcommerce_api_token": "not-the-token"},
    "voucherify": {"voucherify_app_token": "not-the-token"},
}


def check(config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FAST_SETTINGS, **config}))
    return subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--check-connection", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_configured_source_passes_without_creating_an_export(full_sandbox, tmp_path):
    result = check(full_sandbox.tap_config(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0:2] for line in result.stdout.splitlines()] == [
        ["PASS", " intelligems"],
        ["PASS", " nextcommerce"],
        ["PASS", " voucherify"],
    ]
    assert not full_sandbox.log.entries(method="POST")


def test_a_wrong_token_fails_naming_the_source_without_printing_the_token(full_sandbox, tmp_path):
    config = {**full_sandbox.tap_config(), "nextcommerce_api_token": "not-the-token"}
    result = check(config, tmp_path)
    assert result.returncode == 1
    assert "FAIL: nextcommerce:" in result.stdout and "HTTP 401" in result.stdout
    assert "nextcommerce: nextcommerce:" not in result.stdout  # the source is named once
    assert "not-the-token" not in result.stdout + result.stderr


def test_a_sync_with_refused_credentials_stops_before_any_export(voucherify_sandbox):
    config = {**voucherify_sandbox.voucherify.tap_config(), "voucherify_app_token": "wrong"}
    output = run_tap(config)
    assert "refused the credentials" in str(output.error)
    assert not voucherify_sandbox.log.entries(method="POST")


def singer_test(config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FAST_SETTINGS, **config}))
    return subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--config", str(path), "--test"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_singer_test_flag_is_the_cheap_check_and_creates_no_export(full_sandbox, tmp_path):
    """`--test` (what orchestrators and `meltano config test` call) authenticates; it is not a sync."""
    result = singer_test(full_sandbox.tap_config(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert not full_sandbox.log.entries(method="POST")
    assert '"type":"RECORD"' not in result.stdout.replace(" ", "")
    for source in ("intelligems", "nextcommerce", "voucherify"):
        assert f"Connection test PASS: {source}" in result.stderr


def test_singer_test_flag_fails_when_a_source_refuses_the_credentials(full_sandbox, tmp_path):
    config = {**full_sandbox.tap_config(), "voucherify_app_token": "not-the-token"}
    result = singer_test(config, tmp_path)
    assert result.returncode == 1
    assert "Connection test FAIL: voucherify" in result.stderr and "HTTP 401" in result.stderr
    assert "not-the-token" not in result.stdout + result.stderr
    assert not full_sandbox.log.entries(method="POST")


def tap_process(config: dict, tmp_path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FAST_SETTINGS, **config}))
    return subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_each_source_named_once(output: str, sources) -> None:
    for source in sources:
        assert f"{source}: GET " in output, (source, output)  # its failure is there, named once
        assert f"{source}: {source}:" not in output, output


@pytest.mark.parametrize("mode", ["--test", "--check-connection"])
def test_every_refused_source_is_named_once_in_the_connection_checks(full_sandbox, tmp_path, mode):
    wrong = {setting: value for settings in WRONG_CREDENTIALS.values() for setting, value in settings.items()}
    result = tap_process({**full_sandbox.tap_config(), **wrong}, tmp_path, mode)
    assert result.returncode == 1, result.stdout + result.stderr
    assert_each_source_named_once(result.stdout + result.stderr, WRONG_CREDENTIALS)
    if mode == "--test":  # and once more in the closing error, each source once there too
        [closing] = [line for line in result.stderr.splitlines() if "connection test failed:" in line]
        assert_each_source_named_once(closing, WRONG_CREDENTIALS)


@pytest.mark.parametrize("source", sorted(WRONG_CREDENTIALS))
def test_a_sync_refused_by_a_source_names_it_once(full_sandbox, tmp_path, source):
    result = tap_process({**full_sandbox.tap_config(), **WRONG_CREDENTIALS[source]}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"configuration error: {source} refused the credentials: GET " in result.stderr
    assert f"{source}: {source}:" not in result.stderr
    assert not full_sandbox.log.entries(method="POST")

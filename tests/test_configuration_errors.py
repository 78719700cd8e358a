"""Configuration mistakes fail loudly, in seconds, naming the setting: nothing vanishes silently."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tap_commerce_exports.sources import SOURCES
from tests.harness import FAST_SETTINGS, catalog_selecting


def tap(config: dict, tmp_path, *args: str, fast_settings: bool = True) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**(FAST_SETTINGS if fast_settings else {}), **config}))
    return subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("mode", [("--discover",), ("--check-connection",), ()])
def test_a_typo_in_a_credentials_name_is_an_error_naming_the_missing_setting(voucherify_sandbox, tmp_path, mode):
    config = voucherify_sandbox.voucherify.tap_config()
    config["voucherify_app_tokn"] = config.pop("voucherify_app_token")
    result = tap(config, tmp_path, *mode)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "voucherify is half configured" in output and "'voucherify_app_token'" in output
    assert config["voucherify_app_tokn"] not in output  # the secret itself is never echoed
    assert not voucherify_sandbox.log.entries(method="POST")


def test_an_unknown_setting_is_named_with_the_closest_known_one(full_sandbox, tmp_path):
    result = tap({**full_sandbox.tap_config(), "export_window_dayz": 3}, tmp_path, "--discover")
    assert result.returncode == 0, result.stderr
    assert "Unknown setting 'export_window_dayz' is ignored; did you mean 'export_window_days'?" in result.stderr


@pytest.mark.parametrize("mode", [("--discover",), ()])
def test_no_source_configured_at_all_is_an_error_not_an_empty_green_run(tmp_path, mode):
    """A nightly job that lost its environment must fail, not report `0 failure(s)`."""
    result = tap({}, tmp_path, *mode)
    assert result.returncode == 2
    assert "no source is configured" in result.stderr


@pytest.mark.parametrize("mode", [("--test",), ("--check-connection",), ("--discover",), ()])
def test_an_empty_config_is_one_line_naming_every_missing_setting(tmp_path, mode):
    """`{}` is what a job that lost its whole environment passes: not a traceback, not the SDK's schema."""
    result = tap({}, tmp_path, *mode, fast_settings=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "required property" not in output and "Config validation" not in output
    [line] = [line for line in output.splitlines() if "configuration error" in line]
    assert "no source is configured" in line and "setting 'start_date' is not set" in line
    for source in SOURCES:
        assert all(setting in line for setting in source.credential_settings), (source.name, line)


@pytest.mark.parametrize("mode", [("--test",), ()])
def test_a_missing_start_date_is_named_alone_when_a_source_is_configured(tmp_path, mode):
    result = tap({"intelligems_api_token": "token"}, tmp_path, *mode, fast_settings=False)
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert "setting 'start_date' is not set" in line and "no source" not in line


def test_other_settings_keep_the_sdks_validation_without_a_traceback_in_test_mode(tmp_path):
    result = tap({"intelligems_api_token": "token", "export_window_days": "abc"}, tmp_path, "--test")
    assert result.returncode == 1
    assert "'abc' is not of type 'number'" in result.stderr and "Traceback" not in result.stderr


def test_a_selected_stream_of_a_source_not_configured_is_an_error_naming_stream_and_settings(full_sandbox, tmp_path):
    """A lost Voucherify environment must not turn a run selecting voucherify_orders into a green run
    without it."""
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps(catalog_selecting(full_sandbox.tap_config(), {"nextcommerce_orders", "voucherify_orders"}))
    )
    nextcommerce_only = full_sandbox.nextcommerce.tap_config()
    result = tap(nextcommerce_only, tmp_path, "--catalog", str(catalog))
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert "voucherify_orders is selected in the catalog but voucherify is not configured" in line
    assert "'voucherify_app_id' and 'voucherify_app_token' are not set" in line
    assert "nextcommerce_orders" not in line
    assert '"type":"RECORD"' not in result.stdout.replace(" ", "")
    assert not full_sandbox.log.entries(method="POST")


def test_streams_the_catalog_lists_but_does_not_select_are_fine(full_sandbox, tmp_path):
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(catalog_selecting(full_sandbox.tap_config(), {"voucherify_orders"})))
    result = tap(full_sandbox.voucherify.tap_config(), tmp_path, "--catalog", str(catalog))
    assert result.returncode == 0, result.stderr
    streams = {json.loads(line)["stream"] for line in result.stdout.splitlines() if '"RECORD"' in line}
    assert streams == {"voucherify_orders"}


def test_help_lists_the_check_connection_flag_and_what_test_does():
    result = subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "--check-connection" in result.stdout and "no export is created" in result.stdout


def test_about_lists_the_python_versions_ci_tests():
    import re
    from pathlib import Path

    workflow = (Path(__file__).resolve().parents[1] / ".github" / "workflows" / "test.yml").read_text()
    tested = re.search(r"python-version: \[([^\]]+)\]", workflow).group(1)
    about = subprocess.run(
        [sys.executable, "-m", "tap_commerce_exports.tap", "--about", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(about.stdout)["supported_python_versions"] == [v.strip(' "') for v in tested.split(",")]

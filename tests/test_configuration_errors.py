"""Configuration mistakes fail loudly, in seconds, naming the setting: nothing vanishes silently."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import FAST_SETTINGS


def tap(config: dict, tmp_path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FAST_SETTINGS, **config}))
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

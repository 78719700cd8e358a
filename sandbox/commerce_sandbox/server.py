"""The sandbox: all three emulated APIs, each with its separate file host, on 127.0.0.1.

Tests start it in-process on free ports (`with Sandbox() as sandbox: ...`); users start it from the
command line to try the tap without credentials:

    tap-commerce-exports-sandbox --config-out sandbox-config.json
    tap-commerce-exports --config sandbox-config.json --discover
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from commerce_sandbox.core import SandboxContext

API_NAMES = ("voucherify", "nextcommerce", "intelligems")


EMULATORS = {
    "voucherify": ("commerce_sandbox.voucherify", "VoucherifyEmulator"),
    "nextcommerce": ("commerce_sandbox.nextcommerce", "NextCommerceEmulator"),
    "intelligems": ("commerce_sandbox.intelligems", "IntelligemsEmulator"),
}


def emulator_type(name: str) -> Any:
    module, class_name = EMULATORS[name]
    return getattr(importlib.import_module(module), class_name)


#: The seed of the data and of everything the vendors leave undocumented (id formats, column order,
#: optional columns and headers): each seed is another plausible reality. Tests rotate it.
SEED_VARIABLE = "TAP_SANDBOX_SEED"
DEFAULT_SEED = 7


def default_seed() -> int:
    return int(os.environ.get(SEED_VARIABLE) or DEFAULT_SEED)


class Sandbox:
    """Starts the emulators you name (all by default) and tells the tap where they are."""

    def __init__(
        self,
        apis: tuple[str, ...] = API_NAMES,
        *,
        seed: int | None = None,
        export_latency_seconds: float = 0.2,
        rows_per_type: int | None = None,
    ) -> None:
        if seed is None:
            seed = default_seed()
        self.seed = seed
        self.ctx = SandboxContext(export_latency_seconds=export_latency_seconds)
        self.emulators = {name: emulator_type(name)(self.ctx, seed=seed, rows_per_type=rows_per_type) for name in apis}

    def __getattr__(self, name: str) -> Any:
        emulators = self.__dict__.get("emulators", {})
        if name in emulators:
            return emulators[name]
        raise AttributeError(name)

    @property
    def log(self):
        return self.ctx.log

    @property
    def faults(self):
        return self.ctx.faults

    def start(self) -> Sandbox:
        for emulator in self.emulators.values():
            for host in emulator.hosts:
                host.start()
        return self

    def stop(self) -> None:
        for emulator in self.emulators.values():
            for host in emulator.hosts:
                host.stop()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tap_config(self) -> dict[str, Any]:
        """Settings that point the tap at every running emulator."""
        config: dict[str, Any] = {}
        for emulator in self.emulators.values():
            config.update(emulator.tap_config())
        return config

    def hosts(self) -> dict[str, str]:
        return {host.name: host.base_url for emulator in self.emulators.values() for host in emulator.hosts}


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    if args.detach:
        sys.exit(_detach(argv if argv is not None else sys.argv[1:], args))
    if args.voucherify_plan:
        os.environ["TAP_SANDBOX_VOUCHERIFY_PLAN"] = args.voucherify_plan  # read by the Voucherify emulator
    sandbox = Sandbox(
        tuple(a.strip() for a in args.apis.split(",") if a.strip()),
        seed=args.seed,
        export_latency_seconds=args.latency,
        rows_per_type=args.rows,
    ).start()
    config = {
        "start_date": "2024-01-01T00:00:00Z",
        "end_date": "2024-03-01T00:00:00Z",
        "poll_interval_seconds": 1,  # whole seconds: Meltano declares it an integer
        **sandbox.tap_config(),
    }
    _write_settings(args, config)
    for name, url in sandbox.hosts().items():
        print(f"{name:24s} {url}", file=sys.stderr)
    print("sandbox running; Ctrl-C to stop", file=sys.stderr, flush=True)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the sandbox that emulates the three export APIs.")
    parser.add_argument("--apis", default=",".join(API_NAMES), help="comma-separated: " + ", ".join(API_NAMES))
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed of the synthetic data and undocumented shapes (default ${SEED_VARIABLE} or 7)",
    )
    parser.add_argument("--latency", type=float, default=1.0, help="seconds before an export is ready")
    parser.add_argument(
        "--voucherify-plan",
        choices=("business", "organization", "sandbox"),
        help="Voucherify plan whose per-minute and per-cycle limits to keep (NOTES.md; default: unmetered, "
        "or $TAP_SANDBOX_VOUCHERIFY_PLAN)",
    )
    parser.add_argument("--rows", type=int, default=None, help="rows per export type (default: small data set)")
    parser.add_argument("--config-out", help="write the tap settings for this sandbox to this JSON file")
    parser.add_argument(
        "--env-out",
        help="write the tap settings as TAP_COMMERCE_EXPORTS_<SETTING>=... lines to this file, for Meltano "
        "(set -a; . FILE; set +a)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="run in the background: return once the sandbox answers and its settings are written, "
        "printing the process id to stop it with (also written to sandbox.pid)",
    )
    return parser.parse_args(argv)


def _write_settings(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """The settings files, each written whole under a temporary name, so a reader never sees half of one."""
    if args.config_out:
        _write_whole(args.config_out, json.dumps(config, indent=2))
        print(f"tap settings written to {args.config_out}", file=sys.stderr)
    if args.env_out:
        lines = []
        for name, value in config.items():
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            lines.append(f"TAP_COMMERCE_EXPORTS_{name.upper()}={shlex.quote(text)}")
        _write_whole(args.env_out, "\n".join(lines) + "\n")
        print(f"tap settings written to {args.env_out} as environment variables", file=sys.stderr)


def _write_whole(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as out:
        out.write(text)
    os.replace(partial, path)


#: How long --detach waits for the sandbox to come up.
DETACH_TIMEOUT_SECONDS = 60.0


def _detach(argv: list[str], args: argparse.Namespace) -> int:
    """The sandbox in a process of its own; returns once it wrote its settings (it writes them once
    its hosts answer)."""
    marker = args.env_out or args.config_out or "sandbox-config.json"
    command = [sys.executable, "-m", "commerce_sandbox.server", *(a for a in argv if a != "--detach")]
    if not (args.env_out or args.config_out):
        command += ["--config-out", marker]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
    with open("sandbox.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + DETACH_TIMEOUT_SECONDS
    while not os.path.exists(marker):
        if process.poll() is not None or time.monotonic() > deadline:
            print("the sandbox did not start; see sandbox.log", file=sys.stderr)
            return 1
        time.sleep(0.1)
    _write_whole("sandbox.pid", f"{process.pid}\n")
    print(f"sandbox running in the background (pid {process.pid}, log sandbox.log); stop it with: kill {process.pid}")
    return 0


if __name__ == "__main__":
    main()

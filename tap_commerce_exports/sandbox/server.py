"""The sandbox: all three emulated APIs, each with its separate file host, on 127.0.0.1.

Tests start it in-process on free ports (`with Sandbox() as sandbox: ...`); users start it from the
command line to try the tap without credentials:

    tap-commerce-exports-sandbox --config-out sandbox-config.json
    tap-commerce-exports --config sandbox-config.json --discover
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from typing import Any

from tap_commerce_exports.sandbox.core import SandboxContext

API_NAMES = ("voucherify", "nextcommerce", "intelligems")


EMULATORS = {
    "voucherify": ("tap_commerce_exports.sandbox.voucherify", "VoucherifyEmulator"),
    "nextcommerce": ("tap_commerce_exports.sandbox.nextcommerce", "NextCommerceEmulator"),
    "intelligems": ("tap_commerce_exports.sandbox.intelligems", "IntelligemsEmulator"),
}


def _emulator_type(name: str) -> Any:
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
        self.emulators = {name: _emulator_type(name)(self.ctx, seed=seed, rows_per_type=rows_per_type) for name in apis}

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
    parser = argparse.ArgumentParser(description="Run the sandbox that emulates the three export APIs.")
    parser.add_argument("--apis", default=",".join(API_NAMES), help="comma-separated: " + ", ".join(API_NAMES))
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed of the synthetic data and undocumented shapes (default ${SEED_VARIABLE} or 7)",
    )
    parser.add_argument("--latency", type=float, default=1.0, help="seconds before an export is ready")
    parser.add_argument("--rows", type=int, default=None, help="rows per export type (default: small data set)")
    parser.add_argument("--config-out", help="write the tap settings for this sandbox to this JSON file")
    args = parser.parse_args(argv)

    sandbox = Sandbox(
        tuple(a.strip() for a in args.apis.split(",") if a.strip()),
        seed=args.seed,
        export_latency_seconds=args.latency,
        rows_per_type=args.rows,
    ).start()
    config = {
        "start_date": "2024-01-01T00:00:00Z",
        "end_date": "2024-03-01T00:00:00Z",
        "poll_interval_seconds": 0.5,
        **sandbox.tap_config(),
    }
    if args.config_out:
        with open(args.config_out, "w") as out:
            json.dump(config, out, indent=2)
        print(f"tap settings written to {args.config_out}", file=sys.stderr)
    for name, url in sandbox.hosts().items():
        print(f"{name:24s} {url}", file=sys.stderr)
    print("sandbox running; Ctrl-C to stop", file=sys.stderr)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()

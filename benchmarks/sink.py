"""The counting reader at the end of the pipe: reads a tap's stdout and counts Singer messages.

    python benchmarks/sink.py SUMMARY.json  < singer-messages

Reads stdin in chunks of up to 1 MiB as they arrive, counts RECORD, BATCH, STATE and SCHEMA
messages and notes the wall-clock time (time.time(), comparable with the tap's log timestamps) of
the first and last chunk holding a RECORD (or BATCH). Every byte is read, so the tap really writes
its output; nothing is kept. The summary is written as JSON when stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import time

CHUNK = 1 << 20
PATTERNS = {
    "RECORD": b'{"type":"RECORD"',
    "BATCH": b'{"type":"BATCH"',
    "STATE": b'{"type":"STATE"',
    "SCHEMA": b'{"type":"SCHEMA"',
}
KEEP = max(len(p) for p in PATTERNS.values()) - 1  # a match spanning two chunks is counted once


def main(summary_path: str) -> None:
    counts = dict.fromkeys(PATTERNS, 0)
    first = {"RECORD": None, "BATCH": None}
    last = {"RECORD": None, "BATCH": None}
    total = lines = 0
    tail = b""
    fd = sys.stdin.fileno()
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            break
        now = time.time()
        total += len(chunk)
        lines += chunk.count(b"\n")
        window = tail + chunk
        for name, pattern in PATTERNS.items():
            found = window.count(pattern)
            if found:
                counts[name] += found
                if name in first:
                    if first[name] is None:
                        first[name] = now
                    last[name] = now
        tail = window[-KEEP:]
    summary = {
        "bytes": total,
        "lines": lines,
        "counts": counts,
        "first": first,
        "last": last,
    }
    with open(summary_path, "w") as out:
        json.dump(summary, out)


if __name__ == "__main__":
    main(sys.argv[1])

"""The floor: csv.DictReader alone over an export file on local disk, in a fresh interpreter.

    python benchmarks/floor.py FILE.csv   ->  {"rows": N, "seconds": S}  on stdout

No casting, no Singer, no output: what the standard library needs just to turn the file into one
dict per row. Nothing a tap built on csv + dicts can beat.
"""

from __future__ import annotations

import csv
import json
import sys
import time

csv.field_size_limit(2**31 - 1)


def main(path: str) -> None:
    with open(path, encoding="utf-8-sig", newline="") as text:
        started = time.perf_counter()
        rows = 0
        for _ in csv.DictReader(text):
            rows += 1
        seconds = time.perf_counter() - started
    json.dump({"rows": rows, "seconds": seconds}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])

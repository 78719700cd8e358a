"""The garbage collector during a sync: millions of short-lived rows over a heap that stays put.

A sync allocates containers per CSV row (csv's row list), per column and per block, each alive
only until its block is written. With CPython's default thresholds the young generation is
collected every 700 allocations: about twice per 512-row block, each time finding the block still
alive, promoting it and scanning it again one generation up; every dozen of those, a full
collection walks every module, class and schema the tap has loaded. None of it frees anything
(rows hold no cycles; reference counting frees them), and on 1,000,000 rows it was 15-18% of the
parsing time.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: Young-generation threshold during a sync: about 35 blocks of rows apart, by which time nearly
#: all of them are freed, so a collection has little left to scan.
YOUNG_GENERATION_THRESHOLD = 20_000


@contextlib.contextmanager
def collector_tuned_for_rows() -> Iterator[int]:
    """Freeze what exists now (it lives until exit anyway) and collect the young generation less
    often; both are restored afterwards, since tests run many syncs in one process. Yields the
    number of objects frozen. A host program that froze objects itself keeps them as it set them."""
    thresholds = gc.get_threshold()
    freezing = gc.get_freeze_count() == 0
    try:
        if freezing:
            gc.collect()
            gc.freeze()
        gc.set_threshold(max(YOUNG_GENERATION_THRESHOLD, thresholds[0]), *thresholds[1:])
        yield gc.get_freeze_count()
    finally:
        gc.set_threshold(*thresholds)
        if freezing:
            gc.unfreeze()

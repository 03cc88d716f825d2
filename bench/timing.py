"""Wall-clock timing shared by the benches: a call repeated after a warm-up."""
from __future__ import annotations

import statistics
import time


def min_median(fn, repeat: int) -> tuple[float, float]:
    """(min, median) seconds of repeat calls of fn after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)

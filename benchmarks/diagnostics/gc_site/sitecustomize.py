"""Logs every garbage collection that takes over ``GC_LOG_MS`` (5 ms) to stderr: its generation, time,
thread, what it collected and how many objects were frozen (``duoserve_core/collector.py`` freezes
every older object for a generation's length, so a collection inside one shows a large frozen count
and a small generation 2). Loaded at interpreter start by putting this folder first on
``PYTHONPATH`` (``GC_LOG=1`` in ``benchmarks/cpu_lane_gpu.sh`` does that for its bench stages).

Why: on the H200 (2026-12-02) CPU-lane runs spread 1.11-1.28x in E2E over three runs where the same
runs with the lane off spread 1.01-1.09x, and the timeline of one held a 350 ms step in which the host
and the lane's post stood still at once, as when one thread holds the GIL for that long. A full
collection over a large heap does that; this says whether it was one (docs/cpu_lane.md).
"""

import gc
import os
import sys
import threading
import time

_LIMIT_S = float(os.environ.get("GC_LOG_MS", "5")) / 1e3
_started: dict[int, float] = {}
_T0 = time.perf_counter()


def _log(phase: str, info: dict) -> None:
    ident = threading.get_ident()
    if phase == "start":
        _started[ident] = time.perf_counter()
        return
    took = time.perf_counter() - _started.pop(ident, time.perf_counter())
    if took >= _LIMIT_S:
        print(f"gc: at {time.perf_counter() - _T0:.3f} s, generation {info['generation']} took {took * 1e3:.1f} ms on thread "
              f"{threading.current_thread().name} (collected {info['collected']}, "
              f"{len(gc.get_objects(info['generation']))} objects left in it, {gc.get_freeze_count()} frozen)", file=sys.stderr, flush=True)


gc.callbacks.append(_log)

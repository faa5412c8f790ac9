"""Python's garbage collector during a generation: what it may walk, and how long it stopped the host.

Why: a full (generation-2) collection walks every object the collector tracks, and a process that
has loaded torch, transformers and a runtime tracks hundreds of thousands (the modules, the expert
store's records, earlier runs' timelines). On the H200's host (2026-12-02, ``GC_LOG=1`` in
``benchmarks/cpu_lane_gpu.sh``) a bench process held 500-700k, each full collection took 250-500 ms on
the host thread, one came every 20-35 s, and about one run in two had one step of 420-720 ms among
110-170 ms ones, GPU-only runs as well as the CPU lane's. The one such step whose timeline was kept
shows the host stopped for 408 ms in the middle of one launch (a relayout's), as it does while the
collector runs; nothing else found in a run stops the host that long. With the freeze (the seventh
runs, ``docs/cpu_lane.md``) no run had such a step, and a full collection inside a run walked only the
objects that run made (about 87k, 12-17 ms).

``gc.freeze()`` moves every tracked object into the permanent generation, which collections skip, and
``gc.unfreeze()`` puts them back into the oldest generation; both splice a list, whatever its length.
Objects made during the generation are collected as usual, so a reference cycle made while decoding
is still freed. Serving stacks freeze once after start-up (vLLM, SGLang); a library cannot freeze for
good on its user's behalf (a cycle made between two calls would never be freed), so this freezes for
the length of a call. There is one permanent generation, so what a caller froze before cannot be told
from what this froze: the end of the outermost call unfreezes both (only the collector's time depends
on it; call ``gc.freeze()`` again after if it matters). Why not leave a caller's freeze alone and skip
freezing: on the H200 machine (torch 2.11) 375 objects were frozen from the first second on, and a freeze skipped for them
left every full collection of the bench above scanning 500-700k objects.

``CollectorMeter`` times every collection while a generation runs (``gc.callbacks``, the collector's
own hook), so a result says how long the collector held the host thread during it (``gc_pause_s``,
``gc_longest_pause_s``): a long decode step beside a long pause is the collector's, one without is not.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # generations running now (the server's engine and a notebook may overlap): the outermost freezes


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Freeze every tracked object for the block; nested and concurrent blocks freeze once."""
    global _depth
    with _lock:
        if _depth == 0:
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()


class CollectorMeter:
    """The collections that ran while the block did (in any thread: they all stop the host thread,
    holding the GIL): their count, total and longest time. Collections never overlap, so one start
    time serves."""

    def __init__(self):
        self.collections, self.seconds, self.longest_s = 0, 0.0, 0.0
        self._started: float | None = None

    def _on_collection(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            took = time.perf_counter() - self._started
            self._started = None
            self.collections += 1
            self.seconds += took
            self.longest_s = max(self.longest_s, took)

    def __enter__(self) -> CollectorMeter:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *_exc) -> None:
        gc.callbacks.remove(self._on_collection)

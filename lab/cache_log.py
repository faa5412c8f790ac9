"""Every decision of a runtime's expert cache, in order: hits, misses, prefetches, evictions, releases,
and reclaims (a released expert taken back from its still-intact slot, no copy: ``reclaim`` when a use
needs it, a hit; ``reclaim_ahead`` when a policy's plan asks for it before its use).

The runtime counts these (``GenerationResult.phases``); the notebooks also need *where* they
happened (which step, layer and expert) and how many slots were occupied after each, to draw
per-token heatmaps and the residency of the prefill window. ``CacheLog.attach(runtime)`` wraps the
methods of that one runtime's ``ExpertCache`` instance (nothing in ``duoserve_core`` changes, and
other runtimes are unaffected); ``detach`` restores them.

Times are host times (``time.perf_counter``) from ``start()``: when the decision was made. On a
CPU that is when the copy happened (copies are synchronous); on a GPU the copy itself runs later
on the copy stream, and the stream timeline has its device time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

EVENTS = ("hit", "prefetch_hit", "reclaim", "reclaim_ahead", "miss", "prefetch", "evict", "release", "wasted")
COLUMNS = ["seq", "t_ms", "phase", "step", "at_layer", "layer", "expert", "event", "resident"]


@dataclass
class _Event:
    seq: int
    t_ms: float
    phase: str
    step: int
    at_layer: int   # the layer in progress when the decision was made
    layer: int
    expert: int
    event: str
    resident: int


class CacheLog:
    """Attach to one runtime, run ``generate``, read ``to_dataframe()`` / ``peak_resident()``."""

    def __init__(self):
        self.events: list[_Event] = []
        self._t0 = time.perf_counter()
        self._runtime = None
        self._originals: dict[str, object] = {}
        self._unused_prefetch: set[tuple[int, int]] = set()
        self._in_load = False
        self._at_layer = 0

    # -- wiring ------------------------------------------------------------------------------------
    def attach(self, runtime) -> CacheLog:
        if self._runtime is not None:
            raise RuntimeError("this CacheLog is already attached")
        cache = runtime.cache
        self._runtime = runtime
        for name in ("acquire", "prefetch", "release", "_load"):
            self._originals[name] = getattr(cache, name)
        cache.acquire, cache.prefetch = self._acquire, self._prefetch
        cache.release, cache._load = self._release, self._load
        self._layer_started = runtime.policy.layer_started
        runtime.policy.layer_started = self._started
        return self

    def detach(self) -> None:
        if self._runtime is None:
            return
        cache = self._runtime.cache
        for name in self._originals:
            delattr(cache, name)  # the instance attributes go; the class's methods show through again
        del self._runtime.policy.layer_started
        self._runtime, self._originals = None, {}

    def start(self) -> None:
        """Forget earlier events and start the clock (call right before ``generate``)."""
        self.events.clear()
        self._unused_prefetch = {k for k in self._unused_prefetch if self._runtime.cache.is_resident(k)}
        self._t0 = time.perf_counter()

    # -- the wrapped methods -------------------------------------------------------------------------
    def _started(self, layer: int):
        self._at_layer = layer
        return self._layer_started(layer)

    def _record(self, key: tuple[int, int], event: str) -> None:
        timeline = self._runtime.timeline
        self.events.append(_Event(len(self.events), (time.perf_counter() - self._t0) * 1e3, timeline.phase,
                                  timeline.step, self._at_layer, key[0], key[1], event, len(self._runtime.cache.resident())))

    def _acquire(self, key):
        cache = self._runtime.cache
        hit, intact = cache.is_resident(key), cache.holds(key)
        out = self._originals["acquire"](key)
        if hit:
            self._record(key, "prefetch_hit" if key in self._unused_prefetch else "hit")
            self._unused_prefetch.discard(key)
        else:
            self._record(key, "reclaim" if intact else "miss")
        return out

    def _prefetch(self, key) -> bool:
        cache = self._runtime.cache
        intact = cache.holds(key) and not cache.is_resident(key)
        issued = self._originals["prefetch"](key)
        if issued:
            self._unused_prefetch.add(key)
            self._record(key, "prefetch")
        elif intact and cache.is_resident(key):
            self._record(key, "reclaim_ahead")
        return issued

    def _release(self, key) -> None:
        was_resident = self._runtime.cache.is_resident(key)
        self._originals["release"](key)
        if was_resident and not self._runtime.cache.is_resident(key):
            self._record(key, "evict" if self._in_load else "release")
            if key in self._unused_prefetch:  # gone without a use: the prefetch was wasted
                self._unused_prefetch.discard(key)
                self._record(key, "wasted")

    def _load(self, key) -> None:
        self._in_load = True
        try:
            self._originals["_load"](key)
        finally:
            self._in_load = False

    # -- reading -------------------------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame([e.__dict__ for e in self.events], columns=COLUMNS)

    def peak_resident(self, phase: str | None = None) -> int:
        """The most expert slots occupied at once (in ``phase``, or over the whole run)."""
        return max((e.resident for e in self.events if phase in (None, e.phase)), default=0)

    def counts(self, phase: str | None = None) -> dict[str, int]:
        out = dict.fromkeys(EVENTS, 0)
        for e in self.events:
            if phase in (None, e.phase):
                out[e.event] += 1
        return out

    def issued_ahead(self, phase: str | None = None, layers: int = 1) -> int:
        """Copies (prefetches and misses) issued while a layer at least ``layers`` earlier was in
        progress: on a GPU those can overlap that earlier layer's computation."""
        return sum(1 for e in self.events if e.event in ("prefetch", "miss") and phase in (None, e.phase)
                   and e.layer - e.at_layer >= layers)

    def residency(self, num_layers: int, phase: str | None = None) -> pd.DataFrame:
        """Slots held by each layer's experts after every event: ``[events, layers]`` plus ``t_ms``."""
        held: dict[int, set[int]] = {layer: set() for layer in range(num_layers)}
        rows = []
        for e in self.events:
            if e.event in ("miss", "prefetch", "reclaim", "reclaim_ahead"):
                held[e.layer].add(e.expert)
            elif e.event in ("evict", "release"):
                held[e.layer].discard(e.expert)
            if phase in (None, e.phase):
                rows.append({"seq": e.seq, "t_ms": e.t_ms, "step": e.step,
                             **{f"L{layer}": len(held[layer]) for layer in range(num_layers)}})
        return pd.DataFrame(rows)

"""Every decision of a runtime's (or a simulator's) expert cache, in order: hits, misses, prefetches,
evictions, releases, and reclaims (a released expert taken back from its still-intact slot, no copy:
``reclaim`` when a use needs it, a hit; ``reclaim_ahead`` when a policy's plan asks for it before its use).

The runtime counts these (``GenerationResult.phases``); the notebooks also need *where* they
happened (which step, layer and expert) and how many slots were occupied after each, to draw
per-token heatmaps and the residency of the prefill window. ``CacheLog.attach(runtime)`` subscribes
to that runtime's events (``duoserve_core.events``: ``CacheEvent`` for the decisions, ``StepEvent``
for the step and the layer in progress); ``detach`` unsubscribes. Nothing is wrapped or patched, and
the subscription survives ``Runtime.configure``.

Times are host times (``time.perf_counter``) from ``start()``: when the decision was made. On a
CPU that is when the copy happened (copies are synchronous); on a GPU the copy itself runs later
on the copy stream, and the stream timeline has its device time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from duoserve_core.events import CACHE_EVENTS, CacheEvent, StepEvent

EVENTS = CACHE_EVENTS
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
    """Attach to one runtime (or simulator), run ``generate``, read ``to_dataframe()`` / ``peak_resident()``."""

    def __init__(self):
        self.events: list[_Event] = []
        self._t0 = time.perf_counter()
        self._unsubscribe = None
        self._phase, self._step, self._at_layer = "prefill", 0, 0

    # -- wiring ------------------------------------------------------------------------------------
    def attach(self, runtime) -> CacheLog:
        if self._unsubscribe is not None:
            raise RuntimeError("this CacheLog is already attached")
        self._unsubscribe = runtime.events.subscribe(self.on_event)
        return self

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def start(self) -> None:
        """Forget earlier events and start the clock (call right before ``generate``)."""
        self.events.clear()
        self._t0 = time.perf_counter()

    def on_event(self, event) -> None:
        if isinstance(event, CacheEvent):
            layer, expert = event.key
            self.events.append(_Event(len(self.events), (time.perf_counter() - self._t0) * 1e3, self._phase,
                                      self._step, self._at_layer, layer, expert, event.kind, event.resident))
        elif isinstance(event, StepEvent):
            if event.kind == "step_started":
                self._phase, self._step = event.phase, event.step
            elif event.kind == "layer_started":
                self._at_layer = event.layer

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

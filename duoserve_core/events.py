"""What the runtime and the simulator tell their observers, and the bus that carries it.

Instrumentation subscribes; nothing wraps or patches another object's methods. The timeline
draws spans from ``SpanEvent``; ``lab.cache_log`` and the trace of every decision read
``CacheEvent``; calibration takes host marks from ``StepEvent``. The real runtime and the
simulator emit the same events in the same order, so an observer works on both.

Emitting costs a loop over the subscribers (none, most of the time): about a microsecond per
event on the host, against the ~2 ms a decode layer's host work takes today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

ExpertKey = tuple[int, int]  # (layer, expert); the one definition, re-exported by ``policy.base``

# The cache's decisions. ``hit``: needed and resident; ``prefetch_hit``: a hit on an expert a prefetch
# brought and nothing used yet; ``reclaim``: needed, released earlier with its slot intact, taken back
# without a copy; ``reclaim_ahead``: the same, asked for by a plan before its use; ``miss``: needed and
# copied on demand; ``prefetch``: copied ahead of need by a plan; ``evict``: pushed out to make room;
# ``release``: let go by a plan; ``wasted``: a prefetched expert evicted or released before any use;
# ``host``: needed and computed on the host by the CPU lane (no slot, no copy); ``shared``: needed, its
# head computed by the CPU lane and its tail copied to a buffer outside the slots (``--cpu-split``).
CacheEventKind = Literal["hit", "prefetch_hit", "reclaim", "reclaim_ahead", "miss", "prefetch", "evict", "release",
                         "wasted", "host", "shared"]
CACHE_EVENTS: tuple[str, ...] = CacheEventKind.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class CacheEvent:
    """One decision of the expert cache; ``resident`` is the number of occupied slots after it."""

    kind: CacheEventKind
    key: ExpertKey
    resident: int


# Where a request is. ``request_started``: clocks start (after the timeline's reset); ``step_started``:
# before the step's forward (``phase`` and ``step`` set); ``layer_started``: before layer l's attention;
# ``router_started``: before layer l's router; ``routed``: layer l's top-k is on the host (after the one
# device->host sync); ``layer_done``: layer l's output is queued (its experts summed, its plan applied); ``step_done``:
# after the step's token is sampled.
StepEventKind = Literal["request_started", "step_started", "layer_started", "router_started", "routed",
                        "layer_done", "step_done"]


@dataclass(frozen=True)
class StepEvent:
    kind: StepEventKind
    step: int = 0
    phase: str = "prefill"
    layer: int | None = None


@dataclass(frozen=True)
class SpanEvent:
    """A piece of work on a stream. The real executor emits ``begin`` when it queues the work and
    ``end`` after (the timeline records a CUDA event on ``cuda_stream`` at each); the simulator,
    which knows both times, emits ``whole`` with ``start_s`` and ``end_s`` on its clock."""

    edge: Literal["begin", "end", "whole"]
    stream: str                 # "compute" | "copy" | "cpu" (the host lane) | "relayout" (int4 slots)
    kind: str                   # "attention" | "router" | "expert" | "h2d"
    layer: int
    expert: int | None = None
    nbytes: int = 0
    cuda_stream: object = None  # the torch.cuda.Stream that does the work; None: the current one
    start_s: float | None = None
    end_s: float | None = None
    device: int = 0             # which of the runtime's devices (0: the first, where the dense part runs)


Event = CacheEvent | StepEvent | SpanEvent
Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous publish/subscribe: ``emit`` calls every subscriber in subscription order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns the function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self.unsubscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in self._subscribers:
            subscriber(event)

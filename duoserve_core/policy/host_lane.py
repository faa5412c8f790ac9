"""The CPU lane's decision: which of a layer's experts the host computes instead of copying.

Batch-1 decode is copy-bound: a missed Mixtral-8x7B expert costs one 1.8 ms copy over PCIe while
the host's cores idle, and the same expert in int4 computes one token on the host in about 1.5 ms
(issue 13's measurements). So with two misses in a layer, one can cross the link while the other
is computed on the host, and the layer waits for the longer of the two instead of their sum.

``HostLane.choose`` decides, per layer, from a cost model and a modeled state (never a clock, so
the runtime and the simulator make the same decisions from the same costs):

- ``copy_s``: one expert's copy; the copy stream is modeled as busy for ``queued`` copies already
  issued and not yet waited for (the prefetches queued after the previous layer's demand loads:
  at decode sizes a layer computes for far less than one copy, so they are still in flight);
- ``host_s(tokens)``: one expert on the host lane for that many tokens, at the lane's threads
  (measured: ``experts.host_lane.measure_costs`` for the runtime, the calibration file's
  ``host_lane`` curve for the simulator);
- ``device_s(tokens)``: one expert on the GPU once its copy landed.

``auto`` takes the missed experts fewest tokens first and gives each to the lane that ends the
layer sooner: the copy path ends when the last copied expert is computed; the host path when the
lane is done. The host does not wait for the lane (the compute stream does,
``experts.stream_gate``), so the next layer's attention and router are queued while either path
runs and cost neither; when the host did wait, they came after the lane (about 1.8 ms a layer on
the H200), and this rule priced that wait (docs/cpu_lane.md has the figures of both). An expert
the host computes is not copied, so it does not enter the cache: the lane trades future hits for
this layer's time, which is what a copy-bound layer wants when the cache cannot keep a layer's
experts anyway (the rule does not price the lost entry; at large budgets that is where it can
still lose: docs/cpu_lane.md).

The lane's speed is not the one measured at load throughout a run: on the H200's host the same
1-token expert took 2.2-2.7 ms in some runs and 3.6-4.5 ms in others, in stretches of seconds to
minutes (docs/cpu_lane.md, fifth runs), and at 4.5 ms a lane expert ends a layer later than a second
copy would. So ``auto`` scales ``host_s`` by ``slowdown``: the median of the lane's last ``WINDOW`` job times
over their costs (``observe``, fed by the runtime with each finished job's time; a median, so one
stall of the whole host, a garbage collection, does not move it). A lane that the slowdown left
without experts is measured no more, so after ``PROBE_LAYERS`` layers without a lane expert the
window is stale: it is cleared, and the next layer decides with the costs at load again (one job,
whose time starts a new window). In a slow stretch that costs one lane expert every ``PROBE_LAYERS``
layers; when the host is fast again the lane is back within one probe. The simulator's lane runs at
its calibrated speed (ratio 1), so its decisions are the cost model's alone; a runtime on a CPU
device never uses ``auto``, so CPU runs stay reproducible.

The forced modes exist for tests and studies: ``all`` computes every needed expert on the host
(resident ones included), ``half`` a seeded random half of them; ``off`` is the GPU-only runtime
exactly (no decision is asked for).

**A shared expert** (``split``, where the records are laid out for it: ``--cpu-split``,
``experts.formats.SplitInt4Format``): the lane computes a share ``split`` of one expert's intermediate units while
the copy path moves the rest (a ``1 - split`` copy) and the GPU computes it. ``auto`` considers it after
the choice above: where the lane got an expert, sharing the one with fewest tokens shortens the host
path by ``1 - split`` of its time and lengthens the copy path by ``1 - split`` of a copy (queued after
the layer's other copies); it is shared when the layer then ends sooner. The forced modes with a split
share the lowest-numbered expert they chose, so tests cover the path.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

HOST_LANE_MODES = ("off", "auto", "all", "half")
WINDOW = 8          # recent lane jobs whose median time over cost scales the host cost
PROBE_LAYERS = 64   # layers without a lane expert after which that window is stale (two Mixtral tokens)


@dataclass(frozen=True)
class LaneCosts:
    """What the decision weighs: one copy, and one expert on the host as a function of its tokens."""

    copy_s: float
    host_s: Callable[[int], float]
    device_s: Callable[[int], float] = lambda tokens: 0.0
    threads: int | None = None
    source: str = "measured"

    def describe(self) -> dict:
        return {"copy_ms": self.copy_s * 1e3, "host_ms": {t: self.host_s(t) * 1e3 for t in (1, 4, 16)},
                "device_ms": {t: self.device_s(t) * 1e3 for t in (1, 4, 16)},
                "threads": self.threads, "source": self.source}


@dataclass
class LaneChoice:
    """A layer's split of work: ``host``, experts the lane computes whole; ``shared``, one expert whose
    head the lane computes while its tail is copied (``None``: none)."""

    host: set[int] = field(default_factory=set)
    shared: int | None = None


class HostLane:
    """``choose`` returns the experts of a layer that the host computes; ``mode`` as the module doc;
    ``split``: the lane's share of a shared expert (0: the records cannot be shared)."""

    def __init__(self, mode: str, costs: LaneCosts | None = None, seed: int = 0, split: float = 0.0):
        if mode not in HOST_LANE_MODES:
            raise ValueError(f"unknown CPU-lane mode {mode!r}; choose one of {', '.join(HOST_LANE_MODES)}")
        if mode == "auto" and costs is None:
            raise ValueError("the auto CPU lane needs its costs (LaneCosts)")
        self.mode, self.costs, self.split = mode, costs, split
        self._random = random.Random(seed)
        self.ratios: deque[float] = deque(maxlen=WINDOW)  # recent lane jobs' time over their cost
        self.jobs_timed = 0
        self._idle_layers = 0  # layers since the lane last got an expert

    @property
    def slowdown(self) -> float:
        """How much slower the lane runs than its costs say: the median of its recent jobs (1 with none)."""
        return statistics.median(self.ratios) if self.ratios else 1.0

    def observe(self, tokens: int, seconds: float) -> None:
        """A lane job of ``tokens`` tokens took ``seconds`` (from its start to its end on the lane)."""
        expected = self.costs.host_s(tokens) if self.costs is not None else 0.0
        if expected > 0:
            self.ratios.append(seconds / expected)
            self.jobs_timed += 1

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def choose(self, needed: list[tuple[int, int]], held: Callable[[int], bool], queued: int) -> LaneChoice:
        """The lane's work of a layer: ``needed``, (expert, tokens) pairs; ``held(expert)``: usable from a
        slot without a copy; ``queued``: copies on the copy stream ahead of this layer's."""
        if self.mode == "off":
            return LaneChoice()
        if self.mode in ("all", "half"):
            picked = {e for e, _ in needed if self.mode == "all" or self._random.random() < 0.5}
            shared = min(picked) if self.split and picked else None
            return LaneChoice(picked - {shared}, shared)
        c, slowdown = self.costs, self.slowdown
        copy_done = queued * c.copy_s   # the copy stream's queue
        copy_end = 0.0                  # the GPU path's end: the last copied expert computed
        host_end = 0.0                  # the host path's end: the lane done, then the host's delayed work
        chosen: dict[int, int] = {}     # expert -> tokens
        for expert, tokens in sorted(((e, t) for e, t in needed if not held(e)), key=lambda et: et[1]):
            via_copy = max(copy_end, copy_done + c.copy_s + c.device_s(tokens))
            via_host = host_end + c.host_s(tokens) * slowdown
            if max(copy_end, via_host) < max(via_copy, host_end):
                chosen[expert] = tokens
                host_end = via_host
            else:
                copy_done += c.copy_s
                copy_end = via_copy
        self._idle_layers = 0 if chosen else self._idle_layers + 1
        if self._idle_layers >= PROBE_LAYERS:  # the window is stale: the next layer tries the costs at load
            self.ratios.clear()
            self._idle_layers = 0
        shared = None
        if self.split and chosen:
            expert, tokens = min(chosen.items(), key=lambda et: (et[1], et[0]))
            rest = 1.0 - self.split
            host_shared = host_end - rest * c.host_s(tokens) * slowdown
            copy_shared = max(copy_end, copy_done + rest * (c.copy_s + c.device_s(tokens)))
            if max(host_shared, copy_shared) < max(host_end, copy_end):
                shared = expert
                del chosen[expert]
        return LaneChoice(set(chosen), shared)

    def describe(self) -> dict:
        out: dict = {"cpu_experts": self.mode}
        if self.costs is not None:
            out["cpu_lane_costs"] = self.costs.describe()
            out["cpu_lane_slowdown"] = {"now": self.slowdown, "jobs_timed": self.jobs_timed}
        return out

"""The layer step: every scheduling decision of one MoE layer, for the runtime and the simulator alike.

Both executors drive this one object; neither has a copy of its loop. They differ only in the
``ExpertDevice`` they pass: the real one queues kernels and waits on CUDA events
(``experts.executor``), the simulated one advances clocks (``sim.simulator``). So a decision
made here is made identically in both, which ``tests/test_layer_step.py`` checks, decision by
decision, for every policy.

One decode token at layer l, in order:

1. ``layer_started(l)``: the copies are balanced over the devices' links from here on
   (``ExpertCache.begin_layer``); the policy's plan is applied (prefill: the window's next layers queue).
2. attention and the router run on the compute stream; the top-k comes to the host (the one
   device->host sync of the layer) and ``run`` starts.
3. the CPU lane, where it is on (``policy.host_lane``), takes the experts the host computes
   instead of copying (and the head of a shared one, ``--cpu-split``); their work starts at once,
   beside everything below (first: at batch 1 the lane's expert is the layer's longest path).
4. the policy hears ``router_done(l)`` (and ``speculated(l+1)``); the plans it returns are held:
   this layer's demand copies go first on the in-order copy stream.
5. the other needed experts, resident (or intact) first, are acquired while a slot can be freed:
   a hit pins the slot, a miss also queues its copy (``ExpertDevice.copy_in`` via the cache).
6. a shared expert's tail is queued behind the first demand copies, then the held plans are
   applied: prefetches queue behind them.
7. each acquired expert in turn: wait until its copy landed, compute its tokens, mark the slot
   read (no copy may overwrite it before), unpin; then acquire more if a slot came free.
8. a shared expert's tail is computed once landed; the host lane's results join the layer's output
   (``finish_host``).
9. ``layer_done(l)``: the policy's releases (prefill: the finished layer leaves the window).

No decision here reads a clock. The CPU lane's choice reads a modeled state kept the same way by
both executors (the prefetches still queued on the copy stream, counted from the cache's
decisions) and a cost model, so decisions stay reproducible on the CPU. (On a GPU the runtime's
``auto`` lane also scales its host cost by the lane's measured speed, which the executor reports
after each job: ``HostLane.observe``; the simulator's lane runs at its cost, so nothing changes there.)
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch

from ..events import EventBus, StepEvent
from ..policy.base import Phase, Plan, Policy
from ..policy.host_lane import HostLane, LaneChoice
from .cache import ExpertCache, stats_delta


class ExpertDevice(Protocol):
    """Where a layer's experts are computed: the small interface the layer step drives.

    Copies are issued by the cache through its transfer engine (``copy_in``); the step then calls,
    per expert, ``wait_ready`` (its copy has landed), ``compute`` and ``mark_read`` (the slot's last
    reader is queued). ``counts`` is how many of the layer's tokens each expert serves: the device
    needs it to lay out (or time) the work, and the step reads which experts are needed from it.
    The CPU lane: ``compute_on_host`` starts an expert on the host from its host-store record (no
    slot, no copy; ``head_only``: a shared expert's head); ``copy_tail`` queues a shared expert's tail
    into the tail buffer (``tail_bytes``) and ``compute_tail`` computes it once landed; ``finish_host``
    waits for the lane and adds its outputs to the layer's (a shared expert's head to its tail's).
    """

    counts: list[int]
    tail_bytes: int

    def wait_ready(self, slot: int) -> None: ...
    def compute(self, layer: int, expert: int, slot: int) -> None: ...
    def mark_read(self, slot: int) -> None: ...
    def compute_on_host(self, layer: int, expert: int, head_only: bool = False) -> None: ...
    def copy_tail(self, layer: int, expert: int) -> None: ...
    def compute_tail(self, layer: int, expert: int) -> None: ...
    def finish_host(self) -> None: ...


class LayerStep:
    """Carries the policy's plans out on the cache and orders each layer's expert work."""

    def __init__(self, cache: ExpertCache, policy: Policy, events: EventBus, host_lane: HostLane | None = None):
        self.cache, self.policy, self.events = cache, policy, events
        self.host_lane = host_lane if host_lane is not None and host_lane.enabled else None
        self.phase, self.step = Phase.PREFILL.value, 0
        self._prefetch_mark = 0  # the cache's prefetch count when the last layer's demand copies were queued

    def apply(self, plan: Plan) -> None:
        """Releases first, then loads in the plan's order until one finds no room: the rest of the
        plan ranks lower still."""
        for key in plan.release:
            self.cache.release(key)
        for key in plan.load:
            if not self.cache.prefetch(key) and not self.cache.is_resident(key):
                break

    def begin_step(self, step: int, phase: Phase) -> None:
        """A forward pass starts: observers hear it, then the policy's phase plan is applied."""
        self.phase, self.step = phase.value, step
        self.events.emit(StepEvent("step_started", step, phase.value))
        self.cache.begin_layer()
        self.apply(self.policy.phase(phase))

    def layer_started(self, layer: int) -> None:
        self.events.emit(StepEvent("layer_started", self.step, self.phase, layer))
        self.cache.begin_layer()
        self.apply(self.policy.layer_started(layer))

    def run(self, layer: int, topk: torch.Tensor, probs: torch.Tensor, speculation: torch.Tensor | None,
            device: ExpertDevice) -> None:
        """Steps 3-9 of the module doc for layer ``layer``; ``topk`` ``[tokens, k]`` on the host."""
        self.events.emit(StepEvent("routed", self.step, self.phase, layer))
        cache = self.cache
        needed = [(e, c) for e, c in enumerate(device.counts) if c]
        choice = LaneChoice()
        if self.host_lane is not None:
            # Before the policy's bookkeeping: the lane's expert is the layer's longest path, and its
            # choice reads nothing ``router_done`` changes (its plans are held until step 6).
            queued = cache.stats.prefetches - self._prefetch_mark
            choice = self.host_lane.choose(needed, lambda e: cache.holds((layer, e)), queued)
            for expert in sorted(choice.host):
                cache.computed_on_host((layer, expert))
                device.compute_on_host(layer, expert)
            if choice.shared is not None:
                cache.shared_with_host((layer, choice.shared), device.tail_bytes)
                device.compute_on_host(layer, choice.shared, head_only=True)
        on_host = choice.host | ({choice.shared} if choice.shared is not None else set())
        held = [self.policy.router_done(layer, topk, probs)]
        if speculation is not None and self.policy.wants_speculation:
            held.append(self.policy.speculated(layer + 1, speculation))
        pending = deque(sorted((e for e, _ in needed if e not in on_host), key=lambda e: not cache.holds((layer, e))))
        in_flight: deque[tuple[int, int]] = deque()
        while pending or in_flight:
            while pending and (cache.holds((layer, pending[0])) or cache.can_make_room()):
                expert = pending.popleft()
                slot, _ = cache.acquire((layer, expert))
                in_flight.append((expert, slot))
            if held:  # behind the layer's first demand copies: a shared expert's tail, then the prefetches
                if choice.shared is not None:
                    device.copy_tail(layer, choice.shared)
                self._prefetch_mark = cache.stats.prefetches
                for plan in held:
                    self.apply(plan)
                held = []
            expert, slot = in_flight.popleft()
            device.wait_ready(slot)
            device.compute(layer, expert, slot)
            device.mark_read(slot)
            cache.unpin((layer, expert))
        if held:  # every needed expert went to the host lane: the tail and the plans still apply
            if choice.shared is not None:
                device.copy_tail(layer, choice.shared)
            for plan in held:
                self.apply(plan)
        if choice.shared is not None:
            device.compute_tail(layer, choice.shared)
        if on_host:
            device.finish_host()
        self.apply(self.policy.layer_done(layer))


class PhaseCounts:
    """The cache's counters split by phase: a snapshot at the request's start, after its prefill, at
    its end; ``phases()`` gives the per-phase and total differences."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache
        self.snapshots = [cache.stats.as_dict()]

    def mark(self) -> None:
        self.snapshots.append(self.cache.stats.as_dict())

    def phases(self) -> dict[str, dict]:
        start, after_prefill, end = self.snapshots[0], self.snapshots[1], self.snapshots[-1]
        return {"prefill": stats_delta(start, after_prefill), "decode": stats_delta(after_prefill, end),
                "total": stats_delta(start, end)}

"""Which expert sits in which slot, what is pinned, and what every decision cost.

In one decode token's layer (``experts.layer_step``): the layer step ``acquire``s each needed expert
(a hit pins its slot; a miss evicts the policy's victim if no slot is free and has the transfer
engine copy the expert in), applies the policy's plans through ``prefetch`` and ``release``, and
``unpin``s each expert once its kernels are queued. Every decision is counted (``CacheStats``) and
announced as a ``CacheEvent``.

The cache is the bookkeeping half of the executor: it maps (layer, expert) to slots, asks
the policy which expert to evict when it needs room, never evicts a pinned expert, and counts
every hit, miss, prefetch and byte moved. The transfer engine does the moving.

A released expert's slot goes back to the free list, but its bytes stay until a copy overwrites
them. For a policy that says so (``Policy.reclaims_released``: duoserve, whose prefill window
releases every layer it finishes), the cache remembers them: a later need of that expert takes the
slot back without a copy (a *reclaim*, counted as a hit), and free slots that hold nothing are
filled before those that still hold a released expert, oldest release first. So the window keeps
at most ``depth`` layers live, as DuoServe prescribes, yet a budget larger than the window does not
send decode back to host memory for experts the prefill left intact.

Several devices (``engine.device_of_slot``): every device's slots sit in one pool, and a load
first picks the device whose link has carried the fewest copies since the layer began
(``begin_layer``; ties: the lower index), preferring devices with a free slot to eviction; then the
slot on that device as with one device (a free one, else the policy's first victim among that
device's experts). That is a count of decisions, not a clock, so the runtime and the simulator
place every copy alike, and a layer's misses and prefetches alternate between the links: two
misses of a decode layer cross two links at once. An expert stays on the device it was loaded to.
With one device every choice is the one-device cache's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..events import CacheEvent, EventBus, ExpertKey
from ..policy.base import Policy
from .transfer import TransferEngine


@dataclass
class CacheStats:
    hits: int = 0              # needed by the router and already resident (or in flight)
    misses: int = 0            # needed by the router and loaded on demand
    prefetches: int = 0        # loaded ahead of need by the policy's plan
    prefetch_hits: int = 0     # prefetched experts later needed before being evicted
    prefetch_wasted: int = 0   # prefetched experts evicted or released without being needed
    reclaims: int = 0          # released experts taken back from their still-intact slot, no copy
    host_computes: int = 0     # needed and computed on the host (the CPU lane): no slot, no copy
    shared_computes: int = 0   # needed, head on the CPU lane, tail copied outside the slots (its bytes in h2d_bytes)
    evictions: int = 0
    h2d_copies: int = 0
    h2d_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class ExpertCache:
    """Slot bookkeeping over a ``TransferEngine``; implements the policy's ``CacheView``.

    Every decision is counted in ``stats`` and announced on ``events`` as a ``CacheEvent`` (the
    order is the order of the decisions; an eviction comes before the load that needed its slot).
    """

    def __init__(self, engine: TransferEngine, policy: Policy, num_layers: int, num_experts: int,
                 events: EventBus | None = None):
        self.engine, self.policy = engine, policy
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, engine.num_slots
        self.events = events or EventBus()
        self.stats = CacheStats()
        self._slot_of: dict[ExpertKey, int] = {}
        self._table: list[int] | None = None  # slot_table's answer, until an expert enters or leaves
        self._free: list[int] = list(range(self.capacity - 1, -1, -1))
        self._pinned: set[ExpertKey] = set()
        self._last_use: dict[ExpertKey, int] = {}
        self._unused_prefetch: set[ExpertKey] = set()
        self._intact: dict[ExpertKey, int] = {}    # released, its bytes still in this free slot
        self._intact_in: dict[int, ExpertKey] = {}
        self._clock = 0
        self.device_of_slot = list(engine.device_of_slot)
        self.num_devices = max(self.device_of_slot, default=0) + 1
        self.copies_this_layer = [0] * self.num_devices  # copies issued on each device's link since begin_layer

    # -- CacheView ---------------------------------------------------------------------------
    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._slot_of

    def resident(self) -> set[ExpertKey]:
        return set(self._slot_of)

    def last_use(self, key: ExpertKey) -> int:
        return self._last_use.get(key, -1)

    # -- executor side -----------------------------------------------------------------------
    def holds(self, key: ExpertKey) -> bool:
        """Resident, or released with its slot intact: usable without a copy."""
        return key in self._slot_of or key in self._intact

    def begin_layer(self) -> None:
        """A layer starts: its copies are balanced over the links from here (see the module doc)."""
        self.copies_this_layer = [0] * self.num_devices

    def device_of(self, key: ExpertKey) -> int | None:
        """The device holding ``key`` (None if it is not resident)."""
        slot = self._slot_of.get(key)
        return None if slot is None else self.device_of_slot[slot]

    def slot_table(self) -> list[int] | None:
        """Every expert's slot, layer-major (``layer * num_experts + expert``), or None while any expert is
        not resident: what routing on the device looks slots up in (``experts.device_routing``). The same
        list object until an expert enters or leaves a slot, so a caller asking every decode step tells a
        changed table by identity, without rebuilding or comparing it; callers do not modify it."""
        if len(self._slot_of) < self.num_layers * self.num_experts:
            return None
        if self._table is None:
            self._table = [self._slot_of[(l, e)] for l in range(self.num_layers) for e in range(self.num_experts)]
        return self._table

    def can_make_room(self) -> bool:
        return bool(self._free) or len(self._pinned) < len(self._slot_of)

    def acquire(self, key: ExpertKey) -> tuple[int, bool]:
        """Pin ``key`` for the layer in progress, loading it on demand; return (slot, hit)."""
        if key in self._slot_of:
            hit, kind = True, "hit"
            if key in self._unused_prefetch:
                self._unused_prefetch.discard(key)
                self.stats.prefetch_hits += 1
                kind = "prefetch_hit"
        elif self._reclaim(key):
            hit, kind = True, "reclaim"
        else:
            hit, kind = False, "miss"
            self.stats.misses += 1
            self._load(key)
        if hit:
            self.stats.hits += 1
        self._pinned.add(key)
        self._clock += 1
        self._last_use[key] = self._clock
        self._emit(kind, key)
        return self._slot_of[key], hit

    def computed_on_host(self, key: ExpertKey) -> None:
        """The layer step gave ``key`` to the CPU lane: counted, announced, the slots untouched."""
        self.stats.host_computes += 1
        self._emit("host", key)

    def shared_with_host(self, key: ExpertKey, tail_bytes: int) -> None:
        """The layer step shares ``key`` between the CPU lane (its head) and a copy of its tail into the
        tail buffer (``--cpu-split``): counted, its tail's bytes among the copied, announced; no slot."""
        self.stats.shared_computes += 1
        self.stats.h2d_bytes += tail_bytes
        self._emit("shared", key)

    def unpin(self, key: ExpertKey) -> None:
        self._pinned.discard(key)

    def prefetch(self, key: ExpertKey) -> bool:
        """Load ``key`` ahead of need if there is room; return whether a copy was issued."""
        if key in self._slot_of:
            return False
        if self._reclaim(key):
            self._emit("reclaim_ahead", key)
            return False
        if not self.can_make_room():
            return False
        if not self._free and not self.policy.worth_replacing(self._victim(), key):
            return False
        self._load(key)
        self._clock += 1
        self._last_use[key] = self._clock  # a fresh prefetch is not the first thing to evict
        self.stats.prefetches += 1
        self._unused_prefetch.add(key)
        self._emit("prefetch", key)
        return True

    def release(self, key: ExpertKey) -> None:
        """Free ``key``'s slot unless it is pinned by the layer in progress (see the module doc)."""
        self._release(key, "release")

    def empty(self) -> None:
        """Release every unpinned expert and treat every free slot as empty: the next request starts
        cold (what a measured run assumes), released experts included."""
        for key in list(self._slot_of):
            self.release(key)
        self._intact.clear()
        self._intact_in.clear()

    def _release(self, key: ExpertKey, kind: str) -> None:
        if key not in self._slot_of or key in self._pinned:
            return
        slot = self._slot_of.pop(key)
        self._table = None
        if self.policy.reclaims_released:
            self._intact[key], self._intact_in[slot] = slot, key
            self._free.insert(0, slot)   # popped last: empty slots are filled first
        else:
            self._free.append(slot)
        self._emit(kind, key)
        if key in self._unused_prefetch:
            self._unused_prefetch.discard(key)
            self.stats.prefetch_wasted += 1
            self._emit("wasted", key)

    def _reclaim(self, key: ExpertKey) -> bool:
        slot = self._intact.pop(key, None)
        if slot is None:
            return False
        del self._intact_in[slot]
        self._free.remove(slot)
        self._slot_of[key] = slot
        self._table = None
        self.stats.reclaims += 1
        return True

    def _least_loaded(self, devices: set[int]) -> int:
        return min(devices, key=lambda d: (self.copies_this_layer[d], d))

    def _victim(self) -> ExpertKey:
        """The expert a load evicts when no slot is free: the policy's first choice among the unpinned
        experts of the least-loaded device that has one."""
        candidates = [k for k in self._slot_of if k not in self._pinned]
        if not candidates:
            raise RuntimeError("no expert slot can be freed: every slot is pinned by the layer in progress")
        if self.num_devices > 1:
            device = self._least_loaded({self.device_of_slot[self._slot_of[k]] for k in candidates})
            candidates = [k for k in candidates if self.device_of_slot[self._slot_of[k]] == device]
        return self.policy.eviction_order(candidates)[0]

    def _free_slot(self) -> int:
        """The free slot a load fills: the last of the free list (one device), or the last on the
        least-loaded device that has a free slot."""
        if self.num_devices == 1:
            return self._free.pop()
        device = self._least_loaded({self.device_of_slot[s] for s in self._free})
        i = max(i for i, s in enumerate(self._free) if self.device_of_slot[s] == device)
        return self._free.pop(i)

    def _load(self, key: ExpertKey) -> None:
        if not self._free:
            self._release(self._victim(), "evict")
            self.stats.evictions += 1
        slot = self._free_slot()
        overwritten = self._intact_in.pop(slot, None)
        if overwritten is not None:
            del self._intact[overwritten]
        self._slot_of[key] = slot
        self._table = None
        self.engine.copy_in(slot, key)
        self.copies_this_layer[self.device_of_slot[slot]] += 1
        self.stats.h2d_copies += 1
        self.stats.h2d_bytes += self.engine.store.record_bytes

    def _emit(self, kind: str, key: ExpertKey) -> None:
        self.events.emit(CacheEvent(kind, key, len(self._slot_of)))


def stats_delta(before: dict, after: dict) -> dict:
    """``after - before`` for every counter of two ``CacheStats.as_dict()`` snapshots."""
    return {k: after[k] - before[k] for k in after}

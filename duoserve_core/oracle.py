"""Belady's optimal cache: the fewest expert loads any policy could make at a given number of slots.

This is the decode bound every policy is drawn against: perfect knowledge of the future routing
(the routing actually taken in the run), eviction of the expert whose next use is farthest away,
and every copy overlapped with compute. Belady (1966) proved farthest-next-use optimal for a
cache that must hold what is being used, which is what a layer's pinned experts are.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

from .events import ExpertKey


def _indexed(groups: Sequence[Iterable[ExpertKey]], capacity: int
             ) -> tuple[list[set[ExpertKey]], dict[ExpertKey, list[int]]]:
    """The groups as sets, checked to fit ``capacity``, and each expert's uses (group indices, in order)."""
    groups = [set(g) for g in groups]
    if groups and max(len(g) for g in groups) > capacity:
        raise ValueError(f"a step needs {max(len(g) for g in groups)} experts at once but there are {capacity} slots")
    uses: dict[ExpertKey, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        for key in group:
            uses[key].append(index)
    return groups, uses


def belady_loads(groups: Sequence[Iterable[ExpertKey]], capacity: int, initial: Iterable[ExpertKey] = (),
                 count_from: int = 0) -> int:
    """Loads needed to serve ``groups`` in order with ``capacity`` slots.

    Each group is the set of experts one layer step needs at once (so it must fit: a group larger
    than the capacity is an error). ``initial`` is what the cache holds before the first group.
    Only loads from group ``count_from`` on are counted: the decode bound runs the whole request
    and counts its decode steps, so decode starts from the cache the optimum left after prefill.
    """
    groups, uses = _indexed(groups, capacity)
    pointer: dict[ExpertKey, int] = defaultdict(int)

    def next_use(key: ExpertKey) -> float:
        positions = uses.get(key, [])
        i = pointer[key]
        return positions[i] if i < len(positions) else math.inf

    cache = set(list(initial)[:capacity])
    loads = 0
    for index, group in enumerate(groups):
        for key in group:
            pointer[key] += 1  # past this use: next_use now looks beyond the current step
        for key in group - cache:
            if len(cache) >= capacity:
                cache.remove(max(cache - group, key=next_use))
            cache.add(key)
            loads += index >= count_from
    return loads


FALLBACKS = ("lru", "lfu")


def foresight_loads(groups: Sequence[Iterable[ExpertKey]], capacity: int, window: float, *, fallback: str = "lru",
                    count_from: int = 0) -> int:
    """Loads of a cache that sees only the next ``window`` groups (layer steps) of the routing: how much of
    Belady's advantage a given foresight buys. Why: a causal policy knows the next layer or two (the
    speculative gate, a predictor), Belady the whole run; this places a policy between the two, and says
    how far ahead one must see to come near the bound.

    On a miss with the cache full it evicts, among the experts the current group does not need, first
    one with no use inside the window, by ``fallback`` (``lru``: least recently used; ``lfu``: fewest
    uses so far, then least recent), else the one whose next use is farthest. ``window`` ``inf`` is
    Belady (``belady_loads``), ``0`` the fallback cache alone. Loads counted from group ``count_from``."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, not {fallback!r}")
    groups, uses = _indexed(groups, capacity)
    pointer: dict[ExpertKey, int] = defaultdict(int)
    last: dict[ExpertKey, int] = {}
    count: dict[ExpertKey, int] = defaultdict(int)
    cache: set[ExpertKey] = set()
    loads = stamp = 0
    for index, group in enumerate(groups):
        for key in group:
            pointer[key] += 1
        horizon = index + window

        def evict_first(key: ExpertKey) -> tuple:
            """Higher goes first: an expert not seen in the window (by the fallback), then the farthest."""
            positions, i = uses[key], pointer[key]
            next_use = positions[i] if i < len(positions) else math.inf
            if next_use <= horizon:
                return (0, next_use)
            return (1, -last[key]) if fallback == "lru" else (1, -count[key], -last[key])

        for key in group - cache:
            if len(cache) >= capacity:
                cache.remove(max(cache - group, key=evict_first))
            cache.add(key)
            loads += index >= count_from
        for key in sorted(group):  # each use its own stamp, in the group's order (as sim.reference's recency)
            stamp += 1
            last[key] = stamp
            count[key] += 1
    return loads


def expert_groups(timeline_rows: Iterable[dict], phase: str | None = "decode") -> list[set[ExpertKey]]:
    """A run's expert uses, one set per (step, layer), from its timeline rows (``phase=None``: all)."""
    steps: dict[tuple[int, int], set[ExpertKey]] = defaultdict(set)
    for row in timeline_rows:
        if row["kind"] == "expert" and phase in (None, row["phase"]):
            steps[(row["step"], row["layer"])].add((row["layer"], row["expert"]))
    return [steps[k] for k in sorted(steps)]

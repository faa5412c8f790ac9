"""oracle.foresight_loads: Belady with a limited view ahead, between the causal caches and the bound."""

import math
import random

import numpy as np
import pytest

from duoserve_core.oracle import belady_loads, foresight_loads
from duoserve_core.sim import reference


def _groups(seed: int, steps: int = 120, layers: int = 4, experts: int = 6, k: int = 2) -> list[set]:
    rng = random.Random(seed)
    return [{(step % layers, e) for e in rng.sample(range(experts), k)} for step in range(steps)]


def _reference_loads(groups: list[set], policy: str, capacity: int, experts: int = 6) -> int:
    """sim.reference's stack-algorithm loads of the same uses (each group's keys in sorted order)."""
    keys, starts = [], []
    for g in groups:
        starts.append(len(keys))
        keys += [layer * experts + e for layer, e in sorted(g)]
    starts.append(len(keys))
    depths = reference.stack_depths(np.array(keys), np.array(starts), policy, 4 * experts)
    return int(reference.loads_by_capacity(depths, np.ones(len(keys), dtype=bool), 4 * experts)[capacity])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("capacity", [2, 3, 5, 9])
def test_no_foresight_is_the_causal_cache_and_full_foresight_is_belady(seed, capacity):
    groups = _groups(seed)
    assert foresight_loads(groups, capacity, math.inf) == belady_loads(groups, capacity)
    for fallback in ("lru", "lfu"):
        assert foresight_loads(groups, capacity, 0, fallback=fallback) == _reference_loads(groups, fallback, capacity)
    seen = [foresight_loads(groups, capacity, w) for w in (0, 4, 40, math.inf)]
    assert seen[-1] <= min(seen)  # nothing beats the whole future


def test_counting_from_a_group_and_bad_arguments():
    groups = _groups(0)
    assert foresight_loads(groups, 3, 2, count_from=60) < foresight_loads(groups, 3, 2)
    with pytest.raises(ValueError, match="fallback must be one of"):
        foresight_loads(groups, 3, 2, fallback="fifo")
    with pytest.raises(ValueError, match="needs 2 experts at once but there are 1 slots"):
        foresight_loads(groups, 1, 2)

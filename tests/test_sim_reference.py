"""The reference caches at every budget: Belady is the oracle's count, LRU an LRU's, and Belady never loses."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from duoserve_core.oracle import belady_loads
from duoserve_core.sim import build_model, load_calibration
from duoserve_core.sim.reference import (Workload, loads_by_capacity, per_layer_lru_loads, stack_depths, sweep,
                                         table, workload)
from duoserve_core.traces import RoutingReplay, read_trace
from test_sim import fake_calibration, hand_trace, model_config


def _arrays(groups: list[list[int]]):
    keys = np.array([k for g in groups for k in g], dtype=np.int64)
    starts = np.cumsum([0] + [len(g) for g in groups])
    return keys, starts


def _lru(groups: list[list[int]], capacity: int) -> int:
    """An LRU cache that pins the step in progress, as the executor does (resident members first)."""
    cache, loads = OrderedDict(), 0
    for group in groups:
        for key in group:
            if key in cache:
                cache.move_to_end(key)
        for key in group:
            if key not in cache:
                if len(cache) >= capacity:
                    del cache[next(k for k in cache if k not in group)]
                cache[key] = True
                loads += 1
            cache.move_to_end(key)
    return loads


def test_belady_is_beaten_by_no_one_on_the_cyclic_sequence():
    # 0 1 2 3 0 1 2 3 with 3 slots: LRU always evicts what comes next (8 loads); Belady evicts the
    # farthest next use and loads 5 (by hand: 0 1 2 3(evict 2) 0 1 2(evict any) 3).
    groups = [[k] for k in [0, 1, 2, 3] * 2]
    keys, starts = _arrays(groups)
    every = np.ones(len(keys), bool)
    assert loads_by_capacity(stack_depths(keys, starts, "belady", 4), every, 4)[3] == 5
    assert loads_by_capacity(stack_depths(keys, starts, "lru", 4), every, 4)[3] == 8
    assert belady_loads(groups, 3) == 5


@pytest.mark.parametrize("seed", range(12))
def test_one_pass_equals_the_reference_at_every_capacity(seed):
    rng = random.Random(seed)
    n = rng.choice([6, 10, 16])
    groups = [sorted(rng.sample(range(n), rng.choice([1, 2, 3]))) for _ in range(rng.randint(10, 60))]
    keys, starts = _arrays(groups)
    every = np.ones(len(keys), bool)
    belady = loads_by_capacity(stack_depths(keys, starts, "belady", n), every, n)
    lru = loads_by_capacity(stack_depths(keys, starts, "lru", n), every, n)
    lfu = loads_by_capacity(stack_depths(keys, starts, "lfu", n), every, n)
    for capacity in range(3, n + 1):
        assert belady[capacity] == belady_loads(groups, capacity)
        assert lru[capacity] == _lru(groups, capacity)
        assert belady[capacity] <= min(lru[capacity], lfu[capacity])
    assert belady[n] == lru[n] == lfu[n] == len(set(keys.tolist()))  # everything fits: first uses only


def test_per_layer_lru_splits_the_slots_evenly():
    # two layers of two experts; layer 0 alternates 0,1 and layer 1 always uses 0 (keys 2 = layer 1's 0)
    groups = [[0], [2], [1], [2], [0], [2], [1], [2]]
    keys, starts = _arrays(groups)
    w = Workload(keys, starts, np.ones(len(keys), bool), num_layers=2, num_experts=2, decode_tokens=4, contexts=[])
    loads = per_layer_lru_loads(w)
    assert loads[2] == 4 + 1  # one slot each: layer 0 reloads every time, layer 1 once
    assert loads[3] == 2 + 1  # layer 0 gets the extra slot: both its experts stay
    assert loads[4] == 3


def test_sweep_on_a_trace_with_every_budget(tmp_path):
    rng = random.Random(3)
    token = lambda: [sorted(rng.sample(range(32), 8)) for _ in range(2)]  # noqa: E731
    trace = hand_trace(tmp_path / "t.parquet", [{"prefill": [token() for _ in range(4)],
                                                "decode": [token() for _ in range(10)]}], 2, 32, 8)
    model = build_model(model_config(tmp_path / "m", 2, 32, 8), quant="nf4", memory_budget="all", max_context=64)
    replay = RoutingReplay(read_trace(trace), 2, 32, 8)
    w = workload(replay, [(0, 4, 11)], 2, 32)
    assert int(w.counted.sum()) == 10 * 2 * 8 and w.decode_tokens == 10
    loads = sweep(w)
    cal = load_calibration(fake_calibration(tmp_path / "cal.json", 32, 8))
    rows = table(w, model, cal, loads)
    assert {r["policy"] for r in rows} == {"belady", "lru", "per-layer-lru", "lfu"}
    assert len(rows) == 4 * (64 - 8 + 1)
    by = {(r["policy"], r["slots"]): r for r in rows}
    for slots in range(8, 65):
        assert by[("belady", slots)]["decode_loads"] <= by[("lru", slots)]["decode_loads"]
        assert by[("belady", slots)]["tpot_overlapped_s"] <= by[("belady", slots)]["tpot_serial_s"]
    assert by[("lru", 64)]["hit_rate"] == by[("belady", 64)]["hit_rate"]
    hits = [by[("belady", s)]["hit_rate"] for s in range(8, 65)]
    assert hits == sorted(hits)  # more slots never hurt the optimum

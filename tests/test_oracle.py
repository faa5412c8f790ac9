"""Belady's bound on hand-made sequences, and on a real run it never loses to the policies."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest

import duoserve_core
from duoserve_core.oracle import belady_loads, expert_groups


def lru_loads(groups, capacity):
    cache, loads = OrderedDict(), 0
    for group in groups:
        for key in group:
            if key in cache:
                cache.move_to_end(key)
                continue
            if len(cache) >= capacity:
                victim = next(k for k in cache if k not in group)
                del cache[victim]
            cache[key] = True
            loads += 1
    return loads


def test_cache_that_fits_everything_loads_each_expert_once():
    groups = [{(0, 1), (0, 2)}, {(1, 0)}, {(0, 1)}, {(1, 0), (1, 3)}] * 5
    assert belady_loads(groups, capacity=4) == 4


def test_belady_beats_lru_on_a_cyclic_sequence():
    groups = [{(0, e)} for e in [0, 1, 2] * 10]
    assert lru_loads(groups, 2) == 30  # LRU evicts exactly the expert needed next, every time
    assert belady_loads(groups, 2) == 16


def test_group_larger_than_the_cache_is_refused():
    with pytest.raises(ValueError, match="needs 3 experts at once but there are 2 slots"):
        belady_loads([{(0, 0), (0, 1), (0, 2)}], 2)


def test_no_policy_beats_the_oracle_on_a_real_run():
    model = Path(__file__).resolve().parents[1] / "data" / "small-moe"
    predictor = model.parent / "predictors" / "small-moe-depth2.safetensors"
    probe = duoserve_core.load(model, device="cpu", quant="nf4", max_context=128)
    budget = probe.plan.fixed_bytes + 12 * probe.format.nbytes
    for kw in (dict(policy="on-demand"), dict(policy="lru-speculative"),
               dict(policy="duoserve", predictor=predictor, speculative_gate=True)):
        rt = duoserve_core.load(model, device="cpu", quant="nf4", memory_budget=budget, max_context=128, **kw)
        r = rt.generate("The following functions are available", max_new_tokens=24, stop_at_eos=False)
        # both start from an empty cache, so no policy can load less than Belady over the whole run
        oracle = belady_loads(expert_groups(rt.timeline.rows(), phase=None), rt.plan.num_slots)
        assert 0 < oracle <= r.h2d_copies
        assert belady_loads(expert_groups(rt.timeline.rows()), rt.plan.num_slots) < oracle  # decode alone

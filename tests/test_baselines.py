"""The plain-cache baselines: ``lru`` is exactly the stack algorithm ``sim.reference`` sweeps, and the
per-layer LRU keeps about an equal share of the slots per layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from duoserve_core.sim import build_model, load_calibration, reference, simulate
from duoserve_core.traces import RoutingReplay, read_trace
from test_sim import fake_calibration

DATA = Path(__file__).resolve().parents[1] / "data"
TRACE = DATA / "traces" / "small-moe-heldout.parquet"
SHAPE = dict(hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    cal = load_calibration(fake_calibration(tmp_path_factory.mktemp("cal") / "cal.json", 8, 2, shape=SHAPE))
    return cal, RoutingReplay(read_trace(TRACE), 8, 8, 2)


@pytest.mark.parametrize("request_id, prompt, gen", [(0, 24, 20), (3, 40, 30)])
def test_lru_policy_is_the_reference_lru_at_every_budget(setting, request_id, prompt, gen):
    cal, replay = setting
    loads = reference.sweep(reference.workload(replay, [(request_id, prompt, gen)], 8, 8), ("lru",))["lru"]
    seen = set()
    for slots in (2, 5, 8, 12, 16, 24, 40, 64):
        model = build_model(DATA / "small-moe", quant="nf4", memory_budget=f"{slots}slots", max_context=96,
                            device_type="cpu")
        r = simulate(model, cal, replay, "lru", prompt, gen, request_id=request_id, warmup=0, policy_time=False)
        assert r["phases"]["decode"]["h2d_copies"] == loads[slots], slots
        seen.add(int(loads[slots]))
    assert len(seen) >= 3  # the budgets span thrashing to nearly everything cached


def test_per_layer_lru_spreads_the_slots_over_layers(setting):
    cal, replay = setting
    model = build_model(DATA / "small-moe", quant="nf4", memory_budget="16slots", max_context=96, device_type="cpu")
    from duoserve_core.sim import Simulator

    sim = Simulator(model, cal, replay, "per-layer-lru", policy_time=False)
    sim.generate(24, 20)
    held = [sum(1 for layer, _ in sim.cache.resident() if layer == l) for l in range(8)]
    assert sum(held) == 16 and max(held) - min(held) <= 1

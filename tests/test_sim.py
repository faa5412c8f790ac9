"""The simulator on hand-made traces and a hand-made calibration, where the answers are known by hand;
and against the real runtime on the CPU, where the decisions must be the same."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

import duoserve_core
from duoserve_core.bench import make_prompt
from duoserve_core.errors import BudgetError
from duoserve_core.sim import Simulator, build_model, simulate
from duoserve_core.sim.calibration import FORMAT, CalibrationError, load_calibration
from duoserve_core.timeline import COLUMNS
from duoserve_core.traces import RoutingReplay, TraceError, TraceMeta, read_trace, write_trace

DATA = Path(__file__).resolve().parents[1] / "data"
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
MS = 1e-3


# -- helpers, shared by the other test_sim* files ----------------------------------------------
def model_config(path: Path, num_layers: int, num_experts: int, top_k: int) -> Path:
    """A config.json of a small Mixtral with this routing shape."""
    config = {"model_type": "mixtral", **SHAPE, "num_hidden_layers": num_layers, "num_local_experts": num_experts,
              "num_experts_per_tok": top_k, "vocab_size": 96, "max_position_embeddings": 256, "dtype": "bfloat16"}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def fake_calibration(path: Path, num_experts: int, top_k: int, *, copy_s=1 * MS, expert_s=0.1 * MS,
                     attention_s=0.05 * MS, router_s=0.01 * MS, synchronous=False, attention_quant="none",
                     shape: dict | None = None, host_lane_s: float | None = None, relayout_s: float = 0.0,
                     relayout_by_phase_s: dict | None = None) -> Path:
    """A calibration with constant times (copy, expert, attention, router) and no host cost; with
    ``host_lane_s``, a CPU lane taking that long per expert at 4 threads (the default); with
    ``relayout_s``, each landed record relaid that long before it is read (int4 on CUDA), and with
    ``relayout_by_phase_s`` ({phase: s}) that long in that phase."""
    def const(y):
        return [[1, y], [2**40, y]]

    phased = lambda y: {"prefill": const(y), "decode": const(y)}  # noqa: E731
    zero = {"prefill": 0.0, "decode": 0.0}
    raw = {"format": FORMAT, "device": "hand-made", "device_type": "cuda", "synchronous": synchronous,
           "model": {"name": "hand", **(shape or SHAPE), "num_local_experts": num_experts, "num_experts_per_tok": top_k,
                     "dtype": "bfloat16"},
           "quant": "nf4", "attention_quant": attention_quant, "expert_bytes": {"nf4": 1},
           "h2d": {"pinned": const(copy_s), "pageable": const(copy_s)},
           "expert_compute": {"nf4": const(expert_s), "bf16": const(expert_s)},
           "attention": phased(attention_s), "attention_launch": phased(0.0), "router": phased(router_s),
           "host": {"layer_base_s": {"resident": 0.0, "offloaded": 0.0}, "per_expert_s": 0.0, "per_copy_s": 0.0,
                    "step_pre_s": zero, "step_post_s": zero}}
    if relayout_s:
        raw["h2d"]["relayout_s"] = relayout_s
    if relayout_by_phase_s:
        raw["h2d"]["relayout_by_phase_s"] = relayout_by_phase_s
    if host_lane_s is not None:
        raw["host_lane"] = {"default_threads": 4, "expert": {"nf4": {"4": const(host_lane_s)}}}
    path.write_text(json.dumps(raw))
    return path


def hand_trace(path: Path, requests: list[dict], num_layers: int, num_experts: int, top_k: int) -> Path:
    """``requests``: [{"prefill": [[experts of layer 0], ...] per token, "decode": [...]}]."""
    rows = []
    for request_id, request in enumerate(requests):
        position = 0
        for phase in ("prefill", "decode"):
            for token in request[phase]:
                for layer, experts in enumerate(token):
                    rows.append({"request_id": request_id, "token_index": position, "phase": phase, "layer": layer,
                                 "experts": list(experts), "weights": [1.0 / top_k] * top_k})
                position += 1
    write_trace(path, pd.DataFrame(rows), TraceMeta("hand", num_layers, num_experts, top_k))
    return path


def setup(tmp_path: Path, requests: list[dict], L: int, E: int, k: int, budget: str = "all", **cal):
    model = build_model(model_config(tmp_path / "model", L, E, k), quant="nf4", memory_budget=budget,
                        max_context=64)
    calibration = load_calibration(fake_calibration(tmp_path / "cal.json", E, k, **cal))
    replay = RoutingReplay(read_trace(hand_trace(tmp_path / "t.parquet", requests, L, E, k)), L, E, k)
    return model, calibration, replay


# -- timing by hand ----------------------------------------------------------------------------
def test_on_demand_timing_by_hand(tmp_path):
    # One layer, top-1: each step is attention 0.05 + router 0.01, then the copy (1 ms, it can only
    # start once the router says which expert), then the expert (0.1): 1.16 ms per token.
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]], [[0]], [[1]]]}], 1, 2, 1)
    sim = Simulator(model, cal, replay, "on-demand", policy_time=False)
    run = sim.generate(1, 4)
    assert run.ttft_s == pytest.approx(1.16 * MS) and run.tpot_s == pytest.approx(1.16 * MS)
    assert run.e2e_s == pytest.approx(4 * 1.16 * MS)
    df = pd.DataFrame(run.rows, columns=COLUMNS)
    copy = df[(df.kind == "h2d") & (df.step == 0)].iloc[0]
    assert copy.start_ms == pytest.approx(0.06) and copy.end_ms == pytest.approx(1.06)


def test_prefill_prefetch_overlaps_copies_with_attention(tmp_path):
    # Two layers, two experts each used by the 2-token prompt, copies of 1 ms, experts of 0.1 ms.
    # on-demand: the copies of a layer start after its router: 2 x (0.06 + 2 + 0.1) + ... = 4.32 ms.
    # duoserve, depth 1: layer l's copies are queued when layer l starts, under its attention:
    # the copy stream never idles (4 ms) and the last expert ends at 4.1 ms.
    prompt = [[[0], [0]], [[1], [1]]]
    model, cal, replay = setup(tmp_path, [{"prefill": prompt, "decode": []}], 2, 2, 1)
    ttft = {p: Simulator(model, cal, replay, p, prefetch_depth=1, policy_time=False).generate(2, 1).ttft_s
            for p in ("on-demand", "duoserve")}
    assert ttft["on-demand"] == pytest.approx(4.32 * MS)
    assert ttft["duoserve"] == pytest.approx(4.1 * MS)


def test_synchronous_device_serialises_copies_and_compute(tmp_path):
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0], [0]], [[1], [1]]], "decode": []}], 2, 2, 1,
                               synchronous=True)
    run = Simulator(model, cal, replay, "duoserve", prefetch_depth=1, policy_time=False).generate(2, 1)
    # nothing overlaps: 4 copies + 4 experts + 2 x (attention + router)
    assert run.ttft_s == pytest.approx((4 * 1 + 4 * 0.1 + 2 * 0.06) * MS)


# -- decisions ---------------------------------------------------------------------------------
def test_cache_that_fits_everything_hits_after_warm_up(tmp_path):
    rng = random.Random(0)
    tokens = [[sorted(rng.sample(range(4), 2)) for _ in range(2)] for _ in range(12)]
    model, cal, replay = setup(tmp_path, [{"prefill": tokens[:4], "decode": tokens[4:]}], 2, 4, 2)
    assert model.plan.num_slots == 8
    in_prefill = {(l, e) for t in tokens[:4] for l, es in enumerate(t) for e in es}
    in_decode = {(l, e) for t in tokens[4:] for l, es in enumerate(t) for e in es}
    # duoserve's prefill window loads every expert of each layer and releases the layer when done; the
    # slots stay intact (8 slots hold all 8 experts), so decode takes every one back without a copy
    cold = {"lru-speculative": len(in_decode - in_prefill), "uniform": len(in_decode - in_prefill), "duoserve": 0}
    for policy in ("lru-speculative", "duoserve", "uniform"):
        # the bench's run (cache emptied first): only an expert's first use in decode misses
        r = simulate(model, cal, replay, policy, 4, 9, warmup=1, policy_time=False)
        decode = r["phases"]["decode"]
        assert decode["misses"] == cold[policy] and decode["hits"] == 8 * 2 * 2 - cold[policy], policy
        # a serving process keeps its cache: the second request never misses
        sim = Simulator(model, cal, replay, policy, policy_time=False)
        sim.generate(4, 9)
        second = sim.generate(4, 9).phases["total"]
        assert second["misses"] == 0
        assert (second["reclaims"] > 0) == (policy == "duoserve")
    resident = simulate(model, cal, replay, "resident", 4, 9, warmup=1, policy_time=False)
    assert resident["expert_misses"] == 0 and resident["h2d_copies"] == 0 and resident["hit_rate"] == 1.0


def test_32_experts_top_8(tmp_path):
    rng = random.Random(1)
    token = lambda: [sorted(rng.sample(range(32), 8)) for _ in range(3)]  # noqa: E731
    model, cal, replay = setup(tmp_path, [{"prefill": [token() for _ in range(5)], "decode": [token() for _ in range(6)]}],
                               3, 32, 8, budget="20slots")
    assert model.plan.num_slots == 20
    for policy in ("duoserve", "lru-speculative", "on-demand", "uniform"):
        r = simulate(model, cal, replay, policy, 5, 7, warmup=0, policy_time=False)
        assert r["phases"]["decode"]["hits"] + r["phases"]["decode"]["misses"] == 6 * 3 * 8
        assert r["peak_expert_bytes"] <= model.plan.slot_bytes
        assert r["bounds"]["oracle_total_loads"] <= r["phases"]["prefill"]["h2d_copies"] + r["phases"]["decode"]["h2d_copies"]


def test_no_expert_is_computed_before_its_copy_landed(tmp_path):
    rng = random.Random(2)
    token = lambda: [sorted(rng.sample(range(8), 2)) for _ in range(4)]  # noqa: E731
    model, cal, replay = setup(tmp_path, [{"prefill": [token() for _ in range(6)], "decode": [token() for _ in range(20)]}],
                               4, 8, 2, budget="6slots")
    for policy in ("duoserve", "uniform", "lru-speculative"):
        rows = simulate(model, cal, replay, policy, 6, 21, warmup=0, policy_time=False)["timeline"]
        copies: dict[tuple[int, int], list[dict]] = {}
        for r in rows:
            if r["kind"] == "h2d":
                copies.setdefault((r["layer"], r["expert"]), []).append(r)
        for r in rows:
            if r["kind"] == "expert":
                landed = [c for c in copies[(r["layer"], r["expert"])] if c["start_ms"] <= r["start_ms"]]
                assert landed and landed[-1]["end_ms"] <= r["start_ms"] + 1e-9
        starts = sorted((r["start_ms"], r["end_ms"]) for r in rows if r["stream"] == "copy")
        assert all(b[0] >= a[1] - 1e-9 for a, b in zip(starts, starts[1:]))  # one copy at a time


def test_timeline_has_the_runtime_columns_and_chrome_trace(tmp_path):
    from duoserve_core.sim import SimTimeline

    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]]]}], 1, 2, 1)
    run = Simulator(model, cal, replay, "on-demand", policy_time=False).generate(1, 2)
    timeline = SimTimeline.from_rows(run.rows)
    assert list(timeline.to_dataframe().columns) == COLUMNS
    timeline.write_chrome_trace(tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert {e["name"] for e in events if e["ph"] == "X"} >= {"h2d L0E0", "expert L0E1", "attention L0", "router L0"}


# -- errors ------------------------------------------------------------------------------------
def test_clear_errors(tmp_path):
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]]]}], 1, 2, 1)
    with pytest.raises(TraceError, match="experts"):  # a trace of another routing shape
        RoutingReplay(read_trace(tmp_path / "t.parquet"), 1, 8, 2)
    with pytest.raises(BudgetError, match="too small"):
        build_model(tmp_path / "model", quant="nf4", memory_budget="1KiB", max_context=64)
    with pytest.raises(CalibrationError, match="num_local_experts"):
        Simulator(build_model(model_config(tmp_path / "m8", 1, 8, 2), quant="nf4", max_context=64), cal,
                  RoutingReplay(read_trace(tmp_path / "t.parquet"), 1, 2, 1))
    with pytest.raises(CalibrationError, match="quant-attention"):
        Simulator(build_model(tmp_path / "model", quant="nf4", attention_quant="nf4", max_context=64), cal, replay)


# -- against the real runtime ------------------------------------------------------------------
def test_simulator_takes_the_real_runtimes_decisions(tmp_path):
    """Same trace, same budget, same policy: the simulated cache makes exactly the real one's moves."""
    trace = DATA / "traces" / "small-moe-heldout.parquet"
    rt = duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", memory_budget="15.5MiB", max_context=30,
                            routing_trace=trace, policy="on-demand")
    model = build_model(DATA / "small-moe", quant="nf4", memory_budget="15.5MiB", max_context=30, device_type="cpu")
    assert model.plan.num_slots == rt.plan.num_slots and model.plan.fixed_bytes == rt.plan.fixed_bytes
    cal = load_calibration(fake_calibration(tmp_path / "cal.json", 8, 2, shape=dict(
        hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)))
    replay = RoutingReplay(read_trace(trace), 8, 8, 2)
    prompt = [t % rt.config.vocab_size for t in make_prompt(24)]
    for policy in ("on-demand", "lru-speculative"):
        rt.configure(policy=policy)
        for _ in range(2):  # the bench's habit: a warm-up, the cache emptied before each run
            for key in list(rt.cache.resident()):
                rt.cache.release(key)
            real = rt.generate(prompt_ids=prompt, max_new_tokens=6, stop_at_eos=False)
        sim = simulate(model, cal, replay, policy, 24, 6, warmup=1, policy_time=False)
        assert sim["phases"] == real.phases, policy
        assert sim["h2d_bytes"] == real.h2d_bytes

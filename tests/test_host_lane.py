"""The CPU lane (issue 13): experts computed on the host from their host-store records, beside the GPU.

What must hold everywhere: the lane never changes the tokens (every, none, a random half of the
experts on it), the runtime and the simulator make the same decisions with it, and ``auto``
gives the host exactly the experts that finish sooner there than behind the copies.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

import duoserve_core
from duoserve_core.errors import KnobError
from duoserve_core.policy import PolicyKnobs
from duoserve_core.policy.host_lane import PROBE_LAYERS, WINDOW, HostLane, LaneCosts
from duoserve_core.sim import Simulator, build_model, load_calibration
from duoserve_core.sim.calibration import CalibrationError
from duoserve_core.timeline import COLUMNS
from duoserve_core.traces import RoutingReplay, read_trace
from test_layer_step import CONTEXT, DATA, GEN, PROMPT, TRACE, decisions
from test_sim import MS, fake_calibration, setup

PREDICTOR = str(DATA / "predictors" / "small-moe-depth2.safetensors")


# -- the decision ------------------------------------------------------------------------------
def _lane(copy_ms: float, host_ms_per_token: float) -> HostLane:
    return HostLane("auto", LaneCosts(copy_ms * MS, lambda t: host_ms_per_token * t * MS))


def test_auto_gives_the_host_what_finishes_sooner_there():
    # Two misses of one token: the host (1.5 ms) beats the copy (1.8 ms) for the first; the second
    # would finish at 3.0 ms on the host and 1.8 ms behind no copy: it is copied.
    lane = _lane(1.8, 1.5)
    assert lane.choose([(2, 1), (5, 1)], held=lambda e: False, queued=0).host == {2}
    # Resident experts are never taken: they cost no copy.
    assert lane.choose([(2, 1), (5, 1)], held=lambda e: e == 2, queued=0).host == {5}
    # Two prefetches still on the copy stream: the demand copies would wait 3.6 ms, so the host takes both.
    assert lane.choose([(2, 1), (5, 1)], held=lambda e: False, queued=2).host == {2, 5}
    # A many-token expert is slow on the host: copied.
    assert lane.choose([(3, 16)], held=lambda e: False, queued=0).host == set()


def test_auto_counts_the_gpus_compute():
    # A copy (1.0 ms) beats the host (1.2 ms) while the GPU computes the copied expert at once...
    lane = HostLane("auto", LaneCosts(1.0 * MS, lambda t: 1.2 * t * MS))
    assert lane.choose([(2, 1)], held=lambda e: False, queued=0).host == set()
    # ...but not once the copied expert still takes 0.5 ms on the GPU (1.5 ms against 1.2).
    lane = HostLane("auto", LaneCosts(1.0 * MS, lambda t: 1.2 * t * MS, lambda t: 0.5 * MS))
    assert lane.choose([(2, 1)], held=lambda e: False, queued=0).host == {2}
    # The host's experts run one after another: the second would end at 2.4 ms, the copy path at 1.5.
    assert lane.choose([(2, 1), (5, 1)], held=lambda e: False, queued=0).host == {2}


def test_auto_takes_the_cheapest_experts_first():
    lane = _lane(1.8, 1.0)
    # 1 token (1 ms) goes to the host first; 3 tokens (3 ms more) would end at 4 ms: copied.
    assert lane.choose([(0, 3), (1, 1)], held=lambda e: False, queued=0).host == {1}


def test_auto_follows_the_lanes_measured_speed():
    """The H200's host ran the lane's expert at 2.2-2.7 ms in some stretches and 3.6-4.5 ms in others:
    once the lane's jobs take twice their cost, a layer's second miss ends sooner behind a copy, so the
    lane gets nothing; after ``PROBE_LAYERS`` layers without a lane expert it is tried again at the
    costs at load, and a fast job puts it back."""
    lane = _lane(1.0, 1.2)  # two misses: one copied (1.0 ms), the other on the host (1.2) beats two copies (2.0)
    misses, nothing_held = [(2, 1), (5, 1)], lambda e: False
    assert lane.choose(misses, nothing_held, queued=0).host == {5}
    for _ in range(WINDOW):
        lane.observe(1, 2.4 * MS)  # each job took 2.4 ms: more than the two copies
    assert lane.slowdown == pytest.approx(2.0) and lane.jobs_timed == WINDOW
    idle = [lane.choose(misses, nothing_held, queued=0).host for _ in range(PROBE_LAYERS)]
    assert idle == [set()] * PROBE_LAYERS and lane.slowdown == 1.0  # the stale window is dropped
    assert lane.choose(misses, nothing_held, queued=0).host == {5}       # the probe
    lane.observe(1, 1.3 * MS)  # the host is fast again
    assert lane.choose(misses, nothing_held, queued=0).host == {5}


def test_a_stall_does_not_move_the_lanes_speed():
    """One job that took a hundred times its cost (the host stood still: a 350 ms step on the H200) among
    normal ones: the median keeps the lane. Forced modes measure nothing (they have no costs)."""
    lane = _lane(1.0, 1.2)
    for ms in (1.2, 1.3, 120.0, 1.2, 1.25):
        lane.observe(1, ms * MS)
    assert lane.slowdown == pytest.approx(1.25 / 1.2)
    assert lane.choose([(2, 1), (5, 1)], lambda e: False, queued=0).host == {5}
    forced = HostLane("half")
    forced.observe(1, 120 * MS)
    assert forced.slowdown == 1.0 and forced.jobs_timed == 0


def test_forced_modes_and_off():
    needed = [(e, 1) for e in range(8)]
    assert HostLane("off").choose(needed, lambda e: False, 0).host == set()
    assert HostLane("all").choose(needed, lambda e: True, 0).host == set(range(8))  # resident ones too
    half = HostLane("half", seed=1).choose(needed, lambda e: False, 0).host
    assert 0 < len(half) < 8 and half == HostLane("half", seed=1).choose(needed, lambda e: False, 0).host


def test_knobs_refuse_bad_lane_settings():
    with pytest.raises(KnobError, match="cpu experts 'gpu'"):
        PolicyKnobs(cpu_experts="gpu")
    with pytest.raises(KnobError, match="cpu threads 0"):
        PolicyKnobs(cpu_threads=0)
    # every policy runs with the lane: reporting keeps it
    assert PolicyKnobs(policy="on-demand", cpu_experts="auto").effective().cpu_experts == "auto"


# -- tokens never change -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime():
    return duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", memory_budget="6slots", max_context=64)


@pytest.mark.parametrize("policy", ["on-demand", "lru", "duoserve"])
@pytest.mark.parametrize("mode", ["all", "half"])
def test_tokens_and_logits_do_not_depend_on_the_lane(runtime, policy, mode):
    ids = runtime.encode("Once upon a time there was", None)
    runtime.configure(policy="resident", memory_budget="all", cpu_experts="off")
    reference = runtime.generate(prompt_ids=ids, max_new_tokens=10, stop_at_eos=False, return_logits=True)
    extra = {"predictor": PREDICTOR} if policy == "duoserve" else {}
    runtime.configure(policy=policy, memory_budget="6slots", cpu_experts=mode, **extra)
    out = runtime.generate(prompt_ids=ids, max_new_tokens=10, stop_at_eos=False, return_logits=True)
    assert out.tokens == reference.tokens
    # the host and the device are the same processor here: the same kernels, the same bits
    assert all(bool((a == b).all()) for a, b in zip(out.logits, reference.logits))
    needed = out.expert_hits + out.expert_misses + out.host_computes
    if mode == "all":
        assert out.host_computes == needed and out.expert_misses == 0  # prefetches may still copy
    else:
        assert 0 < out.host_computes < needed
    lane_rows = [r for r in runtime.timeline.rows() if r["stream"] == "cpu"]
    assert len(lane_rows) == out.host_computes and all(r["duration_ms"] >= 0 for r in lane_rows)
    assert out.policy["cpu_lane"] == mode


def test_the_runtime_tells_the_decision_each_lane_jobs_time(runtime, monkeypatch):
    """Every lane job's time reaches ``HostLane.observe`` with its token count, as its span reaches the
    timeline (the same start and end)."""
    runtime.configure(policy="on-demand", memory_budget="6slots", cpu_experts="half")
    heard = []
    monkeypatch.setattr(runtime.host_lane, "observe", lambda tokens, seconds: heard.append((tokens, seconds)))
    out = runtime.generate(prompt_ids=[5, 6, 7, 8], max_new_tokens=4, stop_at_eos=False)
    spans = sorted(r["duration_ms"] for r in runtime.timeline.rows() if r["stream"] == "cpu")
    assert len(heard) == out.host_computes == len(spans) > 0
    assert sorted(s * 1e3 for _, s in heard) == pytest.approx(spans, abs=1e-3)
    assert {t for t, _ in heard} <= {1, 2, 3, 4} and any(t > 1 for t, _ in heard)  # the prompt's jobs carry its tokens


def test_the_lane_starts_before_the_policys_router_bookkeeping(runtime, monkeypatch):
    """A layer's lane experts are submitted before the policy hears ``router_done`` (the lane's expert is
    a batch-1 layer's longest path; the policy's work must not delay its start)."""
    runtime.configure(policy="duoserve", memory_budget="6slots", cpu_experts="all", predictor=PREDICTOR)
    order = []
    router_done, submit = runtime.policy.router_done, runtime.host_worker.submit
    monkeypatch.setattr(runtime.policy, "router_done", lambda *a: order.append("policy") or router_done(*a))
    monkeypatch.setattr(runtime.host_worker, "submit", lambda *a: order.append("lane") or submit(*a))
    runtime.generate(prompt_ids=[5, 6, 7], max_new_tokens=3, stop_at_eos=False)
    heard = [i for i, kind in enumerate(order) if kind == "policy"]
    assert len(heard) == 3 * runtime.config.num_hidden_layers  # every layer of the three steps
    # with every expert on the lane, each router_done comes right after its own layer's submissions
    assert order[0] == "lane" and all(order[i - 1] == "lane" for i in heard)


def test_auto_on_a_cpu_device_is_off_and_says_why(runtime):
    runtime.configure(policy="on-demand", memory_budget="6slots", cpu_experts="auto")
    described = runtime.describe()
    assert described["cpu_experts"] == "auto" and described["cpu_lane"].startswith("off (")
    assert "nothing to split" in described["cpu_lane"]
    out = runtime.generate(prompt_ids=[5, 6, 7], max_new_tokens=3, stop_at_eos=False)
    assert out.host_computes == 0


def test_chrome_trace_has_a_cpu_lane_track(runtime):
    runtime.configure(policy="on-demand", memory_budget="6slots", cpu_experts="all")
    runtime.generate(prompt_ids=[5, 6, 7], max_new_tokens=2, stop_at_eos=False)
    trace = runtime.timeline.to_chrome_trace()["traceEvents"]
    assert any(e.get("tid") == 3 and e["ph"] == "X" for e in trace)
    names = [e["args"]["name"] for e in trace if e["ph"] == "M"]
    assert "CPU lane" in names


# -- the simulator -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["all", "half"])
@pytest.mark.parametrize("policy", ["on-demand", "duoserve"])
@pytest.mark.parametrize("quant, split", [("nf4", 0.0), ("int4", 0.5)], ids=["whole", "shared"])
def test_runtime_and_simulator_decide_the_same_with_the_lane(tmp_path, mode, policy, quant, split):
    budget_slots = 10
    knobs = PolicyKnobs(policy=policy, cpu_experts=mode, cpu_split=split,
                        **({"predictor": PREDICTOR, "predictor_threshold": 0.3} if policy == "duoserve" else {}))
    runtime = duoserve_core.load(DATA / "small-moe", device="cpu", quant=quant, max_context=CONTEXT,
                                 routing_trace=TRACE, cpu_split=split)
    budget = runtime.plan.fixed_bytes + budget_slots * runtime.format.nbytes
    runtime.configure(memory_budget=budget, knobs=knobs)
    from duoserve_core.bench import make_prompt
    prompt = [t % runtime.config.vocab_size for t in make_prompt(PROMPT)]
    real, _ = decisions(runtime, lambda: runtime.generate(prompt_ids=prompt, max_new_tokens=GEN,
                                                          stop_at_eos=False).phases)
    path = fake_calibration(tmp_path / "cal.json", 8, 2, host_lane_s=1 * MS, shape=dict(
        hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2))
    raw = json.loads(path.read_text())
    for table in (raw["expert_bytes"], raw["expert_compute"], raw["host_lane"]["expert"]):
        table["int4"] = table["nf4"]  # the same constant times: the decisions are what is compared
    path.write_text(json.dumps(raw))
    cal = load_calibration(path)
    model = build_model(DATA / "small-moe", quant=quant, memory_budget=budget, max_context=CONTEXT, device_type="cpu",
                        cpu_split=split)
    sim = Simulator(model, cal, RoutingReplay(read_trace(TRACE), 8, 8, 2), knobs, policy_time=False)
    simulated, _ = decisions(sim, lambda: sim.generate(PROMPT, GEN).phases)
    assert simulated == real and any(row[5] == "host" for row in real)
    assert any(row[5] == "shared" for row in real) == bool(split)


def test_simulated_lane_halves_a_copy_bound_layer(tmp_path):
    # One layer, top-2, every token needs two experts not resident (4 experts, 2 slots, alternating):
    # copies 1 ms, host 0.8 ms per expert. On-demand: two copies in a row (~2.1 ms a token); with the
    # lane one expert is copied while the other is computed on the host (~1.1 ms).
    tokens = [[[0, 1]], [[2, 3]]] * 4
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0, 1]]], "decode": tokens}], 1, 4, 2, budget="2slots",
                               host_lane_s=0.8 * MS)
    plain = Simulator(model, cal, replay, "on-demand", policy_time=False).generate(1, 8)
    lane = Simulator(model, cal, replay, PolicyKnobs(policy="on-demand", cpu_experts="auto"),
                     policy_time=False).generate(1, 8)
    assert lane.phases["decode"]["host_computes"] == 7 and lane.phases["decode"]["h2d_copies"] == 7
    assert lane.tpot_s == pytest.approx(1.16 * MS, rel=0.05) and plain.tpot_s == pytest.approx(2.16 * MS, rel=0.05)
    df = pd.DataFrame(lane.rows, columns=COLUMNS)
    cpu, copies = df[df.stream == "cpu"], df[df.kind == "h2d"]
    # the host's expert runs while the other expert's copy crosses the link
    first = cpu.iloc[1]
    assert ((copies.start_ms < first.end_ms) & (copies.end_ms > first.start_ms)).any()


def test_a_lane_slower_than_its_costs_costs_little(tmp_path, monkeypatch):
    """The same copy-bound layer, but the host runs each lane expert at 2.5 ms where its costs say 0.8
    (a slow stretch of the H200's host): measured as it runs, the lane gets an expert once in
    ``PROBE_LAYERS`` layers and decode is within 1% of on-demand's; deciding from the costs alone, it
    takes one every token and loses by about 18%."""
    tokens = [[[0, 1]], [[2, 3]]] * 100
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0, 1]]], "decode": tokens}], 1, 4, 2, budget="2slots",
                               host_lane_s=0.8 * MS)
    plain = Simulator(model, cal, replay, "on-demand", policy_time=False).generate(1, 200)

    def slow_lane(follows_speed: bool):
        sim = Simulator(model, cal, replay, PolicyKnobs(policy="on-demand", cpu_experts="auto"), policy_time=False)
        monkeypatch.setattr(sim, "host_lane_s", lambda tokens: 2.5 * MS)  # the lane's time; its costs stay 0.8 ms
        if not follows_speed:
            monkeypatch.setattr(sim.host_lane, "observe", lambda tokens, seconds: None)
        return sim.generate(1, 200)
    following, blind = slow_lane(True), slow_lane(False)
    assert following.tpot_s < plain.tpot_s * 1.01 < blind.tpot_s / 1.15
    assert 0 < following.phases["decode"]["host_computes"] <= 200 // PROBE_LAYERS + 1
    assert blind.phases["decode"]["host_computes"] == 199


def test_a_relayout_delays_the_layers_last_copy_not_the_next_copy(tmp_path):
    # The int4 relayout (``calibration.relayout_s``) runs on its own stream after each copy lands: the
    # second copy of a layer starts as the first lands (its relayout overlaps it), so a layer of two
    # misses waits for one relayout, the last one's: 1 ms copies, 0.3 ms relayouts, ~2.16 -> ~2.46 ms.
    tokens = [[[0, 1]], [[2, 3]]] * 4
    request = [{"prefill": [[[0, 1]]], "decode": tokens}]
    plain = Simulator(*setup(tmp_path / "a", request, 1, 4, 2, budget="2slots"), "on-demand",
                      policy_time=False).generate(1, 8)
    relaid = Simulator(*setup(tmp_path / "b", request, 1, 4, 2, budget="2slots", relayout_s=0.3 * MS), "on-demand",
                       policy_time=False).generate(1, 8)
    assert relaid.tpot_s == pytest.approx(plain.tpot_s + 0.3 * MS, rel=0.03)
    df = pd.DataFrame(relaid.rows, columns=COLUMNS)
    copies, relayouts = df[df.kind == "h2d"].reset_index(), df[df.stream == "relayout"].reset_index()
    assert len(relayouts) == len(copies) and (relayouts.start_ms >= copies.end_ms - 1e-9).all()
    # copies run back to back: the second of a layer does not wait for the first one's relayout
    decode = copies[copies.phase == "decode"]
    pairs = decode.groupby("step")
    assert all(g.start_ms.iloc[1] == pytest.approx(g.end_ms.iloc[0]) for _, g in pairs)


def test_a_relayout_takes_its_phases_time_where_the_calibration_has_one(tmp_path):
    # A prompt's relayouts wait beside its large matmuls (1.93 ms a record on the H200 against 0.26 ms
    # in decode, 2026-12-02): with ``relayout_by_phase_s`` each phase's relayouts take their phase's
    # time, and a phase the file lacks falls back to the mean ``relayout_s``.
    request = [{"prefill": [[[0, 1]]], "decode": [[[2, 3]], [[0, 1]]] * 4}]
    def spans(path, **cal):
        run = Simulator(*setup(path, request, 1, 4, 2, budget="2slots", **cal), "on-demand", policy_time=False).generate(1, 8)
        df = pd.DataFrame(run.rows, columns=COLUMNS)
        relayouts = df[df.stream == "relayout"]
        return {phase: set((g.end_ms - g.start_ms).round(6)) for phase, g in relayouts.groupby("phase")}
    assert spans(tmp_path / "a", relayout_s=0.5 * MS, relayout_by_phase_s={"prefill": 2 * MS, "decode": 0.25 * MS}) \
        == {"prefill": {2.0}, "decode": {0.25}}
    assert spans(tmp_path / "b", relayout_s=0.5 * MS, relayout_by_phase_s={"prefill": 2 * MS}) \
        == {"prefill": {2.0}, "decode": {0.5}}


def test_simulator_needs_the_lane_in_the_calibration(tmp_path):
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0, 1]]], "decode": [[[2, 3]]]}], 1, 4, 2)
    with pytest.raises(CalibrationError, match="no CPU-lane measurements"):
        Simulator(model, cal, replay, PolicyKnobs(cpu_experts="auto"))
    model, cal, replay = setup(tmp_path / "with-lane", [{"prefill": [[[0, 1]]], "decode": [[[2, 3]]]}], 1, 4, 2,
                               host_lane_s=MS)
    with pytest.raises(CalibrationError, match="at 16 threads"):
        Simulator(model, cal, replay, PolicyKnobs(cpu_experts="auto", cpu_threads=16))


def test_auto_measures_its_costs_at_load_and_at_configure(monkeypatch):
    """``auto`` measures its costs at load and again at ``configure`` (a new batch size rebuilds the
    runtime's parts): the GPU path, run here on the CPU by letting the lane split a CPU device's
    experts. Whatever it picks, the tokens are the lane-less run's."""
    monkeypatch.setattr(duoserve_core.runtime, "splits_experts", lambda device: True)
    kw = dict(device="cpu", quant="nf4", memory_budget="6slots", max_context=64)
    auto = duoserve_core.load(DATA / "small-moe", cpu_experts="auto", **kw)
    first = auto.host_lane.costs
    assert auto.host_lane.mode == "auto" and first.copy_s > 0
    auto.configure(max_batch=2)
    assert auto.host_lane.mode == "auto" and auto.model.kv.rows == 2 and auto.host_lane.costs is not first
    off = duoserve_core.load(DATA / "small-moe", **kw)
    prompt = [1, 5, 9, 2, 7]
    assert auto.generate(prompt_ids=prompt, max_new_tokens=6).tokens == \
        off.generate(prompt_ids=prompt, max_new_tokens=6).tokens


def test_the_runtimes_own_costs_are_measured(runtime):
    """What ``auto`` weighs on a GPU, measured here on the CPU (where ``auto`` itself stays off): every
    cost positive, the host lane's growing with tokens."""
    from duoserve_core.experts.host_lane import HostLaneWorker, measure_costs

    runtime.configure(policy="on-demand", memory_budget="6slots", cpu_experts="off")
    worker = HostLaneWorker(runtime.format, 1)
    try:
        costs = measure_costs(worker, runtime.store, runtime.engine, runtime.dtype)
    finally:
        worker.close()
    assert costs.copy_s > 0 and costs.threads == 1
    assert 0 < costs.host_s(1) <= costs.host_s(64) and costs.device_s(4) > 0
    described = costs.describe()
    assert set(described["host_ms"]) == {1, 4, 16} and described["device_ms"][4] > 0

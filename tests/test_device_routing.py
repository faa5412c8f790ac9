"""Resident one-request decode routed on the device (``experts/device_routing``): the same tokens, logits
and bookkeeping as routing every layer on the host, and the host path wherever the device path cannot serve.

On the CPU the graphs' static functions run eagerly (``cuda_graphs=True``), so the device path's arithmetic,
its slot lookup and gather, the trace replay and the after-the-step bookkeeping are all checked here; the
GPU test replays the captured graphs and compares them with the host-routed run on the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch

import duoserve_core
from conftest import hf_greedy, requires_cuda
from duoserve_core.calibrate import _by_layer
from duoserve_core.sim import Simulator, build_model
from duoserve_core.sim.calibration import Calibration
from duoserve_core.traces import RoutingReplay, TraceRecorder, read_trace
from test_layer_step import CONTEXT, DATA, GEN, TRACE, decisions, make_prompt
from test_layer_step import PROMPT as SIM_PROMPT
from test_sim import fake_calibration

PROMPT = [(7 * i) % 90 + 3 for i in range(30)]
NEW = 10


def _run(path, routing: bool, recorder=None, **kw):
    rt = duoserve_core.load(path, device=kw.pop("device", "cpu"), cuda_graphs=True, device_routing=routing,
                            policy=kw.pop("policy", "resident"), **kw)
    events = []
    rt.events.subscribe(lambda e: events.append((type(e).__name__, getattr(e, "kind", None), getattr(e, "key", None))))
    out = rt.generate(prompt_ids=PROMPT, max_new_tokens=NEW, stop_at_eos=False, return_logits=True, recorder=recorder)
    return rt, out, [e for e in events if e[0] == "CacheEvent"]


@pytest.mark.parametrize("quant", ["none", "nf4", "int4"])
def test_device_routing_gives_the_host_routed_tokens_logits_and_bookkeeping(tiny_checkpoint, reference_model, quant):
    host, a, host_events = _run(tiny_checkpoint, False, quant=quant)
    dev, b, dev_events = _run(tiny_checkpoint, True, quant=quant)
    assert (host.describe()["decode_routing"], dev.describe()["decode_routing"]) == \
        ("host (device_routing=False)", "device")
    assert dev.model.device_routed.steps == NEW - 1  # every decode step (the first token comes from the prefill)
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)  # the same ops in the same order: the same bits
    if quant == "none":
        assert b.tokens == hf_greedy(reference_model, PROMPT, NEW)[0]
    # the cache heard every layer's routing: the same hits, in the same order, as the host-routed run
    assert dev.cache.stats.as_dict() == host.cache.stats.as_dict()
    assert dev_events == host_events
    assert b.phases == a.phases


def test_a_replayed_trace_routes_on_the_device_as_on_the_host():
    """The bundled model replaying its held-out trace: every layer's routing copied in before the step."""
    kw = dict(quant="nf4", max_context=40, routing_trace=TRACE)
    host, a, host_events = _run(DATA / "small-moe", False, **kw)
    dev, b, dev_events = _run(DATA / "small-moe", True, **kw)
    assert dev.model.device_routed.steps == NEW - 1
    assert a.tokens == b.tokens and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert dev_events == host_events


def test_the_replay_of_a_whole_token_matches_the_replay_of_each_layer():
    replay = RoutingReplay(read_trace(TRACE), 20, 8, 2, seed=3)  # 20 layers over an 8-layer trace: three blocks
    for request, position in [(0, 0), (1, 17), (5, 300)]:
        idx, w = replay.token(request, position, 20)
        for layer in range(20):
            e, v = replay.routing(request, position, 1, layer)
            assert torch.equal(idx[layer], e[0]) and torch.equal(w[layer], v[0])


def test_the_timeline_has_one_router_and_one_expert_span_a_routed_layer(tiny_checkpoint):
    rt, _, _ = _run(tiny_checkpoint, True, quant="nf4")
    rows = [r for r in rt.timeline.rows() if r["phase"] == "decode" and r["step"] == 2]
    layers = rt.config.num_hidden_layers
    for kind in ("attention", "router", "expert"):
        assert sorted(r["layer"] for r in rows if r["kind"] == kind) == list(range(layers))
    assert all(r["expert"] is None for r in rows if r["kind"] == "expert")  # which ran is known on the device only
    assert not _by_layer(rows)  # the calibration's per-expert terms leave such layers out


def test_what_cannot_route_on_the_device_routes_on_the_host(tiny_checkpoint):
    fits = duoserve_core.load(tiny_checkpoint, device="cpu", quant="nf4", cuda_graphs=True, policy="resident")
    exact = fits.plan.fixed_bytes + fits.plan.total_experts * fits.plan.expert_bytes
    cases = {
        "on-demand": dict(policy="on-demand"),
        "no-graphs": dict(policy="resident", cuda_graphs=False),
        "no-room": dict(policy="resident", memory_budget=exact),
        "lane": dict(policy="resident", cpu_experts="all"),
    }
    why = {}
    for name, kw in cases.items():
        rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="nf4", **{"cuda_graphs": True, **kw})
        assert rt.model.device_routed is None
        why[name] = rt.describe()["decode_routing"]
    assert why == {"on-demand": "host (policy 'on-demand' does not hold every expert)",
                   "no-graphs": "host (decode graphs off)",
                   "no-room": f"host (the budget leaves no room to gather 2 experts "
                              f"({duoserve_core.units.format_bytes(2 * fits.plan.expert_bytes)}))",
                   "lane": "host (the CPU lane is on)"}


def test_a_trace_recorder_gets_every_layer_through_the_host_path(tiny_checkpoint):
    """A recorder hears each layer's routing as it happens: those steps route on the host."""
    host_trace, dev_trace = TraceRecorder(), TraceRecorder()
    _, a, _ = _run(tiny_checkpoint, False, recorder=host_trace, quant="nf4")
    dev, b, _ = _run(tiny_checkpoint, True, recorder=dev_trace, quant="nf4")
    assert dev.model.device_routed.steps == 0 and a.tokens == b.tokens
    assert host_trace.dataframe().equals(dev_trace.dataframe())


def test_a_batch_routes_on_the_host_and_a_lone_request_on_the_device(tiny_checkpoint):
    """Two requests decoding together route on the host (a gather per token and expert would cost more than
    the sync it saves); the third, alone once they finished, routes on the device. Each request's tokens
    are its own alone."""
    prompts = [PROMPT[:20], PROMPT[5:11], PROMPT[9:30]]
    kw = dict(device="cpu", quant="nf4", cuda_graphs=True, policy="resident", max_batch=2, max_context=64)
    solo = duoserve_core.load(tiny_checkpoint, device_routing=False, **kw)
    alone = [solo.generate(prompt_ids=p, max_new_tokens=6, stop_at_eos=False).tokens for p in prompts]
    rt = duoserve_core.load(tiny_checkpoint, **kw)
    run = rt.generate_many(prompts, max_new_tokens=6, stop_at_eos=False)
    assert [r.tokens for r in run.requests] == alone
    assert 0 < rt.model.device_routed.steps <= 5  # the third request's decode steps, none of the pair's


def test_slots_filled_again_after_the_cache_was_emptied(tiny_checkpoint):
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="nf4", cuda_graphs=True, policy="resident")
    first = rt.generate(prompt_ids=PROMPT, max_new_tokens=NEW, stop_at_eos=False).tokens
    table = rt.cache.slot_table()
    assert rt.cache.slot_table() is table  # the same list while no slot changes: the step copies it in once
    rt.empty_expert_cache()
    assert rt.cache.slot_table() is None
    assert rt.generate(prompt_ids=PROMPT, max_new_tokens=NEW, stop_at_eos=False).tokens == first
    assert rt.model.device_routed.steps == 2 * (NEW - 1)
    refilled = rt.cache.slot_table()  # a new list, one distinct slot per expert
    assert refilled is not table and len(set(refilled)) == len(refilled) == rt.cache.num_layers * rt.cache.num_experts


@requires_cuda
def test_gpu_device_routing_replays_the_host_routed_tokens(tiny_checkpoint):
    """Captured graphs on a GPU: the tokens of the host-routed run on the same quantized weights, two graphs a
    layer, and a replayed trace too."""
    host, a, _ = _run(tiny_checkpoint, False, device="cuda", quant="nf4")
    dev, b, _ = _run(tiny_checkpoint, True, device="cuda", quant="nf4")
    assert dev.describe()["decode_routing"] == "device"
    assert dev.model.device_routed.steps == NEW - 1
    assert dev.model.device_routed.captured() == 2 * dev.config.num_hidden_layers
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-2, rtol=0)
    kw = dict(device="cuda", quant="nf4", max_context=40, routing_trace=TRACE)
    _, c, _ = _run(DATA / "small-moe", False, **kw)
    _, d, _ = _run(DATA / "small-moe", True, **kw)
    assert c.tokens == d.tokens


# -- the simulator ------------------------------------------------------------------------------
def _graphs_calibration(tmp_path, gather_Bps: float | None = None):
    """The layer-step tests' calibration, as if measured with the decode graphs (and the gather), with host
    work after a layer's sync."""
    path = fake_calibration(tmp_path / "cal.json", 8, 2, shape=dict(
        hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2))
    raw = json.loads(path.read_text())
    raw["cuda_graphs"] = True
    raw["host"].update(layer_base_s={"resident": 2e-4, "offloaded": 2e-4}, per_expert_s=5e-5)  # what a sync exposes
    if gather_Bps is not None:
        raw.setdefault("device_time", {})["gather_Bps"] = gather_Bps
    return Calibration(raw, "graphs calibration")


def _sim_model_with_room():
    """The bundled model simulated at a budget for every expert and the gather's two records."""
    plan = build_model(DATA / "small-moe", quant="nf4", memory_budget="all", max_context=CONTEXT, device_type="cpu").plan
    return build_model(DATA / "small-moe", quant="nf4", memory_budget=plan.fixed_bytes + 66 * plan.expert_bytes,
                       max_context=CONTEXT, device_type="cpu")


def test_runtime_and_simulator_route_on_the_device_alike(tmp_path):
    """The same decisions, in the same order, when both route resident decode on the device."""
    runtime = duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", max_context=CONTEXT,
                                 routing_trace=TRACE, cuda_graphs=True, policy="resident")
    budget = runtime.plan.fixed_bytes + 66 * runtime.format.nbytes  # every expert and room for the gather
    runtime.configure(memory_budget=budget)
    prompt = [t % runtime.config.vocab_size for t in make_prompt(SIM_PROMPT)]
    real, _ = decisions(runtime, lambda: runtime.generate(prompt_ids=prompt, max_new_tokens=GEN, stop_at_eos=False))
    model = build_model(DATA / "small-moe", quant="nf4", memory_budget=budget, max_context=CONTEXT, device_type="cpu")
    sim = Simulator(model, _graphs_calibration(tmp_path), RoutingReplay(read_trace(TRACE), 8, 8, 2), "resident",
                    policy_time=False)
    simulated, _ = decisions(sim, lambda: sim.generate(SIM_PROMPT, GEN))
    assert runtime.describe()["decode_routing"] == sim.decode_routing == "device"
    assert runtime.model.device_routed.steps > 0
    assert simulated == real


def test_the_simulator_charges_a_routed_layer_its_gather_and_experts_without_a_sync(tmp_path):
    model = _sim_model_with_room()
    replay = RoutingReplay(read_trace(TRACE), 8, 8, 2)
    gather_Bps = 1e12  # fast enough that the sync and host work saved show
    cal = _graphs_calibration(tmp_path, gather_Bps)
    routed = Simulator(model, cal, replay, "resident", policy_time=False)
    hosted = Simulator(model, cal, replay, "resident", policy_time=False, device_routing=False)
    assert (routed.decode_routing, hosted.decode_routing) == ("device", "host (device_routing=False)")
    a, b = routed.generate(SIM_PROMPT, GEN), hosted.generate(SIM_PROMPT, GEN)
    assert a.phases == b.phases  # the same hits
    assert a.tpot_s < b.tpot_s  # no sync, no host bookkeeping between the layers
    spans = [r for r in a.rows if r["phase"] == "decode" and r["kind"] == "expert"]
    assert len(spans) == (GEN - 1) * 8 and all(r["expert"] is None for r in spans)
    expected_ms = (2 * model.plan.expert_bytes / gather_Bps + 2 * cal.expert_device_s("nf4", "decode", 1)) * 1e3
    assert all(r["duration_ms"] == pytest.approx(expected_ms) for r in spans)


def test_a_measured_routed_layer_replaces_the_composed_one(tmp_path):
    """Where the calibration timed a routed layer in the runtime (``calibrate.measure_routed_layer``), the
    simulator charges its router and experts graphs as measured: the host-routed router span holds a sync."""
    cal = _graphs_calibration(tmp_path, 1e9)
    raw = dict(cal.raw, device_time={**cal.raw["device_time"],
                                     "routed_layer": {"router_s": 3e-5, "experts_s": 4e-4, "top_k": 2}})
    cal = Calibration(raw, "with a routed layer")
    model = _sim_model_with_room()
    run = Simulator(model, cal, RoutingReplay(read_trace(TRACE), 8, 8, 2), "resident", policy_time=False) \
        .generate(SIM_PROMPT, GEN)
    decode = [r for r in run.rows if r["phase"] == "decode"]
    assert {round(r["duration_ms"], 9) for r in decode if r["kind"] == "router"} == {0.03}
    assert {round(r["duration_ms"], 9) for r in decode if r["kind"] == "expert"} == {0.4}

"""Expert slots and copy links on several devices (two or three CPU "devices" here: the several-device
logic without a GPU): the numbers are the one-device run's and transformers'; the cache spreads a
layer's copies over the links; the runtime and the simulator place every copy on the same device;
the memory plan, the simulator's timing, device resolution and the timeline know the devices."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import duoserve_core
import duoserve_core.runtime as runtime_module
from conftest import hf_greedy, requires_cuda
from duoserve_core.bench import make_prompt
from duoserve_core.errors import BudgetError, DeviceError
from duoserve_core.events import EventBus, SpanEvent, StepEvent
from duoserve_core.experts.cache import ExpertCache
from duoserve_core.experts.layer_step import LayerStep
from duoserve_core.memory import plan_memory
from duoserve_core.policy import POLICIES, Phase, Plan, Policy, PolicyKnobs
from duoserve_core.policy.knobs import make_policy
from duoserve_core.runtime import resolve_devices
from duoserve_core.sim import Simulator, build_model, load_calibration
from duoserve_core.timeline import COLUMNS, Timeline
from duoserve_core.traces import RoutingReplay, read_trace
from lab.cache_log import CacheLog
from test_sim import MS, fake_calibration, hand_trace, model_config

DATA = Path(__file__).resolve().parents[1] / "data"
PROMPT = [1, 2, 3, 4, 5, 6, 7]  # greedy tokens that vary, so routing does
STEPS = 6
TOTAL = 18  # the tiny checkpoint: 3 layers x 6 experts


# -- 1. the numbers: several devices, one device, transformers ---------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, reference_model):
    """The tiny checkpoint's one-device plan figures and transformers' greedy tokens."""
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none")
    ref_tokens, _ = hf_greedy(reference_model, PROMPT, STEPS)
    return SimpleNamespace(path=tiny_checkpoint, plan=rt.plan, config=rt.config, format=rt.format,
                           fixed=rt.plan.fixed_bytes, nb=rt.format.nbytes, ref_tokens=ref_tokens, dtype=rt.dtype,
                           max_context=rt.max_context)


def _plan(tiny, budget, devices, device_type="cpu"):
    return plan_memory(tiny.config, tiny.plan.dense_bytes, tiny.format, budget, tiny.max_context, tiny.dtype,
                       device_type, 1, devices)


def _budget(tiny, policy, devices):
    """A small budget: three slots on device 0; for ``resident``, the smallest that holds every expert
    over ``devices`` devices (so device 0 still holds fewer than all)."""
    if policy != "resident":
        return tiny.fixed + 3 * tiny.nb
    for slots in range(2, TOTAL + 1):
        budget = tiny.fixed + slots * tiny.nb
        if _plan(tiny, budget, devices).num_slots == TOTAL:
            return budget
    raise AssertionError("no budget holds every expert")


def _knobs(policy):
    # the bundled predictors are trained for another model: duoserve guesses with the speculative gate
    return {"policy": policy, "speculative_gate": True} if policy == "duoserve" else {"policy": policy}


def _generate(rt):
    return rt.generate(prompt_ids=PROMPT, max_new_tokens=STEPS, return_logits=True, stop_at_eos=False)


@pytest.mark.parametrize("devices", [2, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_several_devices_give_the_one_device_numbers(tiny, policy, devices):
    budget = _budget(tiny, policy, devices)
    names = ",".join(["cpu"] * devices)
    many = duoserve_core.load(tiny.path, devices=names, quant="none", memory_budget=budget, **_knobs(policy))
    assert [str(d) for d in many.devices] == ["cpu"] * devices
    assert many.plan.devices == devices and all(n > 0 for n in many.plan.device_slots)
    assert many.plan.device_slots[0] < TOTAL
    if policy == "resident":
        one_budget = None   # one device: every expert needs the whole model's budget
    else:
        one_budget = budget
        assert many.plan.num_slots < TOTAL  # experts really move: a small budget on every device
    one = duoserve_core.load(tiny.path, device="cpu", quant="none", memory_budget=one_budget, **_knobs(policy))
    got, expected = _generate(many), _generate(one)
    assert got.tokens == expected.tokens == tiny.ref_tokens
    assert len(got.logits) == len(expected.logits) == STEPS
    for a, b in zip(got.logits, expected.logits):
        assert torch.equal(a, b)
    df = many.timeline.to_dataframe()
    for kind in ("h2d", "expert"):
        assert set(df[df.kind == kind].device) == set(range(devices)), kind
    assert set(df[df.kind.isin(["attention", "router"])].device) == {0}  # the dense part runs on device 0
    # every expert computed where its slot is: on the device its latest copy went to
    copied_to = {}
    for r in df[df.kind.isin(["h2d", "expert"])].itertuples():  # in the order they were issued
        if r.kind == "h2d":
            copied_to[(r.layer, r.expert)] = r.device
        else:
            assert copied_to[(r.layer, r.expert)] == r.device
    assert got.h2d_copies == int((df.kind == "h2d").sum())
    if policy == "resident":  # every expert is resident, on the device its copy went to
        for (layer, expert), device in copied_to.items():
            assert many.cache.device_of((layer, expert)) == device
        assert sum(many.cache.device_of((l, e)) == 0 for l in range(3) for e in range(6)) \
            == many.plan.device_slots[0]


def test_describe_lists_each_devices_share(tiny):
    budget = tiny.fixed + 3 * tiny.nb
    rt = duoserve_core.load(tiny.path, devices="cpu,cpu", quant="none", memory_budget=budget)
    d = rt.describe()
    assert d["devices"] == ["cpu", "cpu"] and d["device"] == rt.device_names() and "," in d["device"]
    assert d["memory_plan_by_device"] == rt.plan.describe_devices()
    assert [s["slots"] for s in d["memory_plan_by_device"]] == rt.plan.device_slots
    assert d["memory_plan"]["devices"] == 2
    assert sum(e.buffer.shape[0] for e in rt.engine.engines) == rt.plan.num_slots


def test_batched_generation_on_two_devices_is_the_one_device_run(tiny):
    prompts = [PROMPT, [7, 3, 50, 22], [60, 31, 8, 77, 45], [88, 9]]
    fixed = duoserve_core.load(tiny.path, device="cpu", quant="none", max_batch=2).plan.fixed_bytes  # two KV caches
    budget = fixed + 3 * tiny.nb
    runs = {}
    for names in ("cpu", "cpu,cpu"):
        rt = duoserve_core.load(tiny.path, devices=names, quant="none", memory_budget=budget, max_batch=2)
        runs[names] = rt.generate_many(prompts, max_batch=2, max_new_tokens=5, stop_at_eos=False, return_logits=True)
        if names == "cpu,cpu":
            df = rt.timeline.to_dataframe()
            assert set(df[df.kind == "h2d"].device) == {0, 1} and set(df[df.kind == "expert"].device) == {0, 1}
    one, two = runs["cpu"], runs["cpu,cpu"]
    assert one.mean_batch > 1  # requests really decoded together
    assert two.device == one.device + ", " + one.device
    for a, b in zip(one.requests, two.requests):
        assert a.tokens == b.tokens and len(a.tokens) == 5
        assert len(a.logits) == len(b.logits) == 5
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


# -- 2. the cache over two devices --------------------------------------------------------------------
class _FakeEngine:
    """The slots of a ``TransferEngines`` without bytes: the slot pool, each slot's device, the copies."""

    def __init__(self, device_of_slot):
        self.device_of_slot = list(device_of_slot)
        self.num_slots = len(self.device_of_slot)
        self.store = SimpleNamespace(record_bytes=1)
        self.copies: list[tuple[int, tuple]] = []

    def copy_in(self, slot, key):
        self.copies.append((slot, key))


def _fake_cache(device_of_slot, policy=None, layers=3, experts=8):
    policy = policy or Policy()
    engine = _FakeEngine(device_of_slot)
    cache = ExpertCache(engine, policy, layers, experts, EventBus())
    policy.attach(cache)
    return cache, engine


def _use(cache, *keys):
    for key in keys:
        cache.acquire(key)
    for key in keys:
        cache.unpin(key)


def test_two_misses_of_a_layer_cross_two_links():
    cache, engine = _fake_cache([0, 0, 1, 1])
    cache.begin_layer()
    cache.acquire((0, 0))
    cache.acquire((0, 1))
    assert cache.device_of((0, 0)) == 0 and cache.device_of((0, 1)) == 1  # ties: the lower index first
    assert cache.copies_this_layer == [1, 1]
    cache.acquire((0, 2))
    cache.acquire((0, 3))
    assert [cache.device_of((0, e)) for e in range(4)] == [0, 1, 0, 1]
    # on each device the last free slot first, as one device's free list pops
    assert [slot for slot, _ in engine.copies] == [0, 2, 1, 3]
    assert cache.device_of((2, 7)) is None


def test_prefetches_alternate_links_with_misses():
    cache, _ = _fake_cache([0, 0, 1, 1])
    cache.begin_layer()
    cache.acquire((0, 0))                   # device 0
    assert cache.prefetch((1, 0))           # device 1: the idler link
    assert cache.prefetch((1, 1))           # tie again: device 0
    assert [cache.device_of(k) for k in ((0, 0), (1, 0), (1, 1))] == [0, 1, 0]


def test_a_free_slot_on_the_busier_device_comes_before_evicting_on_the_idler():
    cache, _ = _fake_cache([0, 1, 1, 1])
    cache.begin_layer()
    _use(cache, (0, 0), (0, 1))             # device 0 full (one slot), device 1 two free slots
    cache.begin_layer()
    cache.acquire((1, 0))                   # only device 1 has a free slot
    assert cache.copies_this_layer == [0, 1]
    cache.acquire((1, 1))                   # device 0 is idler but full; device 1 still has a free slot
    assert cache.device_of((1, 1)) == 1 and cache.stats.evictions == 0
    assert cache.is_resident((0, 0)) and cache.is_resident((0, 1))
    cache.unpin((1, 0))
    cache.unpin((1, 1))
    cache.acquire((2, 0))                   # no free slot anywhere: device 0 (fewest copies) evicts
    assert cache.stats.evictions == 1 and not cache.is_resident((0, 0)) and cache.device_of((2, 0)) == 0


class _HighestExpertFirst(Policy):
    """Evicts the highest expert index first: not the LRU order, so the test tells them apart."""

    def eviction_order(self, candidates):
        return sorted(candidates, key=lambda k: (-k[1], k[0]))


def test_eviction_takes_the_policys_first_victim_on_the_least_loaded_device():
    cache, _ = _fake_cache([0, 0, 0, 1, 1, 1], _HighestExpertFirst())
    cache.begin_layer()
    _use(cache, *[(0, e) for e in range(6)])
    assert [cache.device_of((0, e)) for e in range(6)] == [0, 1, 0, 1, 0, 1]
    cache.begin_layer()
    cache.acquire((0, 3))                   # a hit: pinned, no copy
    cache.acquire((1, 0))                   # device 0 (tie): the policy's first among 0, 2, 4 is 4
    # the policy's first choice overall would be (0, 5), on device 1
    assert not cache.is_resident((0, 4)) and cache.is_resident((0, 5)) and cache.device_of((1, 0)) == 0
    cache.acquire((1, 1))                   # device 1 (fewer copies): 3 is pinned, so 5
    assert not cache.is_resident((0, 5)) and cache.is_resident((0, 3)) and cache.device_of((1, 1)) == 1
    cache.acquire((1, 2))                   # device 0 again: 2 is its first unpinned victim now
    assert not cache.is_resident((0, 2)) and cache.device_of((1, 2)) == 0
    assert cache.stats.evictions == 3 and cache.copies_this_layer == [2, 1]


def test_a_prefetch_asks_the_policy_about_the_victim_of_the_device_it_would_use():
    asked = []

    class Recording(_HighestExpertFirst):
        def worth_replacing(self, victim, incoming):
            asked.append(victim)
            return True

    cache, _ = _fake_cache([0, 1], Recording())
    cache.begin_layer()
    _use(cache, (0, 0), (0, 5))             # 0 on device 0, 5 on device 1
    cache.begin_layer()
    assert cache.prefetch((1, 1))           # device 0 (tie): its only expert is the victim
    assert asked == [(0, 0)] and cache.device_of((1, 1)) == 0 and cache.is_resident((0, 5))


def test_begin_layer_resets_the_balance():
    cache, _ = _fake_cache([0, 0, 0, 1, 1, 1])
    cache.begin_layer()
    _use(cache, (0, 0))
    _use(cache, (0, 1))                     # same layer: device 1
    assert cache.device_of((0, 1)) == 1 and cache.copies_this_layer == [1, 1]
    _use(cache, (0, 2))
    assert cache.copies_this_layer == [2, 1]
    cache.begin_layer()
    assert cache.copies_this_layer == [0, 0]
    _use(cache, (1, 0))                     # a new layer: device 0 again (a tie), though it carried more
    assert cache.device_of((1, 0)) == 0 and cache.copies_this_layer == [1, 0]
    # without begin_layer the count carries on: device 1 takes the next
    _use(cache, (1, 1))
    assert cache.device_of((1, 1)) == 1


class _CountingDevice:
    """``ExpertDevice`` of one token routed to ``experts``: records what it computed, nothing else."""

    def __init__(self, experts, num_experts, computed):
        self.counts = [int(e in experts) for e in range(num_experts)]
        self.computed = computed

    def wait_ready(self, slot):
        pass

    def compute(self, layer, expert, slot):
        self.computed.append((layer, expert, slot))

    def mark_read(self, slot):
        pass


def test_the_layer_step_balances_each_layer_and_step_from_zero():
    """``LayerStep.layer_started`` and ``begin_step`` start each layer's balance afresh: one miss per
    layer always crosses device 0's link (a tie), and so does a step's first phase-plan copy."""

    class DecodePlan(Policy):
        def phase(self, phase):
            return Plan(load=[(2, 7)]) if phase is Phase.DECODE else Plan()

    cache, engine = _fake_cache([0, 0, 0, 0, 1, 1, 1, 1], DecodePlan())
    step, computed = LayerStep(cache, cache.policy, cache.events), []
    step.begin_step(0, Phase.PREFILL)
    for layer in range(3):
        step.layer_started(layer)
        step.run(layer, torch.tensor([[layer + 1]]), torch.zeros(1, 8), None, _CountingDevice({layer + 1}, 8, computed))
    assert [cache.device_of((layer, layer + 1)) for layer in range(3)] == [0, 0, 0]
    assert [engine.device_of_slot[slot] for _, _, slot in computed] == [0, 0, 0]
    step.begin_step(1, Phase.DECODE)        # the phase plan's copy: device 0 again
    assert cache.device_of((2, 7)) == 0 and cache.stats.prefetches == 1


class _OneDeviceBefore(ExpertCache):
    """The cache's choices as they were before several devices (its free list's last slot; the policy's
    first victim among every unpinned expert): the reference a one-device cache must match."""

    def _free_slot(self):
        return self._free.pop()

    def _victim(self):
        candidates = [k for k in self._slot_of if k not in self._pinned]
        if not candidates:
            raise RuntimeError("every slot is pinned")
        return self.policy.eviction_order(candidates)[0]


def _workload(cache, engine, rng, steps=300):
    """Random layers of acquires, prefetches and releases; returns every decision and copy."""
    seen = []
    cache.events.subscribe(lambda e: seen.append((e.kind, e.key, e.resident)) if hasattr(e, "resident") else None)
    for _ in range(steps):
        cache.begin_layer()
        layer = rng.randrange(cache.num_layers)
        need = rng.sample(range(cache.num_experts), 2)
        for e in need:
            cache.acquire((layer, e))
        for _ in range(rng.randrange(3)):
            cache.prefetch((rng.randrange(cache.num_layers), rng.randrange(cache.num_experts)))
        for e in need:
            cache.unpin((layer, e))
        if rng.random() < 0.3:
            cache.release((layer, rng.choice(need)))
    return seen, list(engine.copies), cache.stats.as_dict()


@pytest.mark.parametrize("policy", ["on-demand", "lru", "per-layer-lru", "duoserve", "lru-speculative"])
def test_one_device_makes_the_choices_it_made_before(policy):
    runs = []
    for cls in (ExpertCache, _OneDeviceBefore):
        engine = _FakeEngine([0] * 5)
        p = make_policy(PolicyKnobs(policy=policy))
        cache = cls(engine, p, 3, 8, EventBus())
        p.attach(cache)
        assert cache.num_devices == 1
        runs.append(_workload(cache, engine, random.Random(7)))
    assert runs[0][1] and runs[0] == runs[1]


# -- 3. the runtime and the simulator place every copy alike ------------------------------------------
TRACE = DATA / "traces" / "small-moe-heldout.parquet"
PREDICTOR = str(DATA / "predictors" / "small-moe-depth2.safetensors")
SIM_PROMPT, SIM_GEN, CONTEXT = 24, 6, 30
SIM_CONFIGS = {
    "on-demand": PolicyKnobs(policy="on-demand"),
    "lru": PolicyKnobs(policy="lru"),
    "duoserve, predictor": PolicyKnobs(policy="duoserve", predictor=PREDICTOR, predictor_threshold=0.3),
}


@pytest.fixture(scope="module")
def both_two_devices(tmp_path_factory):
    runtime = duoserve_core.load(DATA / "small-moe", devices="cpu,cpu", quant="nf4", max_context=CONTEXT,
                                 routing_trace=TRACE)
    cal = load_calibration(fake_calibration(tmp_path_factory.mktemp("cal") / "cal.json", 8, 2, shape=dict(
        hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)))
    return runtime, cal, RoutingReplay(read_trace(TRACE), 8, 8, 2)


def _decisions_and_copies(target, run, rows):
    """Every cache decision of two requests (the second warm) and every copy's (phase, step, layer,
    expert, device), in order."""
    log = CacheLog().attach(target)
    copies = []
    try:
        for _ in range(2):
            log.start()
            run()
            df = pd.DataFrame(rows(), columns=COLUMNS)
            copies += list(df[df.kind == "h2d"][["phase", "step", "layer", "expert", "device"]]
                           .itertuples(index=False, name=None))
    finally:
        log.detach()
    df = log.to_dataframe()
    return list(df[["phase", "step", "at_layer", "layer", "expert", "event", "resident"]]
                .itertuples(index=False, name=None)), copies


@pytest.mark.parametrize("slots", [3, 10])
@pytest.mark.parametrize("name", list(SIM_CONFIGS))
def test_runtime_and_simulator_place_every_copy_on_the_same_device(both_two_devices, name, slots):
    runtime, cal, replay = both_two_devices
    knobs = SIM_CONFIGS[name]
    budget = runtime.plan.fixed_bytes + slots * runtime.format.nbytes
    runtime.configure(memory_budget=budget, knobs=knobs)
    assert runtime.plan.device_slots[0] == slots and runtime.plan.device_slots[1] > slots
    prompt = [t % runtime.config.vocab_size for t in make_prompt(SIM_PROMPT)]
    real, real_copies = _decisions_and_copies(
        runtime, lambda: runtime.generate(prompt_ids=prompt, max_new_tokens=SIM_GEN, stop_at_eos=False),
        runtime.timeline.rows)
    # the simulator's own plan for two devices is the runtime's, without being told
    planned = build_model(DATA / "small-moe", quant="nf4", memory_budget=budget, max_context=CONTEXT,
                          device_type="cpu", devices=2)
    assert planned.plan.device_slots == runtime.plan.device_slots
    model = build_model(DATA / "small-moe", quant="nf4", memory_budget=budget, max_context=CONTEXT, device_type="cpu",
                        devices=2, device_slots=runtime.plan.device_slots)
    sim = Simulator(model, cal, replay, knobs, policy_time=False)
    assert sim.engine.device_of_slot == runtime.engine.device_of_slot
    simulated, sim_copies = _decisions_and_copies(sim, lambda: sim.generate(SIM_PROMPT, SIM_GEN), sim.timeline.rows)
    assert len(real) > 0 and len(real_copies) > 0
    assert simulated == real
    assert sim_copies == real_copies
    assert {c[4] for c in real_copies} == {0, 1}


# -- 4. the memory plan --------------------------------------------------------------------------------
def test_the_other_devices_hold_more_slots(tiny):
    budget = tiny.fixed + 3 * tiny.nb
    one, two = _plan(tiny, budget, 1), _plan(tiny, budget, 2)
    assert one.device_slots is None and one.devices == 1 and one.num_slots == 3
    assert two.devices == 2 and two.device_slots[0] == 3 and two.num_slots == sum(two.device_slots)
    assert two.peer_fixed_bytes == two.activation_bytes + two.workspace_bytes + two.margin_bytes
    assert 0 < two.peer_fixed_bytes < two.fixed_bytes
    extra = (two.fixed_bytes - two.peer_fixed_bytes) / tiny.nb
    assert two.device_slots[1] > two.device_slots[0]
    assert int(extra) <= two.device_slots[1] - two.device_slots[0] <= int(extra) + 1
    # on CUDA the allocator margin sits on both devices alike: the same difference
    margin = _plan(tiny, budget + 10 * 2**30, 2, "cuda")
    assert margin.margin_bytes > 0 and margin.peer_fixed_bytes == two.peer_fixed_bytes + margin.margin_bytes


def test_the_slots_stop_when_every_expert_has_one_and_are_shared_evenly(tiny):
    big = _plan(tiny, tiny.fixed + 15 * tiny.nb, 2)
    assert big.device_slots == [9, 9] and big.num_slots == TOTAL  # every link serves its share
    three = _plan(tiny, tiny.fixed + 10 * tiny.nb, 3)
    assert three.device_slots == [6, 6, 6] and three.num_slots == TOTAL
    everything = _plan(tiny, tiny.fixed + TOTAL * tiny.nb, 2)
    assert everything.device_slots == [9, 9]
    tight = _plan(tiny, tiny.fixed + 4 * tiny.nb, 2)  # below every expert: each device holds what fits
    assert tight.device_slots[0] == 4 and tight.device_slots[1] > 4 and tight.num_slots < TOTAL
    unbounded = _plan(tiny, None, 2)
    assert unbounded.device_slots == [9, 9] and unbounded.num_slots == TOTAL


def test_describe_devices_lists_each_device(tiny):
    budget = tiny.fixed + 3 * tiny.nb
    plan = _plan(tiny, budget, 2)
    rows = plan.describe_devices()
    assert [r["device"] for r in rows] == [0, 1]
    assert all(r["budget_bytes"] == budget for r in rows)
    assert [r["slots"] for r in rows] == plan.device_slots
    assert [r["slot_bytes"] for r in rows] == [n * tiny.nb for n in plan.device_slots]
    assert [r["fixed_bytes"] for r in rows] == [plan.fixed_bytes, plan.peer_fixed_bytes]
    for r in rows:  # each device's share fits its budget
        assert r["fixed_bytes"] + r["slot_bytes"] <= budget
    one = _plan(tiny, budget, 1).describe_devices()
    assert len(one) == 1 and one[0]["slots"] == 3 and one[0]["fixed_bytes"] == plan.fixed_bytes


def test_a_budget_too_small_still_names_the_fix(tiny):
    small = tiny.fixed + tiny.nb  # one slot: not a layer's top-2
    for devices in (1, 2):
        with pytest.raises(BudgetError, match="Raise --memory-budget to at least"):
            _plan(tiny, small, devices)
    with pytest.raises(BudgetError, match="--memory-budget"):
        duoserve_core.load(tiny.path, devices="cpu,cpu", quant="none", memory_budget=small)


# -- 5. the simulator's timing on several devices ---------------------------------------------------
def _sim(tmp_path, requests, L, E, k, device_slots, *, peer_s=0.01 * MS, links=None, synchronous=False,
         policy="on-demand"):
    """A simulator of a hand-made model and trace on ``len(device_slots)`` devices, copies of 1 ms,
    experts of 0.1 ms; ``peer_s``: a measured device-to-device copy (None: none measured)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = fake_calibration(tmp_path / "cal.json", E, k, synchronous=synchronous)
    raw = json.loads(path.read_text())
    if peer_s is not None:
        raw["peer"] = [[1, peer_s], [2**40, peer_s]]
    if links is not None:
        raw["h2d"]["links"] = {"count": links[0], "pinned": [[1, links[1]], [2**40, links[1]]]}
    path.write_text(json.dumps(raw))
    model = build_model(model_config(tmp_path / "model", L, E, k), quant="nf4", memory_budget="all", max_context=64,
                        devices=len(device_slots), device_slots=device_slots)
    replay = RoutingReplay(read_trace(hand_trace(tmp_path / "t.parquet", requests, L, E, k)), L, E, k)
    return Simulator(model, load_calibration(path), replay, policy, policy_time=False)


def _decode_copies(run, step):
    df = pd.DataFrame(run.rows, columns=COLUMNS)
    return df[(df.kind == "h2d") & (df.step == step)].sort_values("start_ms")


def test_two_demand_copies_of_a_layer_overlap_on_two_links(tmp_path):
    requests = [{"prefill": [[[0, 1]]], "decode": [[[2, 3]], [[4, 5]]]}]
    for slots in ([4], [2, 2]):
        sim = _sim(tmp_path / str(len(slots)), requests, 1, 6, 2, slots)
        run = sim.generate(1, 3)
        for step in (1, 2):
            copies = _decode_copies(run, step)
            assert len(copies) == 2
            first, second = copies.iloc[0], copies.iloc[1]
            if len(slots) == 1:
                assert set(copies.device) == {0}
                assert second.start_ms == pytest.approx(first.end_ms)  # one link: one after the other
            else:
                assert set(copies.device) == {0, 1}
                assert second.start_ms == pytest.approx(first.start_ms)  # two links at once
                assert second.end_ms == pytest.approx(first.end_ms)


def test_a_copy_bound_decode_step_is_shorter_on_two_devices(tmp_path):
    rng = random.Random(1)
    L, E, k = 3, 8, 2
    tokens = [[sorted(rng.sample(range(E), k)) for _ in range(L)] for _ in range(6)]
    requests = [{"prefill": tokens[:1], "decode": tokens[1:]}]
    tpot = {}
    for slots in ([4], [2, 2]):
        run = _sim(tmp_path / str(len(slots)), requests, L, E, k, slots).generate(1, 6)
        tpot[len(slots)] = run.tpot_s
        assert run.phases["decode"]["misses"] == 5 * L * k  # on-demand: every use is a copy
    # by hand, per layer: attention + router 0.06, then one link: two copies 2 ms and the last expert
    # 0.1 ms; two links: both copies 1 ms at once, both experts 0.1 ms at once, the outputs back 0.01 ms
    assert tpot[1] == pytest.approx(L * 2.16 * MS)
    assert tpot[2] == pytest.approx(L * 1.17 * MS)
    assert tpot[2] < 0.6 * tpot[1]


def test_an_expert_on_another_device_waits_for_the_hidden_states(tmp_path):
    # a slow peer copy (3 ms, longer than the expert's copy): device 1's expert starts once the hidden
    # states crossed (router end + 3 ms, on a side stream), device 0's once its copy landed; join adds
    # the way back
    requests = [{"prefill": [[[0, 1]]], "decode": [[[2, 3]]]}]
    run = _sim(tmp_path, requests, 1, 6, 2, [2, 2], peer_s=3 * MS).generate(1, 2)
    df = pd.DataFrame(run.rows, columns=COLUMNS)
    experts = df[(df.kind == "expert") & (df.step == 1)].set_index("device")
    router_end = df[(df.kind == "router") & (df.step == 1)].end_ms.iloc[0]
    assert experts.loc[0].start_ms == pytest.approx(router_end + 1.0)
    assert experts.loc[1].start_ms == pytest.approx(router_end + 3.0)
    assert run.tpot_s == pytest.approx((0.06 + 3.0 + 0.1 + 3.0) * MS)


def test_assumptions_name_the_identical_links(tmp_path):
    requests = [{"prefill": [[[0, 1]]], "decode": [[[2, 3]]]}]
    assert _sim(tmp_path / "one", requests, 1, 6, 2, [4]).assumptions == []
    two = _sim(tmp_path / "two", requests, 1, 6, 2, [2, 2]).assumptions
    assert len(two) == 1 and "identical, independent links" in two[0] and "2 identical" in two[0]
    no_peer = _sim(tmp_path / "nopeer", requests, 1, 6, 2, [2, 2], peer_s=None).assumptions
    assert any("identical" in a for a in no_peer) and any("device-to-device" in a for a in no_peer)
    measured = _sim(tmp_path / "links", requests, 1, 6, 2, [2, 2], links=(2, 1.5 * MS))
    assert measured.assumptions == []
    assert measured.engine.copy_s == pytest.approx(1.5 * MS)  # the two-link figure, not the one-link one
    three = _sim(tmp_path / "three", requests, 1, 6, 2, [2, 2, 2], links=(2, 1.5 * MS))
    assert any("not 3" in a for a in three.assumptions) and three.engine.copy_s == pytest.approx(1 * MS)


def test_cpu_devices_cross_for_free_in_the_simulator(tmp_path):
    requests = [{"prefill": [[[0, 1]]], "decode": [[[2, 3]]]}]
    sim = _sim(tmp_path, requests, 1, 6, 2, [2, 2], peer_s=None, synchronous=True)
    assert sim.cal.peer_s(10**6) == 0.0 and not any("device-to-device" in a for a in sim.assumptions)
    run = sim.generate(1, 2)
    # synchronous: nothing overlaps, so two devices cost what one does: 2 copies + 2 experts + 0.06
    assert run.tpot_s == pytest.approx((2 * 1 + 2 * 0.1 + 0.06) * MS)


# -- 6. resolving the devices ---------------------------------------------------------------------------
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_gpus_on_a_cpu_only_machine_names_the_fix(no_cuda):
    with pytest.raises(DeviceError, match=r"--gpus 2 .*0 visible CUDA GPU.*use --device cpu"):
        resolve_devices(gpus=2)
    assert resolve_devices(gpus="auto") == [torch.device("cpu")]
    with pytest.raises(DeviceError, match="not both"):
        resolve_devices(devices="cpu,cpu", gpus=1)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(DeviceError, match="whole number"):
            resolve_devices(gpus=bad)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_devices(devices="cuda:0,cuda:1")


def test_gpus_auto_gives_the_cpu_here():
    expected = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else [torch.device("cpu")]
    assert resolve_devices(gpus="auto") == expected


def test_devices_by_name():
    assert resolve_devices(devices="cpu,cpu") == [torch.device("cpu")] * 2
    assert resolve_devices(devices=["cpu", "cpu", "cpu"]) == [torch.device("cpu")] * 3
    assert resolve_devices("cpu") == [torch.device("cpu")]
    for bad in ("", "cpu,", ",cpu", []):
        with pytest.raises(DeviceError, match="names no device"):
            resolve_devices(devices=bad)


def test_the_same_gpu_twice_and_mixed_devices_are_errors(monkeypatch):
    # resolve_device stood in for, so the checks run without a GPU
    monkeypatch.setattr(runtime_module, "resolve_device", lambda d: torch.device(d))
    with pytest.raises(DeviceError, match="names a GPU twice"):
        resolve_devices(devices="cuda:0,cuda:0")
    with pytest.raises(DeviceError, match="names a GPU twice"):
        resolve_devices(devices="cuda,cuda:0")  # bare cuda is cuda:0
    with pytest.raises(DeviceError, match="mixes the CPU and GPUs"):
        resolve_devices(devices="cpu,cuda:0")
    assert resolve_devices(devices="cuda:0,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]


@requires_cuda
def test_the_same_gpu_twice_is_an_error_on_cuda():
    with pytest.raises(DeviceError, match="names a GPU twice"):
        resolve_devices(devices="cuda:0,cuda:0")
    with pytest.raises(DeviceError, match="mixes the CPU and GPUs"):
        resolve_devices(devices="cuda:0,cpu")


# -- 7. the timeline ----------------------------------------------------------------------------------
def test_timeline_rows_carry_the_device_and_the_trace_a_process_per_device():
    tl = Timeline([torch.device("cpu"), torch.device("cpu")])
    tl.reset()
    tl.on_event(StepEvent("step_started", 0, "decode"))
    for device, expert in ((0, 1), (1, 2)):
        for edge in ("begin", "end"):
            tl.on_event(SpanEvent(edge, "copy", "h2d", 0, expert, 16, device=device))
    # two devices' copies may be open at once: each closes its own span
    tl.on_event(SpanEvent("begin", "compute", "expert", 0, 1, device=0))
    tl.on_event(SpanEvent("begin", "compute", "expert", 0, 2, device=1))
    tl.on_event(SpanEvent("end", "compute", "expert", 0, 1, device=0))
    tl.on_event(SpanEvent("end", "compute", "expert", 0, 2, device=1))
    df = tl.to_dataframe()
    assert list(df.columns) == COLUMNS and "device" in COLUMNS
    assert list(zip(df.kind, df.expert, df.device)) == [("h2d", 1, 0), ("h2d", 2, 1), ("expert", 1, 0), ("expert", 2, 1)]
    assert (df.end_ms >= df.start_ms).all() and df.end_ms.notna().all()
    trace = tl.to_chrome_trace()
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["pid"], e["tid"]) for e in xs] == [("h2d L0E1", 1, 2), ("h2d L0E2", 2, 2),
                                                            ("expert L0E1", 1, 1), ("expert L0E2", 2, 1)]
    processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "process_name"}
    assert processes == {1: "device 0", 2: "device 1"}
    threads = {(e["pid"], e["tid"]) for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {(2, 1), (2, 2)} <= threads


def test_one_device_trace_has_one_process():
    tl = Timeline(torch.device("cpu"))
    tl.reset()
    tl.on_event(SpanEvent("begin", "copy", "h2d", 0, 1, 16))
    tl.on_event(SpanEvent("end", "copy", "h2d", 0, 1, 16))
    trace = tl.to_chrome_trace()
    assert {e["pid"] for e in trace["traceEvents"]} == {1}
    assert not [e for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert list(tl.to_dataframe().device) == [0]


def test_runtime_trace_puts_device_1_under_pid_2(tiny):
    rt = duoserve_core.load(tiny.path, devices="cpu,cpu", quant="none", memory_budget=tiny.fixed + 3 * tiny.nb)
    rt.generate(prompt_ids=PROMPT, max_new_tokens=2, stop_at_eos=False)
    rows = rt.timeline.rows()
    trace = rt.timeline.to_chrome_trace()
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(rows)
    assert [e["pid"] for e in xs] == [r["device"] + 1 for r in rows]
    assert {e["pid"] for e in xs} == {1, 2}
    assert {e["name"].split()[0] for e in xs if e["pid"] == 2} == {"h2d", "expert"}

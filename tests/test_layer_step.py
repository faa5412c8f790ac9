"""One layer step for both executors: the real runtime (on the CPU, routing replayed from the bundled
trace) and the simulator make the same decisions, one by one, for every policy at several budgets.

Both run ``experts.layer_step.LayerStep``; what could still drift is what each feeds it (routing,
probabilities, the speculative gate's guesses, the order of events per step and layer). The
decisions are read the way every observer reads them: a ``CacheLog`` subscribed to each one's events.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import duoserve_core
from duoserve_core.bench import make_prompt
from duoserve_core.events import CacheEvent, EventBus
from duoserve_core.experts.layer_step import LayerStep
from duoserve_core.policy import PolicyKnobs
from duoserve_core.sim import Simulator, build_model, load_calibration
from duoserve_core.traces import RoutingReplay, read_trace
from lab.cache_log import CacheLog
from test_sim import fake_calibration

DATA = Path(__file__).resolve().parents[1] / "data"
TRACE = DATA / "traces" / "small-moe-heldout.parquet"
PREDICTOR = str(DATA / "predictors" / "small-moe-depth2.safetensors")
PROMPT, GEN, CONTEXT = 24, 6, 30

CONFIGS = {
    "on-demand": PolicyKnobs(policy="on-demand"),
    "lru-speculative": PolicyKnobs(policy="lru-speculative"),
    "lru": PolicyKnobs(policy="lru"),
    "per-layer-lru": PolicyKnobs(policy="per-layer-lru"),
    "uniform, predictor": PolicyKnobs(policy="uniform", predictor=PREDICTOR, predictor_threshold=0.3),
    "duoserve, predictor": PolicyKnobs(policy="duoserve", predictor=PREDICTOR, predictor_threshold=0.3),
    "duoserve, gate + predictor": PolicyKnobs(policy="duoserve", predictor=PREDICTOR, predictor_threshold=0.6,
                                              speculative_gate=True),
    "duoserve, gate, depth 3": PolicyKnobs(policy="duoserve", prefetch_depth=3, predictor_threshold=0.8,
                                           speculative_gate=True),
    "resident": PolicyKnobs(policy="resident"),  # needs every slot: 64 only
}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    runtime = duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", max_context=CONTEXT,
                                 routing_trace=TRACE)
    cal = load_calibration(fake_calibration(tmp_path_factory.mktemp("cal") / "cal.json", 8, 2, shape=dict(
        hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)))
    return runtime, cal, RoutingReplay(read_trace(TRACE), 8, 8, 2)


def decisions(target, run) -> tuple[list[tuple], dict]:
    """Every cache decision of two requests (the second warm, as a server's), in order."""
    log = CacheLog().attach(target)
    phases = []
    try:
        for _ in range(2):
            log.start()
            phases.append(run())
    finally:
        log.detach()
    df = log.to_dataframe()
    return list(df[["phase", "step", "at_layer", "layer", "expert", "event", "resident"]].itertuples(index=False)), phases


@pytest.mark.parametrize("slots", [3, 10, 24, 64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_runtime_and_simulator_make_the_same_decisions(both, name, slots):
    runtime, cal, replay = both
    knobs = CONFIGS[name]
    if name == "resident" and slots < 64:
        pytest.skip("resident holds every expert: only the 64-slot budget serves it")
    budget = runtime.plan.fixed_bytes + slots * runtime.format.nbytes
    runtime.configure(memory_budget=budget, knobs=knobs)
    prompt = [t % runtime.config.vocab_size for t in make_prompt(PROMPT)]
    real, real_phases = decisions(runtime, lambda: runtime.generate(prompt_ids=prompt, max_new_tokens=GEN,
                                                                    stop_at_eos=False).phases)
    model = build_model(DATA / "small-moe", quant="nf4", memory_budget=budget, max_context=CONTEXT, device_type="cpu")
    assert model.plan.num_slots == runtime.plan.num_slots == slots
    sim = Simulator(model, cal, replay, knobs, policy_time=False)
    simulated, sim_phases = decisions(sim, lambda: sim.generate(PROMPT, GEN).phases)
    assert len(real) > 0
    assert simulated == real
    for r, s in zip(real_phases, sim_phases):
        assert {k: s[k] for k in ("prefill", "decode")} == r
    kinds = {row[5] for row in real}
    if "duoserve" in name and slots == 64:
        assert "reclaim" in kinds  # the prefill window's released layers serve decode
    if name == "resident":
        assert kinds <= {"miss", "hit", "prefetch", "prefetch_hit"} and "evict" not in kinds
    if "gate" in name or "predictor" in name or name == "lru-speculative":
        assert "prefetch" in kinds or slots not in (10, 24)


def test_layer_step_order_on_a_hand_made_device():
    """Resident experts first, demand copies before the policy's prefetches, each expert read after
    ``wait_ready`` and released for copies by ``mark_read``, then the layer-done plan."""
    from duoserve_core.experts.cache import ExpertCache
    from duoserve_core.policy import Plan, Policy

    calls: list[tuple] = []

    class Engine:
        num_slots, store, device_of_slot = 3, type("S", (), {"record_bytes": 1})(), [0, 0, 0]

        def copy_in(self, slot, key):
            calls.append(("copy", key))

    class Device:
        counts = [0, 0, 1, 0, 1, 0, 0, 0]  # the tokens of top-k [[2, 4]]

        def wait_ready(self, slot):
            calls.append(("wait", slot))

        def compute(self, layer, expert, slot):
            calls.append(("compute", (layer, expert)))

        def mark_read(self, slot):
            calls.append(("read", slot))

    class Prefetching(Policy):
        def router_done(self, layer, topk, probs):
            return Plan(load=[(1, 5)])

        def layer_done(self, layer):
            calls.append(("layer_done", layer))
            return Plan()

    policy, events = Prefetching(), EventBus()
    cache = ExpertCache(Engine(), policy, 2, 8, events)
    policy.attach(cache)
    seen = []
    events.subscribe(lambda e: seen.append((e.kind, e.key)) if isinstance(e, CacheEvent) else None)
    cache.acquire((0, 4))
    cache.unpin((0, 4))
    calls.clear()
    LayerStep(cache, policy, events).run(0, torch.tensor([[2, 4]]), torch.zeros(1, 8), None, Device())
    assert calls == [("copy", (0, 2)), ("copy", (1, 5)),          # the demand copy, then the prefetch
                     ("wait", 0), ("compute", (0, 4)), ("read", 0),  # the resident expert first
                     ("wait", 1), ("compute", (0, 2)), ("read", 1), ("layer_done", 0)]
    assert seen[1:] == [("hit", (0, 4)), ("miss", (0, 2)), ("prefetch", (1, 5))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3])
def test_combine_sums_each_token_in_ascending_expert_order(dtype, k):
    """The same bits whatever order the router listed a token's experts in: for two experts because
    addition of two terms is commutative, from three on because the sum is sorted by expert."""
    from duoserve_core.experts.executor import combine

    torch.manual_seed(k)
    tokens, hidden, experts = 64, 32, 8
    top_idx = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    contrib = (torch.randn(tokens * k, hidden) * torch.logspace(-3, 3, hidden)).to(dtype)
    flipped = top_idx.flip(1)
    contrib_flipped = contrib.view(tokens, k, hidden).flip(1).reshape(tokens * k, hidden)
    assert torch.equal(combine(contrib, top_idx), combine(contrib_flipped, flipped))
    order = top_idx.argsort(dim=1)
    ascending = contrib.view(tokens, k, hidden).gather(1, order[:, :, None].expand(-1, -1, hidden))
    expected = ascending[:, 0]
    for j in range(1, k):
        expected = expected + ascending[:, j]
    assert torch.equal(combine(contrib, top_idx), expected)

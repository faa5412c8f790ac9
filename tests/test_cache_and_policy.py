"""The cache's bookkeeping: pinned experts are never evicted, the policy picks victims, all is counted."""

from __future__ import annotations

import torch

from duoserve_core.events import EventBus
from duoserve_core.experts.cache import ExpertCache
from duoserve_core.experts.host_store import HostExpertStore
from duoserve_core.experts.transfer import TransferEngine
from duoserve_core.policy import OnDemandPolicy, Plan, Policy, ResidentPolicy
from duoserve_core.timeline import Timeline


def _cache(policy, slots=3, layers=2, experts=4):
    store = HostExpertStore(layers, experts, 16, pin=False)
    for l in range(layers):
        for e in range(experts):
            store.record(l, e).fill_(10 * l + e)
    tl = Timeline(torch.device("cpu"))
    tl.reset()
    events = EventBus()
    events.subscribe(tl.on_event)
    engine = TransferEngine(store, slots, torch.device("cpu"), events)
    cache = ExpertCache(engine, policy, layers, experts, events)
    policy.attach(cache)
    return cache, engine, tl


def test_acquire_loads_on_miss_and_hits_after():
    cache, engine, _ = _cache(Policy())
    slot, hit = cache.acquire((0, 1))
    assert not hit and bool((engine.slot(slot) == 1).all())
    cache.unpin((0, 1))
    assert cache.acquire((0, 1)) == (slot, True)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.h2d_bytes) == (1, 1, 16)


def test_lru_victim_and_pins_respected():
    cache, engine, _ = _cache(Policy(), slots=3)
    for e in range(3):
        cache.acquire((0, e))
    for e in (1, 2, 0):  # 1 is now least recently used... but 0,1,2 are pinned
        cache.unpin((0, e))
    cache.acquire((0, 2))  # touch 2: order of last use is now 0, 1, 2
    cache.acquire((1, 0))  # evicts 0 (LRU among unpinned 0 and 1)
    assert not cache.is_resident((0, 0)) and cache.is_resident((0, 1)) and cache.is_resident((0, 2))
    assert cache.stats.evictions == 1
    slot = cache._slot_of[(1, 0)]
    assert bool((engine.slot(slot) == 10).all())


def test_prefetch_counts_hits_and_waste():
    cache, _, _ = _cache(Policy(), slots=2)
    assert cache.prefetch((1, 3))
    assert cache.prefetch((1, 2))
    assert not cache.prefetch((1, 2))  # already resident: no copy
    cache.acquire((1, 3))
    cache.unpin((1, 3))
    cache.acquire((0, 0))  # evicts (1, 2), a prefetch never used
    s = cache.stats
    assert (s.prefetches, s.prefetch_hits, s.prefetch_wasted, s.h2d_copies) == (2, 1, 1, 3)


def test_full_pinned_cache_refuses_prefetch():
    cache, _, _ = _cache(Policy(), slots=2)
    cache.acquire((0, 0))
    cache.acquire((0, 1))
    assert not cache.can_make_room() and not cache.prefetch((1, 1))


def test_on_demand_releases_the_layer_when_done():
    policy = OnDemandPolicy()
    cache, _, _ = _cache(policy, slots=4)
    cache.acquire((0, 1))
    cache.unpin((0, 1))
    cache.acquire((1, 2))
    cache.unpin((1, 2))
    plan = policy.layer_done(0)
    assert plan == Plan(release=[(0, 1)])


def test_resident_plans_every_expert_once():
    policy = ResidentPolicy()
    cache, _, _ = _cache(policy, slots=8)
    plan = policy.phase("prefill")
    assert len(plan.load) == 8
    for key in plan.load:
        cache.prefetch(key)
    assert policy.phase("decode").load == []


def test_timeline_records_copies_as_rows_and_chrome_events():
    cache, _, tl = _cache(Policy())
    cache.acquire((1, 2))
    df = tl.to_dataframe()
    assert list(df["kind"]) == ["h2d"] and df.iloc[0]["nbytes"] == 16 and df.iloc[0]["duration_ms"] >= 0
    trace = tl.to_chrome_trace()
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert xs[0]["name"] == "h2d L1E2" and xs[0]["tid"] == 2


def test_prefetch_never_evicts_what_the_policy_values_more():
    class Stubborn(Policy):
        def worth_replacing(self, victim, incoming):
            return incoming[0] == 1  # only layer-1 experts may push others out

    cache, _, _ = _cache(Stubborn(), slots=2)
    cache.acquire((0, 0))
    cache.acquire((0, 1))
    cache.unpin((0, 0))
    cache.unpin((0, 1))
    assert not cache.prefetch((0, 2)) and cache.stats.h2d_copies == 2
    assert cache.prefetch((1, 2)) and cache.stats.evictions == 1
    cache.acquire((0, 3))  # a demand miss evicts regardless
    assert cache.is_resident((0, 3))


def _decode_tokens(cache, policy, routing, gate_guess=None):
    """Drive ``policy`` through decode tokens as the executor does: router, gate guess, demand loads."""
    from duoserve_core.policy import Phase

    policy.phase(Phase.DECODE)
    for token in routing:
        for layer, experts in enumerate(token):
            topk = torch.tensor([experts])
            probs = torch.zeros(1, cache.num_experts).index_fill_(1, topk[0], 0.5)
            plans = [policy.router_done(layer, topk, probs)]
            if gate_guess is not None and layer + 1 < len(token):
                plans.append(policy.speculated(layer + 1, torch.tensor([gate_guess(layer + 1)])))
            for e in experts:
                cache.acquire((layer, e))
            for plan in plans:
                for key in plan.load:
                    cache.prefetch(key)
            for e in experts:
                cache.unpin((layer, e))


def test_duoserve_decode_cache_keeps_a_stable_set_across_tokens():
    """A token cycles through the layers; a cache smaller than its working set must not thrash.

    Each of 8 layers uses experts {0, 1} on every token except that layer 0..3 alternate the
    second expert, so 12 (layer, expert) pairs recur on every token and 8 more every other token.
    LRU keeps nothing across tokens here (it always evicts the pair needed next); duoserve's
    per-token usage counts keep the pairs that recur. Every layer uses expert 0 on every token, so
    each layer keeps at least that one (a layer's first hit saves a full copy; with the default copy
    slack its second saves none, so the policy need not keep both).
    """
    from duoserve_core.policy import DuoServePolicy

    layers, slots = 8, 14
    routing = [[[0, 1] if l >= 4 else [0, 2 + (t % 2)] for l in range(layers)] for t in range(40)]
    lru, _, _ = _cache(Policy(), slots=slots, layers=layers, experts=4)
    _decode_tokens(lru, lru.policy, routing)
    duo_policy = DuoServePolicy(speculative_gate=True, predictor_threshold=0.99)
    duo, _, _ = _cache(duo_policy, slots=slots, layers=layers, experts=4)
    # Guesses below the threshold are scored but not loaded; they must not outlive their layer.
    _decode_tokens(duo, duo_policy, routing, gate_guess=lambda layer: [3, 2])
    uses = 2 * layers * len(routing)
    assert lru.stats.hits == 0
    assert duo.stats.prefetches == 0
    # one recurring expert of every layer stays, after warm-up; at slack 0 every hit counts and more
    # of the 12 recurring pairs stay (14 slots, 2 pinned by the layer in progress)
    assert duo.stats.hits >= 7 * len(routing)
    greedy_policy = DuoServePolicy(predictor_threshold=0.99, copy_slack=0.0)
    greedy, _, _ = _cache(greedy_policy, slots=slots, layers=layers, experts=4)
    _decode_tokens(greedy, greedy_policy, routing)
    assert greedy.stats.hits >= 8 * len(routing)
    assert duo.stats.misses < uses / 2
    assert all(key[0] > layers - 1 for key in duo_policy.scores)  # guesses of finished layers dropped


class _Reclaiming(Policy):
    reclaims_released = True


def test_released_experts_are_reclaimed_while_their_slot_is_intact():
    cache, engine, _ = _cache(_Reclaiming(), slots=3, layers=2, experts=4)
    for e in (0, 1):
        slot, _ = cache.acquire((0, e))
        cache.unpin((0, e))
    cache.release((0, 0))
    cache.release((0, 1))
    assert not cache.is_resident((0, 0)) and cache.holds((0, 0))
    copies = cache.stats.h2d_copies
    cache.acquire((1, 0))                       # fills the slot that never held anything first
    cache.unpin((1, 0))
    assert cache.holds((0, 0)) and cache.holds((0, 1))
    slot, hit = cache.acquire((0, 1))           # taken back: no copy, its bytes are the expert's
    assert hit and cache.stats.h2d_copies == copies + 1 and cache.stats.reclaims == 1
    assert bool((engine.slot(slot) == 1).all())
    cache.unpin((0, 1))
    cache.acquire((1, 3))                       # the last free slot is (0, 0)'s: overwritten now
    assert not cache.holds((0, 0)) and cache.acquire((0, 0))[1] is False
    for key in ((1, 3), (0, 0)):
        cache.unpin(key)
    released = sorted(cache.resident())[0]
    cache.release(released)
    assert cache.holds(released)
    cache.empty()                               # nothing left, not even an intact released slot
    assert not cache.resident() and not any(cache.holds((l, e)) for l in range(2) for e in range(4))


def test_baselines_never_reclaim():
    cache, _, _ = _cache(OnDemandPolicy(), slots=3)
    cache.acquire((0, 2))
    cache.unpin((0, 2))
    cache.release((0, 2))
    assert not cache.holds((0, 2))
    assert cache.acquire((0, 2))[1] is False and cache.stats.reclaims == 0

"""The DuoServe schedulers: never change the tokens, bound prefill residency, and cut decode misses."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import duoserve_core
from duoserve_core.policy import DuoServePolicy
from duoserve_core.predict import PredictorError

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL, PREDICTOR = DATA / "small-moe", DATA / "predictors" / "small-moe-depth2.safetensors"
PROMPT = "Return the file system representation for path. If the object is a str or bytes object, then"


@pytest.fixture(scope="module")
def reference():
    rt = duoserve_core.load(MODEL, device="cpu", quant="nf4", policy="resident", max_context=128)
    return rt, rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)


def _load(reference_rt, slots, **kw):
    budget = reference_rt.plan.fixed_bytes + slots * reference_rt.format.nbytes
    return duoserve_core.load(MODEL, device="cpu", quant="nf4", memory_budget=budget, max_context=128, **kw)


def test_randomised_knobs_never_change_the_tokens(reference):
    rt0, expected = reference
    rng = random.Random(0)
    for _ in range(6):
        policy = rng.choice(["duoserve", "uniform"])
        slots = rng.choice([2, 3, 5, 9, 17, 64])
        depth, threshold = rng.choice([1, 2, 3]), rng.choice([0.05, 0.3, 0.9])
        rt = _load(rt0, slots, policy=policy, predictor=PREDICTOR, prefetch_depth=depth, predictor_threshold=threshold)
        got = rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
        assert got.tokens == expected.tokens, (policy, slots, depth, threshold)
        assert rt.plan.fixed_bytes + rt.plan.num_slots * rt.plan.expert_bytes <= rt.plan.budget_bytes


class _Watching(DuoServePolicy):
    """Records how many layers have experts resident whenever a layer finishes."""

    def layer_done(self, layer):
        if self.prefill:
            self.widest = max(getattr(self, "widest", 0), len({k[0] for k in self.cache.resident()}))
        return super().layer_done(layer)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefill_keeps_at_most_depth_layers_resident(reference, depth):
    rt0, _ = reference
    policy = _Watching(prefetch_depth=depth)
    rt = _load(rt0, 64, policy=policy)
    r = rt.generate(PROMPT, max_new_tokens=1)
    assert policy.widest <= depth
    assert r.phases["prefill"]["prefetches"] > 0
    assert r.phases["prefill"]["misses"] < 8  # nearly every expert arrived ahead of its layer


def test_a_budget_wider_than_the_window_keeps_the_prefill_experts_for_decode(reference):
    """The window releases each finished layer (at most ``depth`` live), but with every slot intact
    decode takes the experts back instead of copying them again."""
    rt0, expected = reference
    policy = _Watching(prefetch_depth=2)
    rt = _load(rt0, 64, policy=policy)
    got = rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert got.tokens == expected.tokens and policy.widest <= 2
    decode = got.phases["decode"]
    assert decode["misses"] == 0 and decode["h2d_copies"] == 0 and decode["reclaims"] > 0
    on_demand = _load(rt0, 64, policy="on-demand").generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert on_demand.phases["decode"]["reclaims"] == 0 and on_demand.phases["decode"]["misses"] > 0


def test_decode_prediction_cuts_misses(reference):
    rt0, expected = reference
    on_demand = _load(rt0, 16, policy="on-demand").generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    duo = _load(rt0, 16, policy="duoserve", predictor=PREDICTOR).generate(PROMPT, max_new_tokens=16,
                                                                          stop_at_eos=False)
    assert duo.phases["decode"]["misses"] < 0.6 * on_demand.phases["decode"]["misses"]
    assert duo.phases["decode"]["prefetch_hits"] > 0


def test_predictor_for_another_model_is_refused(tiny_checkpoint):
    with pytest.raises(PredictorError, match="layers"):
        duoserve_core.load(tiny_checkpoint, device="cpu", policy="duoserve", predictor=PREDICTOR)


def test_lru_speculative_prefetches_from_the_gate_and_keeps_tokens(reference):
    rt0, expected = reference
    rt = _load(rt0, 16, policy="lru-speculative")
    got = rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert got.tokens == expected.tokens
    d = got.phases["decode"]
    assert d["prefetches"] > 0 and d["prefetch_hits"] > 0.5 * d["prefetches"]  # the gate is right most of the time
    on_demand = _load(rt0, 16, policy="on-demand").generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert d["misses"] < on_demand.phases["decode"]["misses"]


def test_duoserve_with_the_speculative_gate(reference):
    rt0, expected = reference
    rt = _load(rt0, 16, policy="duoserve", predictor=PREDICTOR, predictor_threshold=0.6, speculative_gate=True)
    got = rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert got.tokens == expected.tokens and rt.policy.describe()["speculative_gate"]
    on_demand = _load(rt0, 16, policy="on-demand").generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert got.phases["decode"]["misses"] < 0.5 * on_demand.phases["decode"]["misses"]


def test_configure_swaps_budget_and_policy_without_changing_tokens(reference):
    rt0, expected = reference
    rt = _load(rt0, 16, policy="on-demand")
    store = rt.store
    for slots, policy, kw in ((4, "duoserve", dict(predictor=PREDICTOR, speculative_gate=True)),
                              (40, "lru-speculative", {}), (10, "uniform", dict(prefetch_depth=3))):
        rt.configure(memory_budget=rt0.plan.fixed_bytes + slots * rt0.format.nbytes, policy=policy, **kw)
        assert rt.plan.num_slots == slots and rt.engine.num_slots == slots and rt.policy.name == policy
        assert rt.store is store  # the host store is kept: no reload
        assert rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False).tokens == expected.tokens
    with pytest.raises(duoserve_core.errors.BudgetError):
        rt.configure(policy="resident")  # 10 slots cannot hold 64 experts
    assert rt.policy.name == "uniform" and rt.plan.num_slots == 10  # left as it was
    assert rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False).tokens == expected.tokens


def test_gate_guesses_are_scored_by_their_measured_precision(reference):
    """The gate's precision per layer and rank is counted from every token; the threshold then picks."""
    rt0, expected = reference
    rt = _load(rt0, 16, policy="duoserve", speculative_gate=True, predictor_threshold=0.99)
    got = rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    precision = rt.policy.gate_precision()
    L = rt.config.num_hidden_layers
    assert precision.shape == (L, 2) and ((precision > 0) & (precision < 1)).all()
    assert (precision[:L - 1, 0] > precision[:L - 1, 1]).float().mean() >= 0.5  # rank 1 guesses better, mostly
    assert got.tokens == expected.tokens and got.phases["decode"]["prefetches"] == 0  # nothing is 99% sure
    rt.configure(predictor_threshold=0.5)
    assert rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False).phases["decode"]["prefetches"] > 0


def test_empty_expert_cache_starts_the_next_request_cold(reference):
    rt0, expected = reference
    rt = _load(rt0, 64, policy="duoserve")
    rt.warm_up()  # a no-op on the CPU: nothing was generated, nothing is resident
    assert not rt.cache.resident() and rt.cache.stats.h2d_copies == 0
    rt.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    warm = rt.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    assert warm.phases["prefill"]["h2d_copies"] == 0           # everything still held
    rt.empty_expert_cache()
    cold = rt.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert cold.phases["prefill"]["reclaims"] == 0 and cold.phases["prefill"]["h2d_copies"] > 0
    assert cold.tokens == expected.tokens

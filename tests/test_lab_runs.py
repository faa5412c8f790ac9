"""Live runs and their cache log: every decision logged, and the log agrees with the runtime's counts."""

from __future__ import annotations

import pytest

from duoserve_core.experts.cache import ExpertCache
from lab.runs import BUNDLED, budget_bytes, describe_budget, device_note, live_run, model_choices, prompt_ids


@pytest.fixture(scope="module")
def run():
    return live_run(BUNDLED, policy="duoserve", slots=12, depth=2, threshold=0.4, gate=True, prompt_tokens=24,
                    new_tokens=8, device="cpu")


def test_the_budget_in_slots_gives_exactly_those_slots(run):
    assert run.slots == 12
    assert budget_bytes(BUNDLED, 12, "cpu", 256) == run.plan.budget_bytes
    assert "12 of 64 expert slots" in describe_budget(BUNDLED, 12, "cpu")


def test_cache_log_agrees_with_the_runtimes_counts(run):
    for phase in ("prefill", "decode"):
        mine, theirs = run.log.counts(phase), run.result.phases[phase]
        assert mine["miss"] == theirs["misses"]
        assert mine["hit"] + mine["prefetch_hit"] + mine["reclaim"] == theirs["hits"]
        assert mine["reclaim"] + mine["reclaim_ahead"] == theirs["reclaims"]
        assert mine["prefetch"] == theirs["prefetches"]
        assert mine["prefetch_hit"] == theirs["prefetch_hits"]
        assert mine["wasted"] == theirs["prefetch_wasted"]
        assert mine["evict"] == theirs["evictions"]
        assert mine["miss"] + mine["prefetch"] == theirs["h2d_copies"]
    assert 0 < run.log.peak_resident() <= run.slots
    assert run.log.peak_resident("prefill") <= 2 * 8  # the window: depth x experts per layer


def test_residency_replays_the_log(run):
    res = run.log.residency(8)
    df = run.log.to_dataframe()
    held = res[[f"L{l}" for l in range(8)]].sum(axis=1)
    assert (held.to_numpy() == df["resident"].to_numpy()).all()


def test_the_log_detaches_and_leaves_the_cache_as_it_was(run):
    assert run.runtime.cache.acquire.__func__ is ExpertCache.acquire
    assert "layer_started" not in vars(run.runtime.policy)


def test_bounds_and_tokens(run):
    reference = live_run(BUNDLED, policy="resident", slots=64, prompt_tokens=24, new_tokens=8, device="cpu")
    assert run.result.tokens == reference.result.tokens
    phases = run.result.phases
    assert run.bounds["oracle_total_loads"] <= phases["prefill"]["h2d_copies"] + phases["decode"]["h2d_copies"]
    assert run.decode_tokens == 7 and run.timeline["phase"].isin(["prefill", "decode"]).all()
    assert run.label() == "duoserve, 12 slots, depth 2, threshold 0.40, gate"


def test_models_and_prompts():
    assert list(model_choices("cpu").values()) == [BUNDLED]
    note = device_note("cpu")   # device-neutral: the committed measurements are from more than one GPU
    assert "committed GPU measurements" in note and "H100" not in note
    assert len(model_choices("cuda")) == 2
    ids = prompt_ids(40)
    assert len(ids) == 40 and max(ids) < 4096 and prompt_ids(10, offset=5) == ids[5:15]


def test_runs_share_one_model_and_keep_their_own_plan(run):
    """Runs reconfigure one loaded model; each keeps its plan, and counts equal a fresh load's."""
    import duoserve_core
    from lab.runs import BUNDLED_PREDICTOR, shared_runtime

    other = live_run(BUNDLED, policy="on-demand", slots=20, prompt_tokens=24, new_tokens=8, device="cpu")
    assert other.runtime is run.runtime is shared_runtime(BUNDLED, "cpu", 256)
    assert (run.slots, other.slots) == (12, 20)
    fresh = duoserve_core.load(BUNDLED.model, device="cpu", quant="nf4", max_context=256, policy="duoserve",
                               memory_budget=budget_bytes(BUNDLED, 12, "cpu", 256), predictor=BUNDLED_PREDICTOR,
                               prefetch_depth=2, predictor_threshold=0.4, speculative_gate=True)
    result = fresh.generate(prompt_ids=prompt_ids(24), max_new_tokens=8, stop_at_eos=False)
    assert result.phases == run.result.phases and result.tokens == run.result.tokens

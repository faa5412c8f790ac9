"""The bundled small MoE: loads through the same path as any checkpoint, speaks, routes with structure."""

from __future__ import annotations

from pathlib import Path

import pytest

import duoserve_core
from duoserve_core.traces import read_trace
from lab.routing_stats import load_balance, random_repeat_rates, repeat_rates

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL, TRACE = DATA / "small-moe", DATA / "traces" / "small-moe-heldout.parquet"


@pytest.fixture(scope="module")
def resident():
    return duoserve_core.load(MODEL, device="cpu", quant="nf4", policy="resident", max_context=128)


def test_bundled_model_fits_the_size_limit():
    size = sum(f.stat().st_size for f in MODEL.iterdir())
    assert size <= 30 * 2**20


def test_generates_text_and_schedules_do_not_change_it(resident):
    prompt = "The following functions are available"
    expected = resident.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    assert expected.text and len(expected.tokens) == 12
    tight = resident.plan.fixed_bytes + 2 * resident.format.nbytes
    small = duoserve_core.load(MODEL, device="cpu", quant="nf4", memory_budget=tight, max_context=128)
    got = small.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    assert got.tokens == expected.tokens and got.expert_misses > 0


def test_shipped_trace_belongs_to_the_model_and_has_learned_structure(resident):
    trace = read_trace(TRACE)
    c = resident.config
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (
        c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok)
    assert set(trace.df["phase"]) == {"prefill", "decode"}
    rand_first, _ = random_repeat_rates(c.num_local_experts, c.num_experts_per_tok)
    rates = repeat_rates(trace)
    assert rates["first_choice_repeat"].max() > 1.5 * rand_first  # learned routing repeats, random does not
    assert load_balance(trace).min(axis=1).min() > 0  # every expert is used at every layer

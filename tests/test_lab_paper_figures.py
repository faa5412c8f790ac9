"""lab.paper_figures: committed H100 results read as they are, simulated comparisons labelled, figures with bounds."""

from __future__ import annotations

import json

import pytest

from duoserve_core.errors import BudgetError
from lab import paper_figures as pf


def test_measured_figures_come_from_the_committed_file():
    comp = pf.load_measured("bench_h100_8x7b_synth.json")
    record = json.loads((pf.RESULTS / "bench_h100_8x7b_synth.json").read_text())
    assert comp.kind == "measured" and "H100" in comp.source and "bench_h100_8x7b_synth.json" in comp.source
    assert list(comp.table["policy"]) == ["duoserve", "uniform", "on-demand", "lru-speculative"]
    for name, r in record["results"].items():
        row = comp.row(name)
        assert row["ttft_s"] == r["ttft_s"] and row["e2e_s"] == r["e2e_s"]
        assert row["oracle_tpot_s"] == r["bounds"]["oracle_tpot_s"]
    assert "resident" in comp.skipped
    # the speed-ups are the file's own
    s = pf.speedups(comp)
    for name, r in record["results"].items():
        if name != "duoserve":
            assert s.loc[name, "duoserve speed-up, E2E"] == pytest.approx(r["duoserve_speedup_e2e"], abs=0.01)
    peer_row = [i for i in s.index if i.startswith(pf.PEER)]
    assert s.loc[peer_row[0], "duoserve speed-up, E2E"] == pytest.approx(record["peer"]["duoserve_speedup_e2e"], abs=0.01)


def test_superseded_file_is_refused():
    with pytest.raises(ValueError, match="before a fix"):
        pf.load_measured("bench_h100_8x7b_trace_predictor.json")


def test_comparison_figure_draws_bounds_peer_and_log_axes():
    comp = pf.load_measured("bench_h100_8x7b_trace_gate.json")
    fig = pf.comparison_figure(comp)
    assert len(fig.data) == 4
    assert list(fig.data[0].x)[-1] == f"{pf.PEER}*"
    labels = {a.text for a in fig.layout.annotations}
    assert {"transfer floor", "compute floor", "oracle (Belady)", "budget"} <= labels
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis4.type != "log"
    b = pf.bounds_of(comp)
    duo = comp.row("duoserve")
    assert b["ttft_s"]["transfer floor"] == duo["transfer_floor_s"]
    assert b["e2e_s"]["floor + oracle"] == pytest.approx(duo["ttft_floor_s"] + duo["decode_tokens"] * duo["oracle_tpot_s"])
    assert "H100" in fig.layout.title.text


def test_simulated_is_labelled_and_close_to_the_measured_run():
    sim = pf.simulated("mixtral-8x7b", 15, 2, 0.8, ("duoserve", "on-demand", "resident"), gen=32)
    assert sim.kind == "simulated" and sim.source.startswith(pf.SIMULATED) and "extrapolated" not in sim.source
    assert "resident" in sim.skipped
    measured = pf.load_measured("bench_h100_8x7b_trace_gate.json")
    for policy in ("duoserve", "on-demand"):
        assert int(sim.row(policy)["slots"]) == int(measured.row(policy)["slots"]) == 21
        assert sim.row(policy)["ttft_s"] == pytest.approx(measured.row(policy)["ttft_s"], rel=0.15)
    assert sim.row("duoserve")["ttft_s"] < sim.row("on-demand")["ttft_s"]
    assert "simulated" in pf.comparison_figure(sim).layout.title.text


def test_8x22b_runs_on_a_scaled_calibration_and_says_so():
    model, cal, _, note = pf.sim_setup("mixtral-8x22b", 15, 96)
    assert "extrapolation" in note
    cal.check(model.config, "nf4", "nf4")
    base = pf.load_calibration(pf.CALIBRATION)
    assert cal.expert_s("nf4", 1) == pytest.approx(base.expert_s("nf4", 1) * 6144 * 16384 / (4096 * 14336))
    assert cal.copy_s(model.format.nbytes) > base.copy_s(99090432)
    sim = pf.simulated("mixtral-8x22b", 15, 2, 0.8, ("on-demand",), prompt_len=64, gen=4)
    assert "extrapolated" in sim.source and sim.row("on-demand")["total_experts"] == 56 * 8


def test_budget_sweeps_rows():
    rows = pf.reference_sweep("mixtral-8x7b", requests=1, prompt_len=64, gen=8)
    assert {r["policy"] for r in rows} == {"belady", "lru", "per-layer-lru", "lfu"}
    pol = pf.policy_sweep("mixtral-8x7b", (15, 40), policies=("on-demand", "duoserve"), prompt_len=64, gen=8)
    assert len(pol) == 4 and all(0 <= r["hit_rate"] <= 1 for r in pol)
    assert all(r["hit_rate"] == 0 for r in pol if r["policy"] == "on-demand")
    with pytest.raises(BudgetError):
        pf.simulated("mixtral-8x7b", 1, policies=("on-demand",), gen=4)


def test_live_bench_refuses_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="CUDA"):
        pf.live_bench()
    args, argv = pf.live_args(15, 2, 0.8)
    assert args.memory_budget == "15%" and args.quant_attention == "nf4" and args.repeats == 1

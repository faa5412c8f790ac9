"""lab.paper_figures: committed GPU measurements read as they are and labelled with their device and date,
simulated comparisons labelled with the calibration's device, figures with bounds."""

from __future__ import annotations

import json

import pytest

from duoserve_core.errors import BudgetError
from lab import paper_figures as pf


def test_measured_files_are_labelled_with_their_own_device_and_date():
    assert pf.MEASURED_DEFAULT == "bench_h200_8x7b_trace_gate.json" == list(pf.MEASURED_FILES.values())[0]
    assert set(pf.MEASURED_FILES.values()) == {
        "bench_h200_8x7b_trace_gate.json", "bench_h200_8x7b_synth.json", "bench_h200_8x7b_trace_predictor.json",
        "bench_h200_8x22b_trace_gate_repeats.json", "bench_h100_8x7b_trace_gate.json", "bench_h100_8x7b_synth.json"}
    assert not set(pf.MEASURED_FILES.values()) & set(pf.SUPERSEDED)
    for label, file in pf.MEASURED_FILES.items():
        record = json.loads((pf.RESULTS / file).read_text())
        short = pf.device_short(record["device"])
        assert label.startswith(f"{short}, {record['date']}") and label.endswith(f"({file})"), label
        assert ("before the stale-score fix" in label) == (short == "H100"), label
        comp = pf.load_measured(file)
        assert comp.source == f"measured on {record['device']}, {record['date']} ({file})"
        assert set(comp.table["policy"]) == set(record["results"])
    assert pf.device_short("NVIDIA H100 80GB HBM3") == "H100" and pf.device_short("NVIDIA H200") == "H200"


def test_simulated_label_names_the_calibrations_device():
    cal = json.loads(pf.CALIBRATION.read_text())
    assert pf.CALIBRATION.name == "h200_mixtral-8x7b_nf4_2026-12-01.json" and cal["device"] == "NVIDIA H200"
    assert pf.SIMULATED == "simulated (H200 calibration)"
    assert "H100" not in pf.source_note("cpu") and pf.SIMULATED in pf.source_note("cpu")
    assert pf.CALIBRATION.name in pf.source_note("cpu") and pf.MEASURED_DEFAULT in pf.source_note("cpu")
    assert "the H200 calibration, 2026-12-01, measured at this shape" in pf.knob_note("mixtral-8x7b", 15, 64, 8)


def test_measured_figures_come_from_the_committed_file():
    comp = pf.load_measured("bench_h200_8x7b_synth.json")
    record = json.loads((pf.RESULTS / "bench_h200_8x7b_synth.json").read_text())
    assert comp.kind == "measured" and "NVIDIA H200, 2026-11-29" in comp.source
    assert "bench_h200_8x7b_synth.json" in comp.source
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
    with pytest.raises(ValueError, match="before a fix; superseded by bench_h200_8x7b_trace_predictor.json"):
        pf.load_measured("bench_h100_8x7b_trace_predictor.json")


def test_files_with_two_policies_and_no_peer_still_draw():
    comp = pf.load_measured("bench_h200_8x22b_trace_gate_repeats.json")
    assert list(comp.table["policy"]) == ["duoserve", "uniform"] and comp.peer is None
    assert int(comp.row("duoserve")["total_experts"]) == 56 * 8
    fig = pf.comparison_figure(comp, highlight="on-demand")   # a policy this file did not run
    assert len(fig.data) == 4 and list(fig.data[0].x) == ["duoserve", "uniform"]
    assert fig.layout.yaxis.type != "log" and "NVIDIA H200, 2026-11-29" in fig.layout.title.text
    assert pf.bounds_of(comp, "on-demand")["tpot_s"]["oracle (Belady)"] == comp.row("duoserve")["oracle_tpot_s"]
    assert list(pf.summary_table(comp).index) == ["duoserve", "uniform"]
    missing = pf.speedups(comp, "on-demand")
    assert list(missing.columns) == ["note"] and "on-demand did not run" in missing.iloc[0]["note"]
    s = pf.speedups(comp)
    assert list(s.index) == ["uniform"]
    assert s.loc["uniform", "duoserve speed-up, E2E"] == pytest.approx(
        comp.row("uniform")["e2e_s"] / comp.row("duoserve")["e2e_s"], abs=0.01)


def test_comparison_figure_draws_bounds_peer_and_log_axes():
    comp = pf.load_measured("bench_h200_8x7b_trace_gate.json")
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
    assert "NVIDIA H200, 2026-11-29" in fig.layout.title.text and "bench_h200_8x7b_trace_gate.json" in fig.layout.title.text
    h100 = pf.comparison_figure(pf.load_measured("bench_h100_8x7b_trace_gate.json"))
    assert "NVIDIA H100 80GB HBM3, 2026-11-23" in h100.layout.title.text


def test_simulated_is_labelled_and_close_to_the_measured_run():
    sim = pf.simulated("mixtral-8x7b", 15, 2, 0.8, ("duoserve", "on-demand", "resident"), gen=32)
    assert sim.kind == "simulated" and sim.source.startswith(pf.SIMULATED) and "extrapolated" not in sim.source
    assert "resident" in sim.skipped
    measured = pf.load_measured("bench_h200_8x7b_trace_gate.json")
    for policy in ("duoserve", "on-demand"):
        assert int(sim.row(policy)["slots"]) == int(measured.row(policy)["slots"]) == 21
        assert sim.row(policy)["ttft_s"] == pytest.approx(measured.row(policy)["ttft_s"], rel=0.15)
    assert sim.row("duoserve")["ttft_s"] < sim.row("on-demand")["ttft_s"]
    assert "simulated (H200 calibration)" in pf.comparison_figure(sim).layout.title.text


def test_8x22b_runs_on_a_scaled_calibration_and_says_so():
    model, cal, _, note = pf.sim_setup("mixtral-8x22b", 15, 96)
    assert "extrapolation" in note and "the H200 calibration, 2026-12-01, of Mixtral-8x7B" in note
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
    setup = pf._live_setup()  # the committed trace-gate run's setting
    assert setup.attention_quant == "nf4" and setup.routing_trace == str(pf.TRACE) and setup.device == "cuda"

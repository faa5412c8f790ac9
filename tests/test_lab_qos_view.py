"""lab.qos_view: batched serving on the simulator and the runtime, read as the bench reads it; figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import duoserve_core
from duoserve_core.sim import qos
from lab import qos_view as qv

DATA = Path(__file__).resolve().parents[1] / "data"


def test_the_committed_h200_measurements_are_read_from_their_files():
    batches = qv.measured_batches()
    assert set(batches["policy"]) == {"on-demand", "lru", "duoserve"}
    assert sorted(set(batches["max_batch"])) == [1, 4, 16, 64]
    assert set(batches["label"]) == {"measured H200, 2026-11-30, 32 tokens", "measured H200, 2026-12-01, 128 tokens",
                                     "measured H200, 2026-12-01, 128 tokens, CUDA graphs",
                                     "measured H200, 2026-12-01, 128 tokens, CUDA graphs, CPU lane auto",
                                     "measured H200, 2026-12-01, 128 tokens, CUDA graphs, int4",
                                     "measured H200, 2026-12-01, 128 tokens, CUDA graphs, int4, CPU lane auto",
                                     # the same two after the CPU lane's hang was fixed (docs/cpu_lane.md)
                                     "measured H200, 2026-12-02, 128 tokens, CUDA graphs, int4",
                                     "measured H200, 2026-12-02, 128 tokens, CUDA graphs, int4, CPU lane auto"}
    for date, suffix in [("2026-12-01", "CPU lane auto"), ("2026-12-01", "int4"), ("2026-12-01", "int4, CPU lane auto"),
                         ("2026-12-02", "int4"), ("2026-12-02", "int4, CPU lane auto")]:
        # the CPU lane's runs and their int4 match: duoserve, B 1-16
        lane = batches[batches["label"] == f"measured H200, {date}, 128 tokens, CUDA graphs, {suffix}"]
        assert set(lane["policy"]) == {"duoserve"} and sorted(lane["max_batch"]) == [1, 4, 16], suffix
    assert set(batches.loc[batches["gen"] == 128, "policy"]) == set(qv.MEASURED_POLICIES) and set(batches["gen"]) == {32, 128}
    # the copy floor bounds what copies allow; the CPU lane computes some experts without a copy, so it may pass it
    # (2026-12-02, batch 4: 1.13 of it)
    copied_only = ~batches["label"].str.contains("CPU lane")
    assert (batches.loc[copied_only, "decode_tokens_per_s"] < batches.loc[copied_only, "copy_floor_tokens_per_s"]).all()
    lane_fix = batches[batches["label"] == "measured H200, 2026-12-02, 128 tokens, CUDA graphs, int4, CPU lane auto"]
    assert (lane_fix["decode_tokens_per_s"] > lane_fix["copy_floor_tokens_per_s"]).any()
    arrivals = qv.measured_arrivals()
    assert sorted(set(arrivals["arrival_rate"])) == [0.1, 0.2, 0.3, 0.5, 1.0, 2.0] and set(arrivals["max_batch"]) == {16}
    assert arrivals["label"].iloc[0] == "measured H200, 2026-11-30, 32 tokens (max batch 16, 16 requests, prefill-first)"
    assert (arrivals["ttft_p99_s"] >= arrivals["ttft_p50_s"]).all()
    assert set(arrivals["file"]) == set(qv.MEASURED_ARRIVALS)  # the warmed 2026-12-01 run after the attention fix
    assert "measured H200, 2026-12-01, 32 tokens (max batch 16, 12 requests, mixed)" in set(arrivals["label"])
    graphs = arrivals[arrivals["label"] == "measured H200, 2026-12-01, 32 tokens, CUDA graphs (max batch 16, 24 requests, mixed)"]
    assert set(graphs["policy"]) == set(qv.MEASURED_POLICIES) and len(graphs) == 9  # two files, one label
    long = arrivals[arrivals["label"] == "measured H200, 2026-12-01, 128 tokens, CUDA graphs (max batch 16, 12 requests, mixed)"]
    # rates 128-token requests sustain, the three policies on one machine: one point per policy and rate
    assert set(long["policy"]) == set(qv.MEASURED_POLICIES) and len(long) == 9
    assert long.groupby("policy")["arrival_rate"].apply(sorted).tolist() == [[0.1, 0.2, 0.3]] * 3


def test_the_budget_rule_adds_kv_caches_and_keeps_the_slots():
    rows = qv.budget_rows(15, (1, 4))
    assert list(rows["expert slots"]) == ["21 of 256"] * 2
    assert rows.loc[1, "KV caches added"] == "0 B" and rows.loc[4, "budget (% of the model)"] > 15


def test_simulated_throughput_grows_with_the_batch_and_reads_like_the_bench():
    rows = qv.simulated_batches(("on-demand",), 15, (1, 4), 4)
    one, four = rows.iloc[0], rows.iloc[1]
    assert (one["max_batch"], four["max_batch"]) == (1, 4) and one["slots"] == four["slots"] == 21
    assert four["decode_tokens_per_s"] > one["decode_tokens_per_s"] and four["mean_batch"] == 4
    assert one["experts_per_decode_step"] == 64  # top-2 of 32 layers, one token a step
    assert 0.5 < one["decode_tokens_per_s"] / one["copy_floor_tokens_per_s"] < 1.5
    assert one["ttft_p50_s"] <= one["ttft_p99_s"] and four["tpot_p50_s"] <= four["tpot_p99_s"]
    skipped = qv.simulated_batches(("on-demand",), 1, (1,), 4)
    assert "too small" in skipped["skipped"].iloc[0] and "on-demand at batch 1" in qv.skipped(skipped)


def test_simulated_arrivals_queue_fill_the_batch_and_recount_slos():
    runs = qv.simulated_arrivals(("on-demand",), 15, (0.5, 50.0), 4, 4, max_batch=2)
    slow, fast = runs[("on-demand", 0.5)], runs[("on-demand", 50.0)]
    assert len(slow["records"]) == len(fast["records"]) == 4
    assert slow["mean_batch"] <= fast["mean_batch"] <= 2
    assert max(r["queued_s"] for r in fast["records"]) > max(r["queued_s"] for r in slow["records"])
    table = qv.arrival_table(runs, slo_ttft_s=None, slo_tpot_s=None)
    assert list(table["arrival_rate"]) == [0.5, 50.0] and (table["slo_attainment"] == 1).all()
    assert (qv.arrival_table(runs, 1e-6, None)["slo_attainment"] == 0).all()
    s = qos.summarize(fast["records"])
    assert table["ttft_p99_s"].iloc[1] == s["ttft_s"]["p99"]
    with pytest.raises(duoserve_core.errors.BudgetError, match="no chosen policy"):
        qv.arrival_table(qv.simulated_arrivals(("on-demand",), 1, (1.0,), 2, 4, 2))


def test_the_live_path_runs_the_bench_on_a_runtime_and_its_copy_floor_is_the_benchs():
    """The GPU path, on the CPU with the bundled model: bench.batch_rows' rows and arrivals' records."""
    rt = duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", memory_budget="6slots", max_context=40)
    rows = qv.live_batches(rt, ("on-demand",), 95, (1, 2), 4, prompt_len=8)
    assert list(rows["max_batch"]) == [1, 2] and (rows["decode_tokens_per_s"] > 0).all()
    runs = qv.live_arrivals(rt, ("on-demand", "duoserve"), 95, (20.0,), 3, 4, max_batch=2, prompt_len=8)
    table = qv.arrival_table(runs)
    assert list(table["policy"]) == ["on-demand", "duoserve"] and (table["mean_batch"] <= 2).all()
    assert all(len(r["records"]) == 3 for r in runs.values())


def test_figures_tables_and_labels():
    rows = qv.simulated_batches(("on-demand", "duoserve"), 15, (1, 4), 4)
    measured = qv.measured_batches()
    fig = qv.throughput_figure(rows, qv.SIMULATED, measured)
    names = [t.name for t in fig.data]
    assert "duoserve, measured H200, 2026-11-30, 32 tokens" in names and "duoserve copy floor" in names
    long = next(t for t in fig.data if t.name == "duoserve, measured H200, 2026-12-01, 128 tokens")
    assert list(long.x) == [64, 16, 4, 1] and long.marker.symbol == "square"  # its own run, its own shape
    graphs = next(t for t in fig.data if t.name == "duoserve, measured H200, 2026-12-01, 128 tokens, CUDA graphs")
    # the graphs rows of two runs that day (batch 64, then 1-16 with the slot graphs): one label, one shape
    assert sorted(graphs.x) == [1, 4, 16, 64] and graphs.marker.symbol not in ("square", long.marker.symbol)
    assert qv.SIMULATED in fig.layout.title.text and fig.layout.xaxis.type == "log"
    table = qv.batch_table(rows, measured)
    first = measured[measured["label"].str.endswith("32 tokens")]
    assert table.loc[("duoserve", 1), "measured H200, 2026-11-30, 32 tokens: decode tokens/s"] == pytest.approx(
        first.set_index(["policy", "max_batch"]).loc[("duoserve", 1), "decode_tokens_per_s"], abs=0.01)
    runs = qv.simulated_arrivals(("on-demand",), 15, (0.5, 1.0), 4, 4, 2)
    arrivals = qv.arrival_table(runs, 2.0, 0.5)
    fig = qv.latency_figure(arrivals, "measured on X", 2, qv.measured_arrivals())
    # 2 panels, each: the p50 and p99 lines, and p50 and p99 markers of each of on-demand's four measured runs
    assert "measured on X" in fig.layout.title.text and len(fig.data) == 2 * (2 + 2 * 4)
    assert {t.marker.symbol for t in fig.data if t.mode == "markers"} == {"circle", "circle-open", "square", "square-open",
                                                                        "diamond", "diamond-open", "triangle-up",
                                                                        "triangle-up-open"}
    fig = qv.attainment_figure(arrivals, qv.SIMULATED, slo_ttft_ms=2000, slo_tpot_ms=500, max_batch=2)
    assert len(fig.data) == 1 and list(fig.data[0].x) == [0.5, 1.0]
    fig = qv.requests_figure(runs, 1.0, qv.SIMULATED)
    assert len(fig.data) == 3 and len(fig.data[0].y) == 4 and fig.layout.xaxis.title.text == "time (s)"
    assert list(qv.percentile_table(arrivals).columns)[0] == "mean batch"
    assert qv.source_label("cpu") == qv.SIMULATED


def test_list_knobs_parse():
    assert qv.parse_numbers("16, 1 ,4,4", int) == (1, 4, 16) and qv.parse_numbers("0.5;2") == (0.5, 2.0)
    for bad in ("", "0, 1", "a"):
        with pytest.raises(ValueError):
            qv.parse_numbers(bad)
    assert isinstance(qv.measured_batches(Path("/nonexistent")), pd.DataFrame)


def test_a_measured_runs_label_names_what_changes_its_curve():
    """Graphs (by the record's resolved ``cuda_graphs``, or the flag in files from before that key), a
    format other than NF4 and the CPU lane each make another curve, and the label says which."""
    base = {"device": "NVIDIA H200", "date": "2026-12-02",
            "command": "python -m duoserve_core.bench --quant int4 --quant-attention nf4 --gen 128 --cpu-experts auto"}
    assert qv._measured_label({**base, "cuda_graphs": True}) == \
        "measured H200, 2026-12-02, 128 tokens, CUDA graphs, int4, CPU lane auto"
    plain = {**base, "command": "python -m duoserve_core.bench --quant nf4 --quant-attention int4 --cpu-experts off"}
    assert qv._measured_label(plain) == f"measured H200, 2026-12-02, {qv.bench_default_gen()} tokens"

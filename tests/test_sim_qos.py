"""Arrivals, FCFS queueing and SLO attainment, on hand-made timings."""

from __future__ import annotations

import pytest

from duoserve_core.sim import Simulator
from duoserve_core.sim.qos import (WorkloadError, load_sweep, make_requests, poisson_arrivals, request_lengths,
                                   serve, summarize)
from duoserve_core.traces import read_trace
from test_sim import MS, setup


def test_poisson_arrivals_are_seeded_sorted_and_at_the_rate():
    a = poisson_arrivals(10.0, 2000, seed=1)
    assert a == poisson_arrivals(10.0, 2000, seed=1) and a != poisson_arrivals(10.0, 2000, seed=2)
    assert a[0] == 0 and a == sorted(a)
    assert 2000 / a[-1] == pytest.approx(10.0, rel=0.1)
    with pytest.raises(WorkloadError):
        poisson_arrivals(0, 5)
    with pytest.raises(WorkloadError):
        make_requests([1.0, 0.5], [(4, 2)])


def test_fcfs_queueing_by_hand(tmp_path):
    # on-demand, one layer, top-1: every token takes 1.16 ms (see test_sim), so a 1-token prompt with 3
    # new tokens is busy 3 x 1.16 ms. Two requests at t=0: the second waits for the first.
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]], [[0]]]}], 1, 2, 1)
    lengths = request_lengths(read_trace(tmp_path / "t.parquet"))
    assert lengths == [(1, 3)]
    sim = Simulator(model, cal, replay, "on-demand", record_timeline=False, policy_time=False)
    records = serve(sim, make_requests([0.0, 0.0, 1.0], lengths))
    busy = 3 * 1.16 * MS
    assert records[0]["ttft_s"] == pytest.approx(1.16 * MS)
    assert records[1]["queued_s"] == pytest.approx(busy) and records[1]["ttft_s"] == pytest.approx(busy + 1.16 * MS)
    assert records[2]["queued_s"] == 0  # arrives long after the queue drained
    s = summarize(records, slo_ttft_s=2 * MS, slo_tpot_s=1.2 * MS)
    assert s["slo_attainment"] == pytest.approx(2 / 3)
    assert s["ttft_s"]["p50"] == pytest.approx(1.16 * MS) and s["tpot_s"]["p99"] == pytest.approx(1.16 * MS)
    assert summarize(records, slo_tpot_s=1.0 * MS)["slo_attainment"] == 0


def test_load_sweep_attainment_falls_with_load(tmp_path):
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]], [[0]]]}], 1, 2, 1)
    lengths = request_lengths(read_trace(tmp_path / "t.parquet"))
    rows = load_sweep(lambda p: Simulator(model, cal, replay, p, record_timeline=False, policy_time=False),
                      ["on-demand", "lru-speculative"], lengths, [0.01, 100000.0], 30, slo_ttft_s=2 * MS)
    by = {(r["policy"], r["arrival_rate"]): r["slo_attainment"] for r in rows}
    assert by[("on-demand", 0.01)] == 1.0 and by[("on-demand", 100000.0)] < 0.2

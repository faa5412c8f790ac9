"""lab.qos_view: the queue over service times is qos.serve's; sweeps and figures."""

from __future__ import annotations

import pytest

from duoserve_core.sim import Simulator, qos
from lab import paper_figures as pf
from lab import qos_view as qv

ARGS = ("mixtral-8x7b", "on-demand", 15.0, 2, 0.8, 4, None, 4)


def test_serve_from_service_times_equals_qos_serve():
    service = qv.service_runs(*ARGS)
    arrivals = [0.0, 0.1, 5.0, 5.05]
    lengths = qos.request_lengths(pf._trace())
    requests = qos.make_requests(arrivals, lengths, None, 4)
    model, cal, replay, _ = pf.sim_setup("mixtral-8x7b", 15.0, max(r.prompt_tokens + r.new_tokens for r in requests))
    sim = Simulator(model, cal, replay, "on-demand", record_timeline=False, policy_time=False)
    expected = qos.serve(sim, requests)
    got = qv.serve(service, arrivals)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for key in e:
            assert g[key] == pytest.approx(e[key]), key


def test_load_sweep_attainment_falls_and_latency_rises_with_load():
    services = {"on-demand": qv.service_runs(*ARGS)}
    rates = qv.default_rates(services, points=4, up_to=3.0)
    assert rates == sorted(rates) and rates[-1] > qv.capacity(services["on-demand"])
    sweep = qv.load_sweep(services, rates, slo_ttft_s=10.0, slo_tpot_s=10.0)
    assert list(sweep["arrival_rate"]) == rates
    assert sweep["latency_p99_s"].is_monotonic_increasing
    assert (sweep["latency_p50_s"] >= min(s["e2e_s"] for s in services["on-demand"]) - 1e-12).all()
    strict = qv.load_sweep(services, rates, slo_ttft_s=1e-6, slo_tpot_s=None)
    assert (strict["slo_attainment"] == 0).all()
    loose = qv.load_sweep(services, rates[:1], slo_ttft_s=None, slo_tpot_s=None)
    assert loose["slo_attainment"].iloc[0] == 1.0


def test_figures_and_tables():
    services = {"on-demand": qv.service_runs(*ARGS)}
    rates = qv.default_rates(services, points=3)
    sweep = qv.load_sweep(services, rates, slo_ttft_s=2.0, slo_tpot_s=0.2)
    fig = qv.attainment_figure(sweep, slo_ttft_ms=2000, slo_tpot_ms=200)
    assert fig.layout.xaxis.title.text == "arrival rate (requests/s)" and len(fig.layout.shapes) == 1
    fig = qv.latency_figure(sweep, services)
    assert len(fig.data) == 2 and fig.layout.yaxis.type == "log"
    fig = qv.requests_figure(services, rates[1])
    assert len(fig.data) == 3 and fig.layout.xaxis.title.text == "time (s)"
    table = qv.percentile_table(sweep, rates[1])
    assert "SLO attainment" in table.columns and list(table.index) == ["on-demand"]
    assert qv.service_summary(services).loc["on-demand", "capacity (req/s)"] > 0


def test_a_budget_too_small_is_skipped_with_its_reason():
    services, skipped = qv.services_for("mixtral-8x7b", ("on-demand",), 1, 2, 0.8, 2, 4)
    assert not services and "on-demand" in skipped

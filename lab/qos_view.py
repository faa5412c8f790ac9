"""What notebook 07 draws: requests arriving over time, served FCFS, SLO attainment per policy as load grows.

``duoserve_core.sim.qos`` serves a list of requests on one simulated GPU (batch 1, first come first
served; the cache and the policy's state carry from one request to the next). A request's own
service (its TTFT without queueing, its TPOT, its E2E) does not depend on when it arrived: the
simulator is handed the same requests in the same order whatever the rate. So each policy is
simulated once per request (``service_runs``), and every arrival rate is then a queue over those
service times (``serve``, the same arithmetic as ``qos.serve``); a load sweep of many rates costs
one simulation per request and policy, and the SLO knobs only re-count.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from duoserve_core.errors import BudgetError
from duoserve_core.policy import PolicyKnobs
from duoserve_core.sim import Simulator, qos

from .paper_figures import POLICY_COLOURS, SIMULATED, TRACE, _trace, sim_setup

POLICIES = ("duoserve", "uniform", "on-demand", "lru-speculative")


@functools.lru_cache(maxsize=32)
def service_runs(preset: str, policy: str, budget_pct: float, depth: int, threshold: float, n_requests: int,
                 prompt_len: int | None = None, gen: int | None = 32) -> tuple[dict, ...]:
    """Request i (trace request i, its prompt, ``gen`` new tokens) served back to back by one simulator:
    ``(request_index, prompt_tokens, new_tokens, ttft_s, tpot_s, e2e_s)`` each (seconds, no queueing)."""
    requests = qos.make_requests([0.0] * n_requests, qos.request_lengths(_trace()), prompt_len, gen)
    context = context_for(n_requests, gen, prompt_len)
    model, cal, replay, _ = sim_setup(preset, budget_pct, context)
    knobs = PolicyKnobs(policy=policy, prefetch_depth=depth, predictor_threshold=threshold, speculative_gate=True)
    sim = Simulator(model, cal, replay, knobs.effective(), record_timeline=False, policy_time=False)
    out = []
    for r in requests:
        run = sim.generate(r.prompt_tokens, r.new_tokens, r.request_index)
        out.append({"request_index": r.request_index, "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens,
                    "ttft_s": run.ttft_s, "tpot_s": run.tpot_s, "e2e_s": run.e2e_s})
    return tuple(out)


def context_for(n_requests: int, gen: int | None, prompt_len: int | None = None) -> int:
    """The longest of these requests (prompt + generated tokens), which ``service_runs`` plans memory for
    (through ``sim_setup``: at least ``memory.PLAN_CONTEXT`` tokens, so 15% is the slots it is elsewhere)."""
    requests = qos.make_requests([0.0] * n_requests, qos.request_lengths(_trace()), prompt_len, gen)
    return max(r.prompt_tokens + r.new_tokens for r in requests)


def serve(service: tuple[dict, ...] | list[dict], arrivals: list[float]) -> list[dict]:
    """``qos.serve``'s records for these arrivals, from the service times (one per request, in order)."""
    if len(arrivals) > len(service):
        raise ValueError(f"{len(arrivals)} arrivals, {len(service)} service runs")
    free_at, out = 0.0, []
    for at, s in zip(arrivals, service):
        start = max(at, free_at)
        free_at = start + s["e2e_s"]
        out.append({"arrival_s": at, "start_s": start, "queued_s": start - at, "ttft_s": start - at + s["ttft_s"],
                    "tpot_s": s["tpot_s"], "latency_s": free_at - at, "prompt_tokens": s["prompt_tokens"],
                    "new_tokens": s["new_tokens"]})
    return out


def capacity(service: tuple[dict, ...] | list[dict]) -> float:
    """Requests per second one server sustains: 1 / mean service time (past it the queue only grows)."""
    return 1.0 / float(np.mean([s["e2e_s"] for s in service]))


def default_rates(services: dict[str, tuple[dict, ...]], points: int = 8, up_to: float = 1.6) -> list[float]:
    """Arrival rates from light load to ``up_to`` x the capacity of the fastest policy (same rates for all)."""
    top = max(capacity(s) for s in services.values())
    return [round(float(x), 4) for x in np.linspace(top * up_to / points, top * up_to, points)]


def load_sweep(services: dict[str, tuple[dict, ...]], rates: list[float], *, seed: int = 0,
               slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> pd.DataFrame:
    """One row per (policy, rate): SLO attainment and p50/p90/p99 of TTFT, TPOT and latency, on the same
    seeded Poisson arrivals for every policy (``qos.poisson_arrivals``)."""
    rows = []
    for rate in rates:
        n = min(len(s) for s in services.values())
        arrivals = qos.poisson_arrivals(rate, n, seed)
        for policy, service in services.items():
            s = qos.summarize(serve(service, arrivals), slo_ttft_s, slo_tpot_s)
            rows.append({"policy": policy, "arrival_rate": rate, "slo_attainment": s["slo_attainment"],
                         **{f"{m}_{p}_s": s[f"{m}_s"][p] for m in ("ttft", "tpot", "latency") for p in ("p50", "p90", "p99")},
                         "tokens_per_s": s["tokens_per_s"], "capacity_rps": capacity(service)})
    return pd.DataFrame(rows)


# -- figures ---------------------------------------------------------------------------------------
def attainment_figure(sweep: pd.DataFrame, *, slo_ttft_ms: float, slo_tpot_ms: float, title: str = "") -> go.Figure:
    """SLO attainment against arrival rate per policy; each policy's capacity (1 / mean service time)
    as a dotted vertical line of its colour."""
    fig = go.Figure()
    for policy, part in sweep.groupby("policy", sort=False):
        colour = POLICY_COLOURS.get(policy)
        fig.add_trace(go.Scatter(x=part["arrival_rate"], y=part["slo_attainment"], mode="lines+markers", name=policy,
                                 line_color=colour, customdata=part[["ttft_p90_s", "tpot_p90_s"]] * 1e3,
                                 hovertemplate=policy + ": %{y:.2f} at %{x:.3f} req/s<br>TTFT p90 %{customdata[0]:.0f} ms, "
                                 "TPOT p90 %{customdata[1]:.1f} ms<extra></extra>"))
        fig.add_vline(x=part["capacity_rps"].iloc[0], line_dash="dot", line_color=colour)
    fig.update_layout(title=title or f"SLO attainment (TTFT <= {slo_ttft_ms:g} ms and TPOT <= {slo_tpot_ms:g} ms); "
                      "dotted: each policy's capacity", xaxis_title="arrival rate (requests/s)",
                      yaxis_title="share of requests meeting both SLOs", yaxis_range=[0, 1.02], legend_title="policy",
                      height=400)
    return fig


def latency_figure(sweep: pd.DataFrame, services: dict[str, tuple[dict, ...]], metric: str = "latency",
                   title: str = "") -> go.Figure:
    """p50 (solid) and p99 (dashed) of ``metric`` (latency, ttft or tpot) against arrival rate, in ms;
    dotted: each policy's unloaded mean (no queue), the floor the curves start from."""
    unit = 1e3
    fig = go.Figure()
    for policy, part in sweep.groupby("policy", sort=False):
        colour = POLICY_COLOURS.get(policy)
        for p, dash in (("p50", "solid"), ("p99", "dash")):
            fig.add_trace(go.Scatter(x=part["arrival_rate"], y=part[f"{metric}_{p}_s"] * unit, mode="lines+markers",
                                     name=f"{policy} {p}", line=dict(color=colour, dash=dash), legendgroup=policy))
        key = {"latency": "e2e_s", "ttft": "ttft_s", "tpot": "tpot_s"}[metric]
        floor = np.mean([s[key] for s in services[policy] if s[key] is not None]) * unit
        fig.add_hline(y=floor, line_dash="dot", line_color=colour)
    what = {"latency": "request latency (arrival to last token)", "ttft": "TTFT (queueing included)",
            "tpot": "TPOT"}[metric]
    fig.update_layout(title=title or f"{what}: p50 solid, p99 dashed; dotted: unloaded mean",
                      xaxis_title="arrival rate (requests/s)", yaxis_title=f"{what.split(' (')[0]} (ms)",
                      yaxis_type="log", legend_title="policy", height=400)
    return fig


def requests_figure(services: dict[str, tuple[dict, ...]], rate: float, seed: int = 0, title: str = "") -> go.Figure:
    """Requests over time at one rate: per policy and request, the wait in the queue (light) and the
    service (its prefill dark, its decode mid) from arrival to last token."""
    n = min(len(s) for s in services.values())
    arrivals = qos.poisson_arrivals(rate, n, seed)
    fig = go.Figure()
    for policy, service in services.items():
        colour = POLICY_COLOURS.get(policy, "#888")
        recs = serve(service, arrivals)
        y = [f"{policy} #{i}" for i in range(len(recs))]
        parts = (("queued", [r["queued_s"] for r in recs], [r["arrival_s"] for r in recs], 0.25),
                 ("prefill", [s["ttft_s"] for s in service[:n]], [r["start_s"] for r in recs], 1.0),
                 ("decode", [s["e2e_s"] - s["ttft_s"] for s in service[:n]],
                  [r["start_s"] + s["ttft_s"] for r, s in zip(recs, service)], 0.6))
        for name, width, base, opacity in parts:
            fig.add_trace(go.Bar(y=y, x=width, base=base, orientation="h", marker_color=colour, opacity=opacity,
                                 name=policy, legendgroup=policy, showlegend=name == "prefill",
                                 hovertemplate="%{y}: " + name + " from %{base:.2f} s for %{x:.2f} s<extra></extra>"))
    fig.update_layout(barmode="overlay", height=max(300, 14 * n * len(services)), legend_title="policy, part",
                      title=title or f"requests over time at {rate:.3f} requests/s (Poisson, seed {seed})",
                      xaxis_title="time (s)", yaxis=dict(title="request", autorange="reversed"))
    return fig


def percentile_table(sweep: pd.DataFrame, rate: float) -> pd.DataFrame:
    """p50 / p99 of TTFT, TPOT and latency (ms) and attainment per policy at the rate closest to ``rate``."""
    at = sweep.loc[(sweep["arrival_rate"] - rate).abs().idxmin(), "arrival_rate"]
    part = sweep[sweep["arrival_rate"] == at].set_index("policy")
    out = pd.DataFrame({f"{m} {p} (ms)": part[f"{m}_{p}_s"] * 1e3 for m in ("ttft", "tpot", "latency")
                        for p in ("p50", "p99")})
    out["SLO attainment"] = part["slo_attainment"]
    out["tokens/s"] = part["tokens_per_s"]
    return out.round(2).rename_axis(f"policy at {at:.3f} req/s")


def service_summary(services: dict[str, tuple[dict, ...]]) -> pd.DataFrame:
    """Each policy unloaded: mean TTFT, TPOT and E2E per request, and the capacity they give."""
    rows = {p: {"TTFT (ms)": 1e3 * np.mean([r["ttft_s"] for r in s]),
                "TPOT (ms)": 1e3 * np.mean([r["tpot_s"] for r in s if r["tpot_s"] is not None]),
                "E2E (s)": np.mean([r["e2e_s"] for r in s]), "capacity (req/s)": capacity(s)}
            for p, s in services.items()}
    return pd.DataFrame(rows).T.round(3).rename_axis(SIMULATED)


def services_for(preset: str, policies: tuple[str, ...], budget_pct: float, depth: int, threshold: float,
                 n_requests: int, gen: int | None) -> tuple[dict[str, tuple[dict, ...]], dict[str, str]]:
    """``service_runs`` of every policy that fits the budget, and why the others were skipped."""
    services, skipped = {}, {}
    for policy in policies:
        try:
            services[policy] = service_runs(preset, policy, float(budget_pct), depth, threshold, n_requests, None, gen)
        except BudgetError as exc:
            skipped[policy] = str(exc)
    return services, skipped

"""Requests arriving over time on one GPU: latency percentiles and SLO attainment per policy.

A single first-come-first-served server with batch 1: request i starts when it has arrived and
request i-1 has finished; its own TTFT and TPOT come from the simulator, with the expert cache and
the policy's state carried over from the request before (a serving process does not empty its
cache between requests). TTFT as the user sees it adds the time spent queued. Streams are idle at
each request's start: a prefetch still in flight when a request ends is taken to have landed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from ..errors import DuoServeError
from ..traces import Trace
from .simulator import Simulator


class WorkloadError(DuoServeError, ValueError):
    """Arrivals or request lengths that cannot be served."""


@dataclass
class Request:
    arrival_s: float
    request_index: int   # which trace request routes it (RoutingReplay's index, wrapping)
    prompt_tokens: int
    new_tokens: int


def request_lengths(trace: Trace) -> list[tuple[int, int]]:
    """``(prompt tokens, new tokens)`` of every trace request, in ``RoutingReplay``'s order.

    A request with P prefill rows and D decode rows was generated with ``max_new_tokens = D + 1``.
    """
    tokens = trace.tokens()
    out = []
    for _, rows in tokens.groupby("request_id", sort=True):
        prefill = int((rows["phase"] == "prefill").sum())
        out.append((prefill, len(rows) - prefill + 1))
    return out


def poisson_arrivals(rate_per_s: float, n: int, seed: int = 0) -> list[float]:
    """``n`` arrival times of a Poisson process of ``rate_per_s`` requests per second, from 0."""
    if rate_per_s <= 0 or n < 1:
        raise WorkloadError(f"need a positive arrival rate and at least one request (rate {rate_per_s}, n {n})")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_per_s, n)
    return (np.cumsum(gaps) - gaps[0]).tolist()


def poisson_arrivals_within(rate_per_s: float, duration_s: float, seed: int = 0) -> list[float]:
    """The arrivals of ``poisson_arrivals(rate_per_s, n, seed)`` that fall within ``duration_s`` seconds (the
    first at 0, so at least one): the same process, cut by time instead of by count."""
    if not duration_s > 0:
        raise WorkloadError(f"need a positive duration, got {duration_s}")
    n = int(rate_per_s * duration_s * 2) + 16
    while (arrivals := poisson_arrivals(rate_per_s, n, seed))[-1] < duration_s:
        n *= 2
    return [a for a in arrivals if a < duration_s]


def make_requests(arrivals: list[float], lengths: list[tuple[int, int]], prompt_tokens: int | None = None,
                  new_tokens: int | None = None) -> list[Request]:
    """Request i arrives at ``arrivals[i]`` and takes trace request ``i mod R``'s routing and lengths
    (``prompt_tokens`` / ``new_tokens`` override the lengths)."""
    if any(b < a for a, b in zip(arrivals, arrivals[1:])) or (arrivals and arrivals[0] < 0):
        raise WorkloadError("arrival times must be non-negative and in order")
    out = []
    for i, at in enumerate(arrivals):
        prompt, new = lengths[i % len(lengths)]
        out.append(Request(at, i % len(lengths), prompt_tokens or prompt, new_tokens or new))
    return out


def serve(sim: Simulator, requests: list[Request]) -> list[dict]:
    """Serve ``requests`` in arrival order; one record per request (seconds)."""
    free_at, out = 0.0, []
    for r in requests:
        start = max(r.arrival_s, free_at)
        run = sim.generate(r.prompt_tokens, r.new_tokens, r.request_index)
        free_at = start + run.e2e_s
        out.append({"arrival_s": r.arrival_s, "start_s": start, "queued_s": start - r.arrival_s,
                    "ttft_s": start - r.arrival_s + run.ttft_s, "tpot_s": run.tpot_s,
                    "latency_s": free_at - r.arrival_s, "prompt_tokens": r.prompt_tokens,
                    "new_tokens": r.new_tokens})
    return out


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "mean": statistics.fmean(values)}


def summarize(records: list[dict], slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict:
    """Percentiles of TTFT, TPOT and latency, throughput, and the share of requests meeting the SLOs
    (a request meets them when its TTFT and its mean TPOT are both within; an SLO not given always holds)."""
    def meets(r: dict) -> bool:
        ttft_ok = slo_ttft_s is None or r["ttft_s"] <= slo_ttft_s
        tpot_ok = slo_tpot_s is None or r["tpot_s"] is None or r["tpot_s"] <= slo_tpot_s
        return ttft_ok and tpot_ok

    span = max(r["arrival_s"] + r["latency_s"] for r in records) - min(r["arrival_s"] for r in records)
    return {"requests": len(records), "ttft_s": _percentiles([r["ttft_s"] for r in records]),
            "tpot_s": _percentiles([r["tpot_s"] for r in records if r["tpot_s"] is not None]),
            "latency_s": _percentiles([r["latency_s"] for r in records]),
            "queued_s": _percentiles([r["queued_s"] for r in records]),
            "tokens_per_s": sum(r["new_tokens"] for r in records) / span if span > 0 else None,
            "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
            "slo_attainment": sum(map(meets, records)) / len(records)}


def load_sweep(make_simulator, policies: list[str], lengths: list[tuple[int, int]], rates: list[float],
               n_requests: int, seed: int = 0, slo_ttft_s: float | None = None,
               slo_tpot_s: float | None = None) -> list[dict]:
    """SLO attainment and percentiles against arrival rate: one row per (policy, rate), each served
    by a fresh simulator (``make_simulator(policy)``) on the same arrivals for every policy."""
    rows = []
    for rate in rates:
        requests = make_requests(poisson_arrivals(rate, n_requests, seed), lengths)
        for policy in policies:
            summary = summarize(serve(make_simulator(policy), requests), slo_ttft_s, slo_tpot_s)
            rows.append({"policy": policy, "arrival_rate": rate, "slo_attainment": summary["slo_attainment"],
                         "ttft_p90_s": summary["ttft_s"]["p90"], "tpot_p90_s": summary["tpot_s"]["p90"],
                         "tokens_per_s": summary["tokens_per_s"]})
    return rows

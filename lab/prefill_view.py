"""What notebook 04 runs: the two-stream prefill, measured, as the prefetch depth and the budget move.

A prefill is ``live_run(..., new_tokens=1)``: one forward over the whole prompt. From its timeline
come the stream Gantt with the transfer and compute floors drawn on it and the overlap of copies
with computation; from its cache log, how many slots each layer's experts held over time (the
prefetch window) and the peak.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from duoserve_core.policy import PolicyKnobs, make_policy
from duoserve_core.units import format_bytes

from .figures import stream_timeline
from .runs import BUNDLED, LiveRun, ModelChoice, live_run

PREFILL_POLICIES = ("duoserve", "uniform", "on-demand", "lru-speculative")
LAYER_COLOURS = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
                 "#bab0ac"]


def prefill_run(model: ModelChoice = BUNDLED, *, policy: str = "duoserve", slots: int = 16, depth: int = 2,
                prompt_tokens: int = 64, device: str | None = None) -> LiveRun:
    """One prefill (no decode step) of ``prompt_tokens`` held-out tokens under the knobs."""
    return live_run(model, policy=policy, slots=slots, depth=depth, prompt_tokens=prompt_tokens, new_tokens=1,
                    device=device)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length covered by both unions (two-pointer sweep)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap(rows: list[dict], phase: str | None = "prefill") -> dict:
    """How much of the copy stream's busy time ran while the compute stream was busy too (ms)."""
    rows = [r for r in rows if phase in (None, r["phase"])]
    copy = _union([(r["start_ms"], r["end_ms"]) for r in rows if r["stream"] == "copy"])
    compute = _union([(r["start_ms"], r["end_ms"]) for r in rows if r["stream"] == "compute"])
    both = _intersection(copy, compute)
    copy_ms = _length(copy)
    return {"copy_ms": copy_ms, "compute_ms": _length(compute), "overlapped_ms": both,
            "exposed_copy_ms": copy_ms - both, "overlap_share": both / copy_ms if copy_ms else None}


def prefill_stats(run: LiveRun) -> dict:
    """Counts and times of a run's prefill, with the floors of ``duoserve_core.bench.bounds``."""
    phase = run.result.phases["prefill"]
    b, ov = run.bounds, overlap(run.rows)
    floor = b.get("ttft_floor_s")
    plan = run.plan
    peak = run.log.peak_resident("prefill")
    return {"device": run.device, "policy": run.knobs["policy"], "depth": run.knobs["depth"], "slots": run.slots,
            "prompt tokens": run.result.prompt_tokens, "TTFT (ms)": run.result.ttft_s * 1e3,
            "transfer floor (ms)": b.get("transfer_floor_s", 0) * 1e3, "compute floor (ms)": b["compute_prefill_s"] * 1e3,
            "TTFT / floor": run.result.ttft_s / floor if floor else None,
            "experts copied": phase["h2d_copies"], "bytes copied": phase["h2d_bytes"],
            "demand misses": phase["misses"], "prefetched": phase["prefetches"],
            "prefetched and used": phase["prefetch_hits"], "wasted prefetches": phase["prefetch_wasted"],
            "copies issued a layer ahead": run.log.issued_ahead("prefill"), "peak slots held": peak, "peak expert bytes held": peak * plan.expert_bytes,
            "copy time overlapped (%)": None if ov["overlap_share"] is None else 100 * ov["overlap_share"]}


def summary(run: LiveRun) -> pd.DataFrame:
    s = prefill_stats(run)
    s["slots"] = f"{s['slots']} of {run.plan.total_experts}"
    s["bytes copied"] = format_bytes(s["bytes copied"])
    s["peak expert bytes held"] = format_bytes(s["peak expert bytes held"])
    return pd.DataFrame({"prefill": {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}})


def timeline_figure(run: LiveRun) -> go.Figure:
    """The prefill's copy and compute streams, with the transfer and compute floors as lines."""
    df = run.timeline
    df = df[df["phase"] == "prefill"]
    b = run.bounds
    floors = {"compute floor": b["compute_prefill_s"] * 1e3}
    if b.get("transfer_floor_s"):
        floors["transfer floor"] = b["transfer_floor_s"] * 1e3
    fig = stream_timeline(df, floors_ms=floors, title=f"Prefill of {run.result.prompt_tokens} tokens: {run.label()} "
                                                       f"({run.device}, measured)")
    return fig


def residency_figure(run: LiveRun) -> go.Figure:
    """Expert slots held by each layer over the prefill (host time of each cache decision)."""
    L = run.runtime.config.num_hidden_layers
    E = run.runtime.config.num_local_experts
    res = run.log.residency(L, "prefill")
    fig = go.Figure()
    for layer in range(L):
        fig.add_trace(go.Scatter(x=res["t_ms"], y=res[f"L{layer}"], mode="lines", stackgroup="held", name=f"layer {layer}",
                                 line=dict(width=0.5, shape="hv", color=LAYER_COLOURS[layer % len(LAYER_COLOURS)]),
                                 hovertemplate=f"layer {layer}: " + "%{y} slots at %{x:.2f} ms<extra></extra>"))
    fig.add_hline(y=run.slots, line_dash="dash", annotation_text=f"{run.slots} slots allocated")
    depth = make_policy(PolicyKnobs(policy=run.knobs["policy"], prefetch_depth=run.knobs["depth"])).prefill_window
    if depth is not None:
        window = min(run.slots, depth * E)
        fig.add_hline(y=window, line_dash="dot", line_color="#e45756",
                      annotation_text=f"window: depth {depth} x {E} experts", annotation_position="bottom right")
    fig.update_layout(height=300, xaxis_title="host time of the cache decision (ms since the request started)",
                      yaxis_title="expert slots held", legend_title="experts of",
                      title=f"Slots held per layer during the prefill: {run.label()} (peak {run.log.peak_resident('prefill')})")
    return fig


def sweep(model: ModelChoice = BUNDLED, *, depths=(1, 2, 3, 4), slots=(8, 16, 32, 64), prompt_tokens: int = 64,
          policy: str = "duoserve", device: str | None = None) -> pd.DataFrame:
    """Prefill stats for every (depth, budget): how the window bounds memory and what it costs."""
    rows = []
    for s in slots:
        for d in depths:
            rows.append(prefill_stats(prefill_run(model, policy=policy, slots=s, depth=d,
                                                  prompt_tokens=prompt_tokens, device=device)))
    return pd.DataFrame(rows)


def sweep_figure(df: pd.DataFrame) -> go.Figure:
    """Peak slots held, experts copied and demand misses against the prefetch depth, one line per budget."""
    panels = [("peak slots held", "peak expert slots held"), ("experts copied", "experts copied"),
              ("copies issued a layer ahead", "copies issued while an earlier layer computed")]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels])
    for i, (col, _) in enumerate(panels, start=1):
        for j, (s, part) in enumerate(df.groupby("slots")):
            fig.add_trace(go.Scatter(x=part["depth"], y=part[col], mode="lines+markers", name=f"{s} slots",
                                     legendgroup=str(s), showlegend=i == 1,
                                     line_color=LAYER_COLOURS[j % len(LAYER_COLOURS)],
                                     hovertemplate=f"{s} slots, depth " + "%{x}: %{y}<extra></extra>"),
                          row=1, col=i)
    fig.update_xaxes(title_text="prefetch depth (layers)", dtick=1)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(height=330, legend_title="budget", title="The prefill window as depth and budget move "
                                                              f"({df['device'].iloc[0]}, {df['prompt tokens'].iloc[0]}-token prompt)")
    return fig


def policy_table(model: ModelChoice = BUNDLED, *, slots: int = 16, depth: int = 2, prompt_tokens: int = 64,
                 device: str | None = None, policies=PREFILL_POLICIES) -> pd.DataFrame:
    """The same prefill under each policy at the same budget."""
    rows = [prefill_stats(prefill_run(model, policy=p, slots=slots, depth=depth, prompt_tokens=prompt_tokens,
                                      device=device)) for p in policies]
    keep = ["policy", "TTFT (ms)", "TTFT / floor", "experts copied", "demand misses", "prefetched and used",
            "wasted prefetches", "copies issued a layer ahead", "peak slots held", "copy time overlapped (%)"]
    return pd.DataFrame(rows)[keep].set_index("policy").round(2)

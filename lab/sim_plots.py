"""plotly figures of the simulator's answers: hit rate and TPOT against budget, SLO attainment against load.

Each function takes plain rows (``duoserve_core.sim.reference.table``, ``sim.qos.load_sweep``, or
simulated bench results) and returns a ``go.Figure``, so it is tested without a notebook.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

POLICY_DASH = {"belady": "dot", "lru": "solid", "per-layer-lru": "dash", "lfu": "dashdot"}


def _simulated_points(fig: go.Figure, simulated: list[dict] | None, y: str, scale: float, x: str) -> None:
    """Markers for policies run through the simulator (rows: policy, budget_pct, and the ``y`` field)."""
    if not simulated:
        return
    df = pd.DataFrame(simulated)
    for policy, part in df.groupby("policy", sort=False):
        fig.add_trace(go.Scatter(x=part[x], y=part[y] * scale, mode="markers+lines", name=f"{policy} (simulated)",
                                 marker=dict(size=9, symbol="diamond")))


def hit_rate_vs_budget(rows: list[dict], simulated: list[dict] | None = None, *, x: str = "budget_pct",
                       title: str = "") -> go.Figure:
    """Decode hit rate of each reference cache at every budget; ``simulated`` adds real policies."""
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for policy, part in df.groupby("policy", sort=False):
        fig.add_trace(go.Scatter(x=part[x], y=part["hit_rate"], mode="lines", name=policy,
                                 line=dict(dash=POLICY_DASH.get(policy, "solid")),
                                 customdata=part[["slots", "decode_loads"]],
                                 hovertemplate=policy + ": %{y:.3f} at %{x:.1f}<br>%{customdata[0]} slots, "
                                 "%{customdata[1]} loads<extra></extra>"))
    _simulated_points(fig, simulated, "hit_rate", 1.0, x)
    fig.update_layout(title=title, xaxis_title=_axis(x), yaxis_title="decode hit rate", yaxis_range=[0, 1.02],
                      legend_title="policy", height=380)
    return fig


def tpot_vs_budget(rows: list[dict], simulated: list[dict] | None = None, *, x: str = "budget_pct",
                   title: str = "") -> go.Figure:
    """TPOT estimates per reference cache (solid: copies overlapped; faint: copies serial), in ms;
    ``simulated`` rows (``tpot_s``) add the policies the simulator ran."""
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for policy, part in df.groupby("policy", sort=False):
        fig.add_trace(go.Scatter(x=part[x], y=part["tpot_overlapped_s"] * 1e3, mode="lines", name=policy,
                                 line=dict(dash=POLICY_DASH.get(policy, "solid")), legendgroup=policy))
        fig.add_trace(go.Scatter(x=part[x], y=part["tpot_serial_s"] * 1e3, mode="lines", name=f"{policy} serial",
                                 line=dict(dash=POLICY_DASH.get(policy, "solid"), width=1), opacity=0.4,
                                 legendgroup=policy, showlegend=False))
    _simulated_points(fig, simulated, "tpot_s", 1e3, x)
    fig.update_layout(title=title, xaxis_title=_axis(x), yaxis_title="TPOT (ms)", legend_title="policy", height=380)
    return fig


def slo_attainment_vs_load(rows: list[dict], *, title: str = "") -> go.Figure:
    """Share of requests meeting their SLOs against the arrival rate, one line per policy."""
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for policy, part in df.groupby("policy", sort=False):
        part = part.sort_values("arrival_rate")
        fig.add_trace(go.Scatter(x=part["arrival_rate"], y=part["slo_attainment"], mode="lines+markers", name=policy,
                                 customdata=part[["ttft_p90_s", "tpot_p90_s"]] * 1e3,
                                 hovertemplate=policy + ": %{y:.2f} at %{x} req/s<br>TTFT p90 %{customdata[0]:.1f} ms, "
                                 "TPOT p90 %{customdata[1]:.2f} ms<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="arrival rate (requests/s)", yaxis_title="SLO attainment",
                      yaxis_range=[0, 1.02], legend_title="policy", height=380)
    return fig


def _axis(x: str) -> str:
    return {"budget_pct": "memory budget (% of the model)", "slots": "expert slots",
            "budget_bytes": "memory budget (bytes)"}.get(x, x)

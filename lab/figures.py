"""plotly figures of what the runtime did: the stream timeline and expert heatmaps.

Each function takes plain data (a timeline DataFrame, a trace) and returns a ``go.Figure``, so it
is tested without a notebook and a notebook cell stays one line.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from duoserve_core.traces import Trace

STREAM_ORDER = ["copy", "compute"]
KIND_COLOURS = {"h2d": "#e45756", "attention": "#4c78a8", "router": "#72b7b2", "expert": "#f58518",
                "relayout": "#b279a2"}   # relayout: an int4 record re-laid for the GPU's kernel on landing


def stream_timeline(df: pd.DataFrame, *, floors_ms: dict[str, float] | None = None, title: str = "") -> go.Figure:
    """Gantt of the copy and compute streams: one bar per copy or computation, hover for details.

    ``floors_ms`` draws vertical lines (e.g. ``{"transfer floor": 463.0}``) at those times.
    """
    fig = go.Figure()
    for kind, colour in KIND_COLOURS.items():
        part = df[df["kind"] == kind]
        if part.empty:
            continue
        labels = [f"L{l}" + ("" if pd.isna(e) else f" E{int(e)}") for l, e in zip(part["layer"], part["expert"])]
        fig.add_trace(go.Bar(
            base=part["start_ms"], x=part["duration_ms"], y=part["stream"], orientation="h", name=kind,
            marker_color=colour, text=labels if len(part) <= 400 else None, textposition="inside",
            customdata=np.stack([part["phase"], part["step"], labels, part["nbytes"]], axis=1),
            hovertemplate="%{customdata[2]} " + kind + "<br>%{base:.3f} ms + %{x:.3f} ms<br>"
                          "phase %{customdata[0]}, step %{customdata[1]}<br>%{customdata[3]} bytes<extra></extra>",
        ))
    for label, at in (floors_ms or {}).items():
        fig.add_vline(x=at, line_dash="dash", annotation_text=label)
    fig.update_layout(barmode="overlay", title=title, xaxis_title="time since the request started (ms)",
                      yaxis=dict(title="stream", categoryorder="array", categoryarray=STREAM_ORDER),
                      height=260, legend_title="work")
    return fig


def expert_counts(trace: Trace, phase: str | None = None) -> np.ndarray:
    """``[layers, experts]`` how many tokens chose each expert (``phase`` None: both phases)."""
    experts = trace.expert_array()
    if phase is not None:
        experts = experts[trace.tokens()["phase"].to_numpy() == phase]
    E = trace.meta.num_experts
    return np.stack([np.bincount(experts[:, l].ravel(), minlength=E) for l in range(trace.meta.num_layers)])


def expert_heatmap(counts: np.ndarray, title: str = "") -> go.Figure:
    """Layer x expert heatmap of each layer's share of routing assignments."""
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = go.Figure(go.Heatmap(z=share, colorscale="Viridis", colorbar_title="share",
                               hovertemplate="layer %{y}, expert %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="expert", yaxis_title="layer", height=320)
    return fig


def affinity_heatmap(affinity: np.ndarray, layer: int) -> go.Figure:
    """How layer l's experts predict layer l+1's: the structure a layer-level predictor learns."""
    fig = go.Figure(go.Heatmap(z=affinity, colorscale="Magma", zmin=0, colorbar_title="P",
                               hovertemplate=f"layer {layer} expert %{{y}} -> layer {layer + 1} expert %{{x}}: "
                                             "%{z:.2f}<extra></extra>"))
    fig.update_layout(xaxis_title=f"expert at layer {layer + 1}", yaxis_title=f"expert at layer {layer}", height=340,
                      title=f"P(expert at layer {layer + 1} | expert at layer {layer})")
    return fig


def token_routing(trace: Trace, request_id: int, max_tokens: int = 96) -> go.Figure:
    """First-choice expert of every token (x) at every layer (y) for one request; prefill is shaded."""
    tokens = trace.tokens()
    mask = (tokens["request_id"] == request_id).to_numpy()
    first = trace.expert_array()[mask][:max_tokens, :, 0]
    phases = tokens[mask]["phase"].to_numpy()[:max_tokens]
    fig = go.Figure(go.Heatmap(z=first.T, colorscale="Turbo", colorbar_title="expert",
                               hovertemplate="token %{x}, layer %{y}: expert %{z}<extra></extra>"))
    prefill_end = int((phases == "prefill").sum())
    fig.add_vrect(x0=-0.5, x1=prefill_end - 0.5, fillcolor="white", opacity=0.15, line_width=0,
                  annotation_text="prefill", annotation_position="top left")
    fig.update_layout(xaxis_title="token position", yaxis_title="layer", height=300,
                      title=f"first-choice expert per token, request {request_id}")
    return fig

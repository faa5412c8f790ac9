"""What notebook 05 runs: decode with the predictor and the expert cache, against Belady's oracle.

Each decode run is a ``live_run``: the runtime's own counts (hits, misses, prefetches used and
wasted, copies, bytes), every cache decision per step and layer (``CacheLog``), and the run's
bounds (``duoserve_core.bench.bounds``): Belady's loads over the routing the run actually took, at
the same number of slots, and the TPOT that many loads would allow with every copy overlapped.
Routing does not depend on the schedule, so every policy at a budget faces the same oracle.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from duoserve_core.units import format_bytes

from .runs import BUNDLED, LiveRun, ModelChoice, live_run

CONFIG_COLOURS = ["#9d755d", "#72b7b2", "#4c78a8", "#e45756", "#54a24b", "#b279a2"]
ORACLE_COLOUR = "black"


def decode_run(model: ModelChoice = BUNDLED, *, policy: str = "duoserve", slots: int = 16, depth: int = 2,
               threshold: float = 0.5, gate: bool = True, prompt_tokens: int = 32, new_tokens: int = 24,
               device: str | None = None) -> LiveRun:
    return live_run(model, policy=policy, slots=slots, depth=depth, threshold=threshold, gate=gate,
                    prompt_tokens=prompt_tokens, new_tokens=new_tokens, device=device)


def decode_stats(run: LiveRun) -> dict:
    """The decode phase of a run in counts and times, with Belady's loads and the oracle TPOT."""
    d = run.result.phases["decode"]
    b = run.bounds
    n = max(run.decode_tokens, 1)
    uses = d["hits"] + d["misses"]
    oracle_tpot = b.get("oracle_tpot_s")
    tpot = run.result.tpot_s
    return {"config": run.label(), "policy": run.knobs["policy"], "slots": run.slots, "depth": run.knobs["depth"],
            "threshold": run.knobs["threshold"], "gate": run.knobs["gate"], "device": run.device,
            "decode tokens": run.decode_tokens, "hits": d["hits"], "misses": d["misses"],
            "hit rate": d["hits"] / uses if uses else None, "prefetched": d["prefetches"],
            "prefetched and used": d["prefetch_hits"], "wasted prefetches": d["prefetch_wasted"],
            "experts copied": d["h2d_copies"], "bytes copied": d["h2d_bytes"],
            "Belady's loads": b["oracle_decode_loads"],
            # the lower bound holds for the whole run: prefill may copy experts that decode then finds resident
            "copied in the whole run": run.result.phases["prefill"]["h2d_copies"] + d["h2d_copies"],
            "Belady's loads in the whole run": b["oracle_total_loads"],
            "copies / Belady": d["h2d_copies"] / b["oracle_decode_loads"] if b["oracle_decode_loads"] else None,
            "misses per token": d["misses"] / n, "copies per token": d["h2d_copies"] / n,
            "wasted per token": d["prefetch_wasted"] / n, "Belady per token": b["oracle_decode_loads"] / n,
            "TPOT (ms)": tpot * 1e3 if tpot else None, "oracle TPOT (ms)": oracle_tpot * 1e3 if oracle_tpot else None,
            "TPOT / oracle": tpot / oracle_tpot if tpot and oracle_tpot else None,
            "tokens": tuple(run.result.tokens)}


def summary(run: LiveRun) -> pd.DataFrame:
    s = decode_stats(run)
    s.pop("tokens")
    s["slots"] = f"{s['slots']} of {run.plan.total_experts}"
    s["bytes copied"] = format_bytes(s["bytes copied"])
    return pd.DataFrame({"decode": {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}})


def step_heatmap(run: LiveRun) -> go.Figure:
    """Misses per decode step and layer; hover lists what each layer found resident or had to load."""
    L = run.runtime.config.num_hidden_layers
    steps = list(range(1, run.decode_tokens + 1))
    log = run.log.to_dataframe()
    log = log[log["phase"] == "decode"]
    misses = np.zeros((L, len(steps)))
    text = [["" for _ in steps] for _ in range(L)]
    labels = {"miss": "loaded on demand", "prefetch_hit": "prefetched", "hit": "cached",
              "reclaim": "taken back from its intact slot"}
    for (step, layer), part in log[log["event"].isin(list(labels))].groupby(["step", "layer"]):
        i = step - 1
        if not 0 <= i < len(steps):
            continue
        misses[layer, i] = int((part["event"] == "miss").sum())
        text[layer][i] = "<br>".join(f"E{e}: {labels[ev]}" for e, ev in zip(part["expert"], part["event"]))
    wasted = log[log["event"] == "wasted"].groupby("step").size().reindex(steps, fill_value=0)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.78, 0.22], vertical_spacing=0.04)
    k = run.runtime.config.num_experts_per_tok
    fig.add_trace(go.Heatmap(z=misses, x=steps, y=list(range(L)), zmin=0, zmax=k, text=text,
                             colorscale=[[0, "#54a24b"], [0.5, "#f58518"], [1, "#e45756"]],
                             colorbar=dict(title="misses", tickvals=list(range(k + 1)), len=0.75, y=0.62),
                             hovertemplate="step %{x}, layer %{y}: %{z} misses<br>%{text}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=steps, y=wasted.to_numpy(), marker_color="#9d755d", name="wasted prefetches",
                         hovertemplate="step %{x}: %{y} prefetched experts evicted unused<extra></extra>"),
                  row=2, col=1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="wasted", row=2, col=1)
    fig.update_xaxes(title_text="decode step (token)", row=2, col=1)
    fig.update_layout(height=420, showlegend=False,
                      title=f"Where decode waited: misses per step and layer ({run.label()}, {run.device})")
    return fig


def decode_timeline(run: LiveRun, steps: tuple[int, int] = (1, 3)):
    """The stream timeline of a few decode steps: prefetch copies between the layers' computations."""
    from .figures import stream_timeline

    df = run.timeline
    df = df[(df["phase"] == "decode") & df["step"].between(*steps)]
    return stream_timeline(df, title=f"Decode steps {steps[0]}-{steps[1]}: {run.label()} ({run.device}, measured)")


# -- sweeps --------------------------------------------------------------------------------------------
def configs(depth: int = 2, threshold: float = 0.5) -> dict[str, dict]:
    """The policies compared at every budget (duoserve at the notebook's depth and threshold)."""
    return {
        "on-demand": dict(policy="on-demand"),
        "lru-speculative": dict(policy="lru-speculative"),
        "duoserve, predictor": dict(policy="duoserve", depth=depth, threshold=threshold, gate=False),
        "duoserve, gate + predictor": dict(policy="duoserve", depth=depth, threshold=threshold, gate=True),
    }


def budget_sweep(model: ModelChoice = BUNDLED, *, slots=(4, 8, 16, 32, 64), depth: int = 2, threshold: float = 0.5,
                 prompt_tokens: int = 32, new_tokens: int = 24, device: str | None = None) -> pd.DataFrame:
    rows = []
    for s in slots:
        for name, kw in configs(depth, threshold).items():
            run = decode_run(model, slots=s, prompt_tokens=prompt_tokens, new_tokens=new_tokens, device=device, **kw)
            rows.append({"name": name, **decode_stats(run)})
    return pd.DataFrame(rows)


def budget_figure(df: pd.DataFrame) -> go.Figure:
    """Copies and misses per token, and TPOT, against the budget: each policy against Belady."""
    panels = [("copies per token", "experts copied per token"), ("misses per token", "misses per token"),
              ("TPOT (ms)", "TPOT (ms)")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels])
    for i, (col, _) in enumerate(panels, start=1):
        for j, (name, part) in enumerate(df.groupby("name", sort=False)):
            fig.add_trace(go.Scatter(x=part["slots"], y=part[col], mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=i == 1, line_color=CONFIG_COLOURS[j % len(CONFIG_COLOURS)],
                                     hovertemplate=name + ", %{x} slots: %{y:.2f}<extra></extra>"), row=1, col=i)
    oracle = df.groupby("slots").agg({"Belady per token": "first", "oracle TPOT (ms)": "min"}).reset_index()
    fig.add_trace(go.Scatter(x=oracle["slots"], y=oracle["Belady per token"], mode="lines+markers", name="Belady's oracle",
                             line=dict(color=ORACLE_COLOUR, dash="dash"),
                             hovertemplate="Belady, %{x} slots: %{y:.2f} loads per token<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=oracle["slots"], y=oracle["oracle TPOT (ms)"], mode="lines+markers",
                             name="oracle TPOT bound", line=dict(color=ORACLE_COLOUR, dash="dot"),
                             hovertemplate="oracle bound, %{x} slots: %{y:.2f} ms<extra></extra>"), row=1, col=3)
    fig.update_xaxes(title_text="budget (expert slots)", type="log", tickvals=sorted(df["slots"].unique()))
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(height=360, legend_title="policy",
                      title=f"Decode as the budget moves ({df['device'].iloc[0]}, {df['decode tokens'].iloc[0]} tokens)")
    return fig


def knob_sweep(model: ModelChoice = BUNDLED, *, slots: int = 16, depths=(1, 2, 3),
               thresholds=(0.1, 0.3, 0.5, 0.7, 0.9), gate: bool = True, prompt_tokens: int = 32, new_tokens: int = 24,
               device: str | None = None) -> pd.DataFrame:
    rows = []
    for d in depths:
        for t in thresholds:
            run = decode_run(model, slots=slots, depth=d, threshold=t, gate=gate, prompt_tokens=prompt_tokens,
                             new_tokens=new_tokens, device=device)
            rows.append(decode_stats(run))
    return pd.DataFrame(rows)


def knob_figure(df: pd.DataFrame) -> go.Figure:
    """Misses, wasted prefetches and copies per token against the threshold, one line per depth."""
    panels = [("misses per token", "misses per token"), ("wasted per token", "wasted prefetches per token"),
              ("copies per token", "experts copied per token")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels])
    for i, (col, _) in enumerate(panels, start=1):
        for j, (d, part) in enumerate(df.groupby("depth")):
            fig.add_trace(go.Scatter(x=part["threshold"], y=part[col], mode="lines+markers", name=f"depth {d}",
                                     legendgroup=str(d), showlegend=i == 1, line_color=CONFIG_COLOURS[(j + 2) % 6],
                                     hovertemplate=f"depth {d}, " + "threshold %{x:.2f}: %{y:.2f}<extra></extra>"),
                          row=1, col=i)
    fig.add_hline(y=df["Belady per token"].iloc[0], line_dash="dash", line_color=ORACLE_COLOUR, row=1, col=3,
                  annotation_text="Belady")
    fig.update_xaxes(title_text="predictor threshold")
    fig.update_yaxes(rangemode="tozero")
    gate = " with the speculative gate" if df["gate"].iloc[0] else ""
    fig.update_layout(height=360, legend_title="prefetch depth",
                      title=f"duoserve{gate} at {df['slots'].iloc[0]} slots: the threshold trades misses against "
                            f"wasted copies ({df['device'].iloc[0]})")
    return fig

"""What notebook 03 runs: train the layer-level predictor live, compare it with the baselines, and
trade recall against bytes moved with the threshold.

Everything goes through ``duoserve_core.predict``: the training API (scikit-learn MLPs exported to
torch), the baselines fitted on the same training tokens, and the evaluation's counting rules
(``evaluate.count``), so the numbers here are the ``predict eval`` command's numbers.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from duoserve_core.predict import LayerPredictor, load_predictor, train_predictor
from duoserve_core.predict.baselines import Baseline, fit_baselines
from duoserve_core.predict.data import TraceArrays, load_arrays, multi_hot
from duoserve_core.predict.evaluate import MIXTRAL_NF4_EXPERT_BYTES, evaluate

from .paths import BUNDLED_PREDICTOR, DATA

TRAIN_TRACE = str(DATA / "traces" / "small-moe-train.parquet")
TEST_TRACE = str(DATA / "traces" / "small-moe-heldout.parquet")
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))
METHOD_COLOURS = {"predictor (live)": "#e45756", "predictor (bundled)": "#b279a2", "affinity": "#4c78a8",
                  "previous_token": "#72b7b2", "popularity": "#9d755d", "speculative_gate": "#f58518"}


@functools.lru_cache(maxsize=2)
def load_split(train: str = TRAIN_TRACE, test: str = TEST_TRACE) -> tuple[TraceArrays, TraceArrays]:
    """(training tokens, held-out tokens) of the bundled traces, every phase."""
    return load_arrays([train]), load_arrays([test])


@dataclass
class Trained:
    predictor: LayerPredictor
    seconds: float


def train(depth: int = 2, epochs: int = 10, hidden: int = 64, seed: int = 0, trace: str = TRAIN_TRACE) -> Trained:
    """Fit one MLP per (layer, depth) on the decode tokens of ``trace``, ``epochs`` passes each."""
    t0 = time.perf_counter()
    predictor = train_predictor([trace], depth=depth, hidden=(hidden,) if hidden else (), seed=seed,
                                max_iter=epochs, jobs=1)
    return Trained(predictor, time.perf_counter() - t0)


def describe(trained: Trained) -> str:
    """One line on what was just fitted (Markdown)."""
    p = trained.predictor
    hidden = ",".join(map(str, p.hidden)) or "none (logistic regression)"
    return (f"Fitted **{len(p.params)} MLPs** (one per source layer and depth, depth {p.depth}, hidden {hidden}, "
            f"{p.training['max_iter']} epochs at most) on **{p.training['samples']} decode tokens** of "
            f"{p.training['requests']} prompts in **{trained.seconds:.1f} s**.")


class PredictorMethod:
    """A saved predictor scored beside the live one, through the baselines' interface."""

    def __init__(self, predictor: LayerPredictor, name: str):
        self.predictor, self.name = predictor, name

    def scores(self, layer: int, d: int, data: TraceArrays) -> torch.Tensor | None:
        if d > self.predictor.depth_at(layer):
            return None
        with torch.inference_mode():
            feats = self.predictor.features(layer, data.experts, data.weights, data.prev_experts)
            return self.predictor.predict(layer, feats)[:, d - 1]


def methods_for(train_data: TraceArrays, depth: int, bundled: bool = True) -> list[Baseline]:
    """The baselines fitted on the training decode tokens, and the bundled predictor (200 epochs)."""
    methods = fit_baselines(train_data.select(("decode",)), depth)
    if bundled:
        methods.insert(0, PredictorMethod(load_predictor(BUNDLED_PREDICTOR), "predictor (bundled)"))
    return methods


def compare(predictor: LayerPredictor, train_data: TraceArrays, test_data: TraceArrays, *, threshold: float = 0.5,
            expert_bytes: int = MIXTRAL_NF4_EXPERT_BYTES, bundled: bool = True) -> dict:
    """``predict eval``'s result: every method, every depth, on the held-out decode tokens."""
    result = evaluate(test_data, predictor, methods_for(train_data, predictor.depth, bundled), threshold=threshold,
                      expert_bytes=expert_bytes)
    result["methods"] = {("predictor (live)" if name == "predictor" else name): v
                         for name, v in result["methods"].items()}
    return result


def comparison_table(result: dict) -> pd.DataFrame:
    """One row per method and depth: exact top-k, at least half right, recall at equal bytes."""
    k = result["top_k"]
    rows = []
    for name, per_depth in result["methods"].items():
        for d, r in per_depth.items():
            o = r["overall"]
            rows.append({"method": name, "depth": int(d), f"exact top-{k}": o["exact_topk"],
                         "at least half": o["half_correct"], f"recall @ {result['threshold']:.2f}": o["recall"],
                         f"precision @ {result['threshold']:.2f}": o["precision"],
                         **{f"R@{m}": o["recall_at"][str(m)] for m in result["recall_at_sizes"]}})
    return pd.DataFrame(rows).set_index(["method", "depth"]).astype(float, errors="ignore").round(3)


def equal_bytes_figure(result: dict) -> go.Figure:
    """Recall when every method prefetches its m best-scored experts per layer (equal bytes), per depth."""
    depth = result["depth"]
    fig = make_subplots(rows=1, cols=depth, shared_yaxes=True,
                        subplot_titles=[f"{d} layer{'s' if d > 1 else ''} ahead" for d in range(1, depth + 1)])
    for name, per_depth in result["methods"].items():
        for d in range(1, depth + 1):
            r = per_depth.get(str(d))
            if r is None:
                continue
            sizes = [m for m in result["recall_at_sizes"] if r["overall"]["recall_at"].get(str(m)) is not None]
            fig.add_trace(go.Bar(x=[f"{m} experts" for m in sizes], y=[r["overall"]["recall_at"][str(m)] for m in sizes],
                                 name=name, marker_color=METHOD_COLOURS.get(name), legendgroup=name, showlegend=d == 1,
                                 hovertemplate=name + ", %{x} per layer: recall %{y:.3f}<extra></extra>"),
                          row=1, col=d)
    fig.update_layout(barmode="group", height=360, legend_title="method",
                      title="Recall at equal bytes: each method prefetches its m best experts per layer")
    fig.update_yaxes(title_text="recall (share of needed experts prefetched)", range=[0, 1], row=1, col=1)
    fig.update_xaxes(title_text="experts prefetched per layer")
    return fig


def per_layer_figure(result: dict, d: int = 1) -> go.Figure:
    """Recall@k per target layer, ``d`` layers ahead: where prediction is easy and where it is not."""
    k = result["top_k"]
    fig = go.Figure()
    for name, per_depth in result["methods"].items():
        r = per_depth.get(str(d))
        if r is None:
            continue
        layers = sorted(r["per_layer"], key=int)
        fig.add_trace(go.Scatter(x=[int(t) for t in layers], y=[r["per_layer"][t]["recall_at"][str(k)] for t in layers],
                                 mode="lines+markers", name=name, line_color=METHOD_COLOURS.get(name),
                                 hovertemplate=name + ", layer %{x}: recall@" + str(k) + " %{y:.3f}<extra></extra>"))
    fig.update_layout(height=320, xaxis_title="target layer", yaxis=dict(title=f"recall@{k}", range=[0, 1]),
                      title=f"Recall@{k} per target layer, predicted {d} layer{'s' if d > 1 else ''} ahead",
                      legend_title="method")
    return fig


# -- the threshold: recall against bytes ------------------------------------------------------------
def threshold_sweep(predictor: LayerPredictor, train_data: TraceArrays, test_data: TraceArrays, *,
                    thresholds: tuple[float, ...] = THRESHOLDS, expert_bytes: int = MIXTRAL_NF4_EXPERT_BYTES,
                    bundled: bool = True) -> pd.DataFrame:
    """Per method, depth and threshold: recall, precision and what a threshold prefetch moves.

    ``experts_per_token`` is the expected number of experts prefetched for one decode token over
    all target layers at that depth (``bytes_per_token`` at ``expert_bytes`` each); a perfect
    predictor moves exactly top-k per layer. Scores are computed once and reused for every
    threshold, with ``evaluate.count``'s rules.
    """
    test = test_data.select(("decode",))
    meta = test.meta
    methods = [PredictorMethod(predictor, "predictor (live)")] + methods_for(train_data, predictor.depth, bundled)
    rows = []
    for method in methods:
        for d in range(1, predictor.depth + 1):
            pairs = []
            for target in range(d, meta.num_layers):
                scores = method.scores(target - d, d, test)
                if scores is None:
                    break
                pairs.append((scores, test.experts[:, target]))
            if not pairs:
                continue
            binary = all(bool(((s == 0) | (s == 1)).all()) for s, _ in pairs)
            truths = [multi_hot(actual, meta.num_experts).bool() for _, actual in pairs]
            actual = sum(int(t.sum()) for t in truths)
            n = sum(t.shape[0] for t in truths)
            for t in (thresholds if not binary else (0.5,)):
                # evaluate.count's recall and precision of the set {score >= t}, summed over target layers
                above = [scores >= t for scores, _ in pairs]
                hits = sum(int((a & truth).sum()) for a, truth in zip(above, truths))
                predicted = sum(int(a.sum()) for a in above)
                per_layer = predicted / n
                rows.append({"method": method.name, "depth": d, "threshold": None if binary else t,
                             "recall": hits / actual, "precision": hits / predicted if predicted else None,
                             "experts_per_layer": per_layer, "experts_per_token": per_layer * len(pairs),
                             "bytes_per_token": per_layer * len(pairs) * expert_bytes,
                             "target_layers": len(pairs), "needed_per_token": meta.top_k * len(pairs)})
    return pd.DataFrame(rows)


def threshold_figure(sweep: pd.DataFrame, threshold: float, depth: int = 1) -> go.Figure:
    """Recall against experts moved per token as the threshold moves; the chosen threshold marked."""
    part = sweep[sweep["depth"] == depth]
    fig = go.Figure()
    for name, rows in part.groupby("method", sort=False):
        colour = METHOD_COLOURS.get(name)
        mb = rows["bytes_per_token"] / 1e6
        if rows["threshold"].isna().all():  # a 0/1 guess: one point whatever the threshold
            fig.add_trace(go.Scatter(x=rows["experts_per_token"], y=rows["recall"], mode="markers", name=name,
                                     marker=dict(size=11, symbol="diamond", color=colour), customdata=mb,
                                     hovertemplate=name + ": %{x:.1f} experts/token (%{customdata:.0f} MB at "
                                                   "Mixtral-8x7B NF4), recall %{y:.3f}<extra></extra>"))
            continue
        fig.add_trace(go.Scatter(x=rows["experts_per_token"], y=rows["recall"], mode="lines+markers", name=name,
                                 line_color=colour, marker_size=5, customdata=np.stack([rows["threshold"], mb], axis=1),
                                 hovertemplate=name + ", threshold %{customdata[0]:.2f}: %{x:.1f} experts/token "
                                               "(%{customdata[1]:.0f} MB), recall %{y:.3f}<extra></extra>"))
        chosen = rows.iloc[(rows["threshold"] - threshold).abs().argsort()[:1]]
        live = name == "predictor (live)"
        fig.add_trace(go.Scatter(x=chosen["experts_per_token"], y=chosen["recall"],
                                 mode="markers+text" if live else "markers",
                                 marker=dict(size=14 if live else 10, color=colour, line=dict(width=2, color="black")),
                                 text=[f"threshold {threshold:.2f}"] if live else None, textposition="top left",
                                 showlegend=False, hoverinfo="skip"))
    if len(part):
        fig.add_vline(x=part["needed_per_token"].iloc[0], line_dash="dot",
                      annotation_text=f"what the router uses: top-k x {part['target_layers'].iloc[0]} layers")
    fig.update_layout(height=420, legend_title="method", yaxis=dict(title="recall (needed experts prefetched)", range=[0, 1.02]),
                      xaxis_title="experts prefetched per decode token, all target layers "
                                  "(one Mixtral-8x7B NF4 expert = 99 MB)",
                      title=f"Recall against bytes moved, {depth} layer{'s' if depth > 1 else ''} ahead: "
                            f"threshold {threshold:.2f} marked")
    return fig


def at_threshold(sweep: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The sweep's rows at the chosen threshold (0/1 methods at their only point)."""
    keep = sweep["threshold"].isna() | ((sweep["threshold"] - threshold).abs() < 1e-6)
    out = sweep[keep].drop(columns=["needed_per_token", "target_layers"]).copy()
    out["MB per token (Mixtral-8x7B NF4)"] = (out.pop("bytes_per_token") / 1e6).round(0)
    return out.set_index(["method", "depth"]).round(3)


def token_figure(predictor: LayerPredictor, test_data: TraceArrays, token: int = 0) -> go.Figure:
    """One decode token: the predictor's probability for every expert of layers 1..L-1, each made one
    layer earlier, with the experts the router then chose marked."""
    test = test_data.select(("decode",))
    meta = test.meta
    one = TraceArrays(meta, test.experts[token:token + 1], test.weights[token:token + 1],
                      test.prev_experts[token:token + 1], test.phase[token:token + 1],
                      None, test.has_weights, 1)
    probs = np.zeros((meta.num_layers, meta.num_experts))
    with torch.inference_mode():
        for layer in range(meta.num_layers - 1):
            feats = predictor.features(layer, one.experts, one.weights, one.prev_experts)
            probs[layer + 1] = predictor.predict(layer, feats)[0, 0].numpy()
    chosen = multi_hot(one.experts[0], meta.num_experts).numpy()
    fig = go.Figure(go.Heatmap(z=probs[1:], y=list(range(1, meta.num_layers)), colorscale="Blues", zmin=0, zmax=1,
                               colorbar_title="P", hovertemplate="layer %{y}, expert %{x}: P %{z:.2f}<extra></extra>"))
    ys, xs = np.nonzero(chosen[1:])
    fig.add_trace(go.Scatter(x=xs, y=ys + 1, mode="markers", marker=dict(symbol="x", size=12, color="#e45756"),
                             name="router's choice", hoverinfo="skip"))
    fig.update_layout(height=340, xaxis_title="expert", yaxis_title="layer", legend=dict(orientation="h", y=-0.25),
                      title=f"Decode token {token} of the held-out trace: predicted one layer ahead vs chosen")
    return fig


# -- what a prediction costs on the hot path -----------------------------------------------------------
def hot_path_table(predictor: LayerPredictor, iters: int = 200) -> pd.DataFrame:
    """Median µs per layer for features + prediction at batch 1: measured here now, beside the
    committed GPU measurements (``benchmarks/results/predictor_bench_*.json``)."""
    import json

    from duoserve_core.predict.latency import bench

    from .gpu_results import RESULTS

    live = bench(predictor, batch=1, iters=iters, warmup=20)
    device = "cpu" if live["device"] == "cpu" else live["device"]
    rows = [{"measured on": f"{device} (this machine, now)", "date": "live",
             "features + predict (µs)": live["median_features_and_predict_us"],
             "predict alone (µs)": live["median_predict_us"],
             "CUDA graph replay (µs)": live.get("median_cuda_graph_us")}]
    for path in sorted(RESULTS.glob("predictor_bench_*.json")):
        try:
            r = json.loads(path.read_text())
            med = r["median_us"]
            rows.append({"measured on": r["device"], "date": r["date"], "features + predict (µs)": med["features_predict"],
                         "predict alone (µs)": med["predict"], "CUDA graph replay (µs)": med.get("cuda_graph")})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return pd.DataFrame(rows).set_index("measured on").round(1)

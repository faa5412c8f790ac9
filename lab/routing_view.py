"""Notebook 05's routing section: decode at Mixtral-8x7B size on routing of a chosen predictability.

The bundled model routes far more predictably than Mixtral does, so a decode schedule that wins on
it may lose on real routing. This view runs ``duoserve``, ``lru`` and ``on-demand`` through the
simulator (``duoserve_core.sim.decode_routing``: Mixtral-8x7B, NF4, the committed H200 calibration)
on one routing source at several budgets, and draws them against Belady's bound: the oracle's
decode loads at that many slots (``sim.reference``, from the routing alone) with every copy hidden
behind a decode step's compute, max(loads x copy time / tokens, compute) per token. Its compute term
is the calibration's whole decode step, host work included (about 57 ms here, what the simulator
gives with every expert resident); a run's own ``bounds["oracle_tpot_s"]`` counts only the compute
stream's busy time, which in an offloaded run is a quarter to a half of that, far below what any
policy pays per token. The figures are deterministic (no policy decision time is charged).

Short requests keep it to a few seconds per budget on a CPU: one request of a 64-token prompt and
32 tokens, the routing drawn with seed 1 (the bundled trace: its first request, 84 tokens long, so
the last positions wrap round to its start, replayed at 32 layers).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from duoserve_core.oracle import FALLBACKS, foresight_loads
from duoserve_core.policy import PolicyKnobs
from duoserve_core.sim import Calibration, load_calibration, reference
from duoserve_core.sim.decode_routing import (BUNDLED_TRACE, CALIBRATION, EXPERTS, LAYERS, TOP_K, decode_result,
                                              mixtral_model, mixtral_replay, preset_routing)
from duoserve_core.traces import RoutingReplay, Trace, read_trace
from duoserve_core.traces.synth import PRESETS, measure

from .decode_view import ORACLE_COLOUR
from .gpu_results import RESULTS

BUNDLED = "bundled trace"
SOURCES = (*PRESETS, BUNDLED)
BUDGETS = (8, 16, 21, 32, 64, 128)
POLICIES = ("duoserve", "lru", "on-demand")
COLOURS = {"duoserve": "#e45756", "lru": "#4c78a8", "on-demand": "#9d755d"}
PROMPT, GEN, SEED = 64, 32, 1
# The H200 runs of two routing sources (Mixtral-8x7B synthesized, NF4, 15% = 21 slots, prompt 512, 128
# tokens, median of 3; duoserve with the recorded gate on the bundled trace), simulated at the same
# setting by benchmarks/sim_vs_measured.py with the calibration it names.
MEASURED_VS_SIMULATED = RESULTS / "sim_vs_decode128_h200.json"
MEASURED_FILES = {"mixtral-like": "bench_h200_8x7b_mixtral_like_decode128.json",
                  BUNDLED: "bench_h200_8x7b_trace_gate_decode128.json"}
# duoserve's decode TPOT over the better of lru and on-demand, as tests/test_decode_routing.py holds it
LIMIT = 1.02


# -- the routing ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _bundled() -> Trace:
    return read_trace(BUNDLED_TRACE)


@functools.lru_cache(maxsize=8)
def routing(source: str, prompt_len: int = PROMPT, gen: int = GEN) -> Trace:
    """The routing the runs replay: one request of a preset (seed ``SEED``), or the bundled trace."""
    if source == BUNDLED:
        return _bundled()
    if source not in PRESETS:
        raise ValueError(f"unknown routing source {source!r}; choose one of {', '.join(SOURCES)}")
    return Trace(*preset_routing(source, seed=SEED, requests=1, tokens=gen, prompt_len=prompt_len))


@functools.lru_cache(maxsize=8)
def _replay(source: str, prompt_len: int, gen: int) -> RoutingReplay:
    return mixtral_replay(routing(source, prompt_len, gen))


@functools.lru_cache(maxsize=1)
def _calibration() -> Calibration:
    return load_calibration(CALIBRATION)


# -- the runs and the bound -------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _runs_at(source: str, slots: int, prompt_len: int, gen: int) -> tuple[dict, ...]:
    """Every policy of ``POLICIES`` at one budget: one row each (cached, so a knob change that adds a
    budget runs only that budget)."""
    model, cal, replay = mixtral_model(slots, prompt_len + gen), _calibration(), _replay(source, prompt_len, gen)
    rows = []
    for policy in POLICIES:
        r = decode_result(model, cal, replay, PolicyKnobs(policy=policy), prompt_len, gen)
        tokens = r["new_tokens"] - 1
        b, phases = r["bounds"], r["phases"]
        rows.append({"source": source, "slots": slots, "policy": policy, "prompt tokens": prompt_len,
                     "generated tokens": gen, "decode tokens": tokens,
                     "TPOT (ms)": r["tpot_s"] * 1e3,
                     "copies per token": phases["decode"]["h2d_copies"] / tokens,
                     "copied in the whole run": phases["prefill"]["h2d_copies"] + phases["decode"]["h2d_copies"],
                     "Belady's loads": b["oracle_decode_loads"],
                     "Belady's loads in the whole run": b["oracle_total_loads"]})
    return tuple(rows)


def belady(source: str, prompt_len: int = PROMPT, gen: int = GEN) -> pd.DataFrame:
    """Belady's decode loads and TPOT bound at every slot count (top-k to every expert), from the
    routing alone (``sim.reference``: one pass gives every capacity)."""
    return _belady(source, prompt_len, gen).copy()


@functools.lru_cache(maxsize=8)
def _workload(source: str, prompt_len: int, gen: int) -> reference.Workload:
    """The request's expert uses in order, from the routing alone (what Belady and foresight read)."""
    return reference.workload(_replay(source, prompt_len, gen), [(0, prompt_len, gen)], LAYERS, EXPERTS)


@functools.lru_cache(maxsize=8)
def _belady(source: str, prompt_len: int, gen: int) -> pd.DataFrame:
    model = mixtral_model(LAYERS * EXPERTS, prompt_len + gen)
    w = _workload(source, prompt_len, gen)
    rows = reference.table(w, model, _calibration(), reference.sweep(w, ("belady",)))
    return pd.DataFrame({"slots": [r["slots"] for r in rows], "Belady's loads": [r["decode_loads"] for r in rows],
                         "Belady TPOT (ms)": [r["tpot_overlapped_s"] * 1e3 for r in rows]}).set_index("slots")


def budget_sweep(source: str, budgets: Sequence[int] = BUDGETS, prompt_len: int = PROMPT, gen: int = GEN
                 ) -> pd.DataFrame:
    """One row per budget and policy: TPOT, copies, Belady's loads and bound, and TPOT over the bound."""
    df = pd.DataFrame([row for slots in sorted(set(budgets)) for row in _runs_at(source, slots, prompt_len, gen)])
    df["Belady TPOT (ms)"] = _belady(source, prompt_len, gen).loc[df["slots"], "Belady TPOT (ms)"].to_numpy()
    df["TPOT / Belady"] = df["TPOT (ms)"] / df["Belady TPOT (ms)"]
    df["Belady's loads per token"] = df["Belady's loads"] / df["decode tokens"]
    return df


# How far ahead a cache must see: the next W layer steps (W = 32 reaches the same layer of the next token).
WINDOWS = (0, 1, 2, 4, 8, 16, 24, 32, 64, math.inf)


@functools.lru_cache(maxsize=16)
def foresight(source: str, slots: int, prompt_len: int = PROMPT, gen: int = GEN) -> dict:
    """Decode copies per token of a cache that sees the next W layer steps of the routing
    (``oracle.foresight_loads``, the better of its LRU and LFU fallbacks; W = inf is Belady) beside
    what duoserve and lru copy in the simulator, and, on the bundled trace, duoserve with the gate's
    recorded guesses; with each one's TPOT over Belady's bound. Why: it says how much of the gap to
    Belady a policy could close by seeing as far as its sources do (the gate: one layer)."""
    # the policies' runs are the budget sweep's own (cached), the uses those Belady's bound reads
    runs = {r["policy"]: r for r in _runs_at(source, slots, prompt_len, gen) if r["policy"] in ("duoserve", "lru")}
    copies = {name: r["copies per token"] for name, r in runs.items()}
    tpot_ms = {name: r["TPOT (ms)"] for name, r in runs.items()}
    if source == BUNDLED:  # the trace records the speculative gate's guesses, as the H200 runs used
        gate = decode_result(mixtral_model(slots, prompt_len + gen), _calibration(), _replay(source, prompt_len, gen),
                             PolicyKnobs(policy="duoserve", speculative_gate=True), prompt_len, gen)
        copies["duoserve + gate"] = gate["phases"]["decode"]["h2d_copies"] / (gate["new_tokens"] - 1)
        tpot_ms["duoserve + gate"] = gate["tpot_s"] * 1e3
    w = _workload(source, prompt_len, gen)
    starts = w.group_starts.tolist()
    groups = [set(w.keys[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    first_decode = next(g for g, a in enumerate(starts[:-1]) if w.counted[a])  # prefill uses are not counted
    curve = {("inf" if window == math.inf else str(window)):
             min(foresight_loads(groups, slots, window, fallback=f, count_from=first_decode) for f in FALLBACKS)
             / w.decode_tokens for window in WINDOWS}
    bound_ms = _belady(source, prompt_len, gen).loc[slots, "Belady TPOT (ms)"]
    return {"source": source, "slots": slots, "prompt_len": prompt_len, "gen": gen, "decode_tokens": w.decode_tokens,
            "copies_per_token": copies, "belady_copies_per_token": curve["inf"], "foresight_copies_per_token": curve,
            "tpot_over_belady": {name: ms / bound_ms for name, ms in tpot_ms.items()}}


def foresight_figure(result: dict) -> go.Figure:
    """Copies per token against how far ahead the cache sees, the policies' own copies as lines across."""
    curve = result["foresight_copies_per_token"]
    x = [str(w) for w in curve]
    fig = go.Figure(go.Scatter(x=x, y=list(curve.values()), mode="lines+markers", name="Belady within the window",
                               line_color=ORACLE_COLOUR,
                               hovertemplate="seeing %{x} layer steps ahead: %{y:.1f} copies per token<extra></extra>"))
    for name, copies in result["copies_per_token"].items():
        colour = COLOURS.get(name, COLOURS["duoserve"])
        fig.add_hline(y=copies, line_color=colour, line_dash="dot" if "gate" in name else "solid",
                      annotation_text=f"{name}: {copies:.1f}", annotation_position="top left")
    fig.add_vline(x=x.index("32"), line_dash="dot", line_color="grey",  # a category's place on the axis
                  annotation_text="the next token's same layer")
    fig.update_xaxes(title_text="layer steps the cache sees ahead (W; inf: Belady)", type="category")
    fig.update_yaxes(title_text="decode copies per token", rangemode="tozero")
    fig.update_layout(height=360, showlegend=False,
                      title=f"How far ahead a cache must see: {result['source']} routing, {result['slots']} slots "
                            f"(simulated Mixtral-8x7B; a {result['prompt_len']}-token prompt, {result['gen']} tokens)")
    return fig


def violations(df: pd.DataFrame) -> list[str]:
    """What breaks the section's claims, one line each (none: the list is empty): no policy copies
    fewer experts over the run than Belady loads or decodes faster than Belady's bound, and duoserve
    decodes within ``LIMIT`` of the better plain cache."""
    copied, oracle = df["copied in the whole run"], df["Belady's loads in the whole run"]
    out = [f"{df.at[i, 'policy']} at {df.at[i, 'slots']} slots copied {copied[i]} experts over the run, "
           f"Belady loads {oracle[i]}" for i in df.index[copied < oracle]]
    out += [f"{df.at[i, 'policy']} at {df.at[i, 'slots']} slots decodes in {df.at[i, 'TPOT (ms)']:.2f} ms, under "
            f"Belady's bound of {df.at[i, 'Belady TPOT (ms)']:.2f} ms" for i in df.index[df["TPOT / Belady"] < 1]]
    for slots, part in df.groupby("slots"):
        tpot = part.set_index("policy")["TPOT (ms)"]
        ratio = tpot["duoserve"] / min(tpot["lru"], tpot["on-demand"])
        if ratio > LIMIT:
            out.append(f"duoserve at {slots} slots decodes {ratio:.3f}x the better plain cache's TPOT (limit {LIMIT})")
    return out


# -- what the notebook shows ------------------------------------------------------------------------
def budget_figure(df: pd.DataFrame, slots: int | None = None) -> go.Figure:
    """Decode TPOT of each policy against the budget, Belady's bound dashed; ``slots`` marked."""
    source, prompt_len, gen, tokens = df[["source", "prompt tokens", "generated tokens", "decode tokens"]].iloc[0]
    fig = go.Figure()
    for policy in POLICIES:
        part = df[df["policy"] == policy]
        fig.add_trace(go.Scatter(x=part["slots"], y=part["TPOT (ms)"], mode="lines+markers", name=policy,
                                 line_color=COLOURS[policy], customdata=part[["copies per token", "TPOT / Belady"]],
                                 hovertemplate=policy + ", %{x} slots: %{y:.1f} ms, %{customdata[0]:.1f} copies per "
                                 "token, %{customdata[1]:.2f}x Belady<extra></extra>"))
    bound = _belady(source, int(prompt_len), int(gen)).loc[df["slots"].min():df["slots"].max()]
    fig.add_trace(go.Scatter(x=bound.index, y=bound["Belady TPOT (ms)"], mode="lines", name="Belady's bound",
                             line=dict(color=ORACLE_COLOUR, dash="dash"), customdata=bound["Belady's loads"] / tokens,
                             hovertemplate="Belady, %{x} slots: %{y:.1f} ms (%{customdata:.1f} loads per token)"
                             "<extra></extra>"))
    if slots is not None:
        fig.add_vline(x=slots, line_dash="dot", line_color="grey", annotation_text=f"{slots} slots")
    fig.update_xaxes(title_text=f"budget (expert slots of {LAYERS * EXPERTS})", type="log",
                     tickvals=sorted(df["slots"].unique()))
    fig.update_yaxes(title_text="decode TPOT (ms)", rangemode="tozero")
    fig.update_layout(height=380, legend_title="policy",
                      title=f"Mixtral-8x7B on {source} routing (simulated H200, NF4; a {prompt_len}-token prompt, "
                            f"{tokens} decode tokens)")
    return fig


def at_budget(df: pd.DataFrame, slots: int) -> pd.DataFrame:
    """The sweep's rows at one budget, by policy."""
    columns = ["TPOT (ms)", "TPOT / Belady", "copies per token", "Belady's loads per token", "Belady TPOT (ms)"]
    return df[df["slots"] == slots].set_index("policy")[columns].round(2)


def measured(source: str, path=MEASURED_VS_SIMULATED) -> pd.DataFrame | None:
    """The GPU's decode on this routing source beside the simulator's at the same setting, one row per
    policy (``None`` where no GPU run replayed it). Read from the committed comparison, whose bench
    files carry the device and date; the columns say both."""
    name = MEASURED_FILES.get(source)
    if name is None:
        return None
    record = json.loads(Path(path).read_text())
    bench = json.loads((Path(path).parent / name).read_text())
    rows = {r["policy"]: r for r in record["rows"] if r["file"] == name}
    table = pd.DataFrame({
        "measured TPOT (ms)": {p: rows[p]["tpot_measured_s"] * 1e3 for p in POLICIES},
        "simulated TPOT (ms)": {p: rows[p]["tpot_sim_s"] * 1e3 for p in POLICIES},
        "copies measured / simulated": {p: f"{rows[p]['h2d_copies_measured']} / {rows[p]['h2d_copies_sim']}"
                                        for p in POLICIES},
    }).rename_axis("policy").round(1)
    r0 = rows[POLICIES[0]]
    table.attrs["caption"] = (f"Measured on {bench['device']}, {bench['date']} (`{name}`): Mixtral-8x7B synthesized, NF4, "
                              f"{r0['slots']} slots, a {r0['prompt_len']}-token prompt, {r0['gen']} tokens, median of 3; "
                              f"simulated with `{record['calibration']}`.")
    return table


def statistics(source: str) -> pd.DataFrame:
    """The routing's predictability (``traces.synth.measure``) beside uniform random routing's.

    Measured on more routing than one request gives, so the figures are not noise: a preset at the
    size it was tuned at (64 requests of 64 decode tokens), the bundled trace whole. The bundled
    trace is measured at its own 8 layers: replayed at 32, each block of 8 layers relabels the
    experts by a fixed permutation, which leaves every statistic here unchanged."""
    m = _measured(source)
    repeat = pd.Series(m["first_expert_repeat"])
    label = f"{source} ({m['decode_tokens']:,} decode tokens)"
    k, E = TOP_K, EXPERTS
    rows = {
        "popularity skew (Gini, mean over layers)": (pd.Series(m["popularity_skew"]).mean(), 0.0),
        "first-expert repeat, mean over layers": (repeat.mean(), 1 / E),
        "first-expert repeat, least repeating layer": (repeat.min(), 1 / E),
        "first-expert repeat, most repeating layer": (repeat.max(), 1 / E),
        f"previous-token recall@{k}": (m["previous_token_recall_at_k"], k / E),
        f"popularity recall@{k}": (m["popularity_recall_at_k"], k / E),
    }
    return pd.DataFrame(rows, index=[label, "uniform random routing"]).T.round(3)


@functools.lru_cache(maxsize=8)
def _measured(source: str) -> dict:
    if source not in SOURCES:
        raise ValueError(f"unknown routing source {source!r}; choose one of {', '.join(SOURCES)}")
    return measure(_bundled() if source == BUNDLED else Trace(*preset_routing(source)))

"""Notebook 05's CPU-lane section: a missed expert computed on the host while others cross PCIe.

With ``cpu_experts="auto"`` (``policy.host_lane``) a layer's missed experts are split between the
copy stream and the host: one int4 expert copies in about 1.75 ms on the H200's link and computes one
token on its 16 host cores in 1.78 ms idle (2.7-2.9 ms while copies run), so two misses of a layer
can finish in about the time of the slower of the two instead of their sum. This view shows what the
simulator makes of that (Mixtral-8x7B, int4 experts, NF4 attention, the committed H200 calibration
``CALIBRATION``, whose ``host_lane`` section was measured under concurrent copies at 4, 8 and 16
threads) beside what the H200 measured (``MEASURED``: the bench at 15%, a 512-token prompt, 128
tokens, median of 3, CUDA graphs, 16 lane threads, 2026-12-02).

The lane first lost on the H200 (2026-11-30: the host thread waited at each layer's end for the
lane, so the next layer's attention could not be queued while it ran). Now the compute stream waits
for the lane instead (``experts.stream_gate``) and the lane wins for a single request: on-demand
141.5 -> 108.0 ms, lru 140.9 -> 112.1, duoserve 129.6 -> 106.5 ms (the seventh runs of 2026-12-02, with
``auto`` following the lane's measured speed and the collector's old objects frozen during a
generation). The simulator models the hand-off; with the committed int4 calibration (CUDA graphs, the
relayout's time by phase) its 128-token runs are 11-15% above these lane-off runs (4-7% above the
sixth runs') and 1-5% above the lane-on ones (docs/cpu_lane.md).

Short requests keep a run to a fraction of a second on a CPU: one request of the measured prompt
length (512 tokens) and ``GEN`` tokens, routing from ``lab.routing_view`` (seed 1, not the
measured run's draw), no policy decision time charged, so every figure is deterministic.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from duoserve_core.policy import PolicyKnobs
from duoserve_core.sim import Calibration, SimModel, build_model, load_calibration
from duoserve_core.sim.calibration import format_name
from duoserve_core.sim.decode_routing import DATA, decode_result, mixtral_replay
from duoserve_core.traces import RoutingReplay

from . import routing_view
from .figures import KIND_COLOURS
from .gpu_results import RESULTS
from .runs import BUNDLED, MIXTRAL_8_LAYERS_INT4, LiveRun, ModelChoice, live_run

CALIBRATION = DATA / "calibration" / "h200_mixtral-8x7b_int4.json"
MEASURED = {"off": RESULTS / "bench_h200_8x7b_int4_mixtral_like_cpu_off_graphs_freeze.json",
            "auto": RESULTS / "bench_h200_8x7b_int4_mixtral_like_cpu_auto_t16_graphs_freeze.json"}
SOURCES = routing_view.SOURCES
POLICIES = ("on-demand", "lru", "duoserve")
MODES = ("off", "auto", "half")  # half: a seeded random half of the needed experts forced onto the lane
COLOURS = routing_view.COLOURS
PROMPT, GEN = 512, 32
QUANT, ATTENTION_QUANT = "int4", "nf4"   # what the calibration and the measured runs used
LANES = {"compute": "compute stream", "copy": "copy stream", "cpu": "CPU lane",
         "relayout": "relayout stream"}   # int4 copies on a GPU (and a calibration that times them)
CPU_EXPERT_COLOUR = "#54a24b"
SIMULATED = "simulated, H200 calibration"
# one marker per lane setting in the TPOT-against-share figure
SYMBOLS = {None: "circle", 4: "triangle-up", 8: "square", 16: "diamond"}


# -- the simulated runs -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def calibration() -> Calibration:
    return load_calibration(CALIBRATION)


def thread_choices() -> tuple[int, ...]:
    """The lane's thread counts the calibration measured for int4 experts (4, 8, 16 on the H200)."""
    cal = calibration()
    fmt = format_name(QUANT, cal)
    return tuple(sorted(t for f, t in cal.host_lane if f == fmt))


def settings(threads: tuple[int, ...] | None = None) -> tuple[tuple[str, int | None], ...]:
    """The lane settings a sweep runs: off, then auto and the forced half at each calibrated thread count."""
    threads = threads or thread_choices()
    return (("off", None), *(("auto", t) for t in threads), *(("half", t) for t in threads))


@functools.lru_cache(maxsize=8)
def model(slots: int, prompt_len: int = PROMPT, gen: int = GEN) -> SimModel:
    """Mixtral-8x7B with int4 experts and NF4 attention (the calibration's and the H200 runs' shape)."""
    return build_model("mixtral-8x7b", quant=QUANT, attention_quant=ATTENTION_QUANT, memory_budget=f"{slots}slots",
                       max_context=prompt_len + gen, device_type="cuda")


@functools.lru_cache(maxsize=128)
def _run(source: str, slots: int, policy: str, mode: str, threads: int | None, prompt_len: int, gen: int) -> dict:
    """One simulated request (``decode_result``'s bench record). Cached: treat it as read-only."""
    if mode not in MODES:
        raise ValueError(f"unknown CPU-lane mode {mode!r}; choose one of {', '.join(MODES)}")
    knobs = PolicyKnobs(policy=policy, cpu_experts=mode, cpu_threads=threads if mode != "off" else None)
    return decode_result(model(slots, prompt_len, gen), calibration(), _replay(source, prompt_len, gen), knobs,
                         prompt_len, gen)


@functools.lru_cache(maxsize=8)
def _replay(source: str, prompt_len: int, gen: int) -> RoutingReplay:
    return mixtral_replay(routing_view.routing(source, prompt_len, gen))


def cpu_share(phases: dict) -> float:
    """Of the experts decode needed, the fraction the CPU lane computed: ``host_computes`` over hits,
    misses and host computes (an expert the host computes is neither a hit nor a miss of the cache)."""
    d = phases["decode"]
    needed = d["hits"] + d["misses"] + d["host_computes"]
    return d["host_computes"] / needed if needed else 0.0


def _row(r: dict, policy: str, mode: str, threads: int | None, tokens: int) -> dict:
    """One run's figures; ``tokens``: its decode tokens (every token after the first)."""
    d = r["phases"]["decode"]
    return {"policy": policy, "CPU lane": mode, "threads": threads, "TPOT (ms)": r["tpot_s"] * 1e3,
            "CPU share": cpu_share(r["phases"]), "copies per token": d["h2d_copies"] / tokens,
            "host computes per token": d["host_computes"] / tokens, "decode tokens": tokens}


def sweep(source: str = "mixtral-like", slots: int = 23, prompt_len: int = PROMPT, gen: int = GEN) -> pd.DataFrame:
    """Every policy of ``POLICIES`` with the lane off and at auto with each calibrated thread count:
    TPOT, CPU share and copies per token, labelled ``SIMULATED``."""
    rows = [_row(_run(source, slots, policy, mode, threads, prompt_len, gen), policy, mode, threads, gen - 1)
            for policy in POLICIES for mode, threads in settings()]
    cal = calibration()
    return pd.DataFrame(rows).assign(source=source, slots=slots, kind=SIMULATED, device=f"simulated {cal.device}",
                                     date=cal.raw.get("date", "?"))


# -- one decode token ---------------------------------------------------------------------------------
def token_timeline(source: str = "mixtral-like", slots: int = 23, policy: str = "duoserve", mode: str = "auto",
                   threads: int | None = 16, step: int | None = None, prompt_len: int = PROMPT, gen: int = GEN
                   ) -> pd.DataFrame:
    """The simulated timeline rows of one decode step (default: the middle one), times in ms from the
    step's first span, with each row's lane named (``LANES``)."""
    step = gen // 2 if step is None else step
    if not 1 <= step < gen:
        raise ValueError(f"decode step {step}: the run decodes steps 1 to {gen - 1}")
    return _one_step(_run(source, slots, policy, mode, threads, prompt_len, gen)["timeline"], step)


def _one_step(rows: list[dict], step: int) -> pd.DataFrame:
    """Timeline rows of decode step ``step``, in ms from the step's first span, each row's lane named."""
    df = pd.DataFrame([r for r in rows if r["phase"] == "decode" and r["step"] == step])
    t0 = df["start_ms"].min()
    df["start_ms"] -= t0
    df["end_ms"] -= t0
    df["lane"] = df["stream"].map(LANES)
    return df


def _label(mode: str, threads: int | float | None) -> str:
    return "lane off" if mode == "off" else f"lane {mode}, {int(threads)} threads"   # a table's threads are floats


def timeline_figure(source: str = "mixtral-like", slots: int = 23, policy: str = "duoserve", threads: int = 16,
                    step: int | None = None, prompt_len: int = PROMPT, gen: int = GEN, mode: str = "half") -> go.Figure:
    """One decode token on the three lanes, the CPU lane off (top) and ``mode`` (below), one time axis."""
    step = gen // 2 if step is None else step
    titles, frames = [], []
    for mode, t in (("off", None), (mode, threads)):
        df = token_timeline(source, slots, policy, mode, t, step, prompt_len, gen)
        tpot = _run(source, slots, policy, mode, t, prompt_len, gen)["tpot_s"] * 1e3
        titles.append(f"{_label(mode, t)}: this token's spans end at {df['end_ms'].max():.1f} ms "
                      f"(run's TPOT {tpot:.1f} ms); {(df['stream'] == 'cpu').sum()} experts on the CPU lane")
        frames.append(df)
    return _panels(titles, frames, step, f"One decode token, {policy} at {slots} slots on {source} routing "
                                         f"({SIMULATED}, Mixtral-8x7B int4)")


def _panels(titles: list[str], frames: list[pd.DataFrame], step: int, title: str) -> go.Figure:
    """One decode token's spans on the three lanes, one panel per frame, on one time axis."""
    fig = make_subplots(rows=len(frames), cols=1, shared_xaxes=True, vertical_spacing=0.12, subplot_titles=titles)
    shown = set()
    for i, df in enumerate(frames, start=1):
        for kind, colour, part in _coloured(df):
            labels = [f"L{l}" + ("" if pd.isna(e) else f" E{int(e)}") for l, e in zip(part["layer"], part["expert"])]
            fig.add_trace(go.Bar(base=part["start_ms"], x=part["duration_ms"], y=part["lane"], orientation="h",
                                 name=kind, legendgroup=kind, showlegend=kind not in shown, marker_color=colour,
                                 customdata=labels, hovertemplate="%{customdata} " + kind +
                                 "<br>%{base:.2f} ms + %{x:.2f} ms<extra></extra>"), row=i, col=1)
            shown.add(kind)
        fig.update_yaxes(categoryorder="array", categoryarray=list(LANES.values())[::-1], row=i, col=1)
    fig.update_annotations(font_size=12)   # the panel titles
    fig.update_xaxes(title_text=f"time since the token's first span (ms), decode step {step}", row=len(frames), col=1)
    fig.update_layout(barmode="overlay", height=460, legend_title="work", title=title)
    return fig


def _coloured(df: pd.DataFrame):
    """(legend name, colour, rows) per kind of work; experts on the CPU lane get their own colour."""
    on_cpu = df["stream"] == "cpu"
    for kind, colour in KIND_COLOURS.items():
        part = df[(df["kind"] == kind) & ~on_cpu]
        if len(part):
            yield ("copy" if kind == "h2d" else kind), colour, part
    if on_cpu.any():
        yield "expert on the CPU", CPU_EXPERT_COLOUR, df[on_cpu]


# -- measured here -----------------------------------------------------------------------------------
LIVE_SLOTS, LIVE_TOKENS = 16, 12   # of the live model's 64 experts (8 layers x 8); a short request


def live_model(device: str) -> ModelChoice:
    """Int4 Mixtral-size experts (8 layers) on a GPU, where the lane races real copies; the bundled
    model on a CPU, where the same code runs (``auto`` is off there: the forced modes show the work)."""
    return MIXTRAL_8_LAYERS_INT4 if device.startswith("cuda") else BUNDLED


def live_token(device: str, policy: str = "duoserve", mode: str = "half", threads: int | None = 16,
               slots: int = LIVE_SLOTS, new_tokens: int = LIVE_TOKENS) -> tuple[pd.DataFrame, LiveRun]:
    """One request on the real runtime (``lab.runs.live_run``) with the CPU lane at ``mode``: its middle
    decode token's measured spans (as ``token_timeline``) and the run."""
    if mode not in MODES:
        raise ValueError(f"unknown CPU-lane mode {mode!r}; choose one of {', '.join(MODES)}")
    run = live_run(live_model(device), policy=policy, slots=slots, new_tokens=new_tokens, device=device,
                   cpu_experts=mode, cpu_threads=None if mode == "off" else threads)
    return _one_step(run.rows, new_tokens // 2), run


def live_timeline_figure(device: str, policy: str = "duoserve", threads: int = 16, mode: str = "half") -> go.Figure:
    """One decode token measured on this machine's runtime, the CPU lane off (top) and ``mode`` (below)."""
    titles, frames = [], []
    for m in ("off", mode):
        df, run = live_token(device, policy, m, threads)
        lane = run.runtime.describe()["cpu_lane"]  # what ran, where it differs from what was asked
        titles.append(f"{_label(m, threads)}{'' if lane == m else ' (ran: off)'}: this token's spans end at {df['end_ms'].max():.1f} ms "
                      f"(run's TPOT {run.result.tpot_s * 1e3:.1f} ms); {(df['stream'] == 'cpu').sum()} experts on the CPU lane")
        frames.append(df)
    return _panels(titles, frames, LIVE_TOKENS // 2,
                   f"One decode token measured on {run.device}: {policy}, {run.slots} of {run.plan.total_experts} slots, "
                   f"{run.choice.label.split(' (')[0]}")


# -- the H200 measurements ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _measured(paths: tuple[tuple[str, Path], ...]) -> pd.DataFrame:
    rows = []
    for mode, path in paths:
        record = json.loads(Path(path).read_text())
        for policy, r in record["results"].items():
            costs = r["policy"].get("cpu_lane_costs") or {}
            row = _row(r, policy, r["policy"].get("cpu_experts", mode), costs.get("threads"), len(r["tokens"]) - 1)
            rows.append({**row, "slots": r["runtime"]["memory_plan"]["num_slots"], "prompt tokens": r["prompt_tokens"],
                         "kind": "measured", "device": record["device"], "date": record["date"], "file": Path(path).name})
    return pd.DataFrame(rows)


def measured(paths: dict[str, Path] | None = None) -> pd.DataFrame:
    """The committed H200 bench runs, lane off and auto: one row per policy each, with the device and
    date from the file (``MEASURED``)."""
    return _measured(tuple((paths or MEASURED).items())).copy()


def measured_slots(paths: dict[str, Path] | None = None) -> int:
    """The slots the measured runs had (their 15% budget, in int4 experts): the default budget here."""
    slots = measured(paths)["slots"].unique()
    if len(slots) != 1:
        raise ValueError(f"the measured runs had different budgets: {sorted(slots)} slots")
    return int(slots[0])


def lane_effect(table: pd.DataFrame, mode: str = "auto") -> pd.DataFrame:
    """Per policy of ``POLICIES`` that ``table`` has, TPOT with the lane off and at ``mode`` and the change
    (positive: the lane made decode slower)."""
    tpot = table.pivot_table(index="policy", columns="CPU lane", values="TPOT (ms)", aggfunc="first")
    out = pd.DataFrame({"off (ms)": tpot["off"], f"{mode} (ms)": tpot[mode]}).loc[[p for p in POLICIES if p in tpot.index]]
    out[f"{mode} - off (ms)"] = out[f"{mode} (ms)"] - out["off (ms)"]
    return out.round(1)


def at_setting(simulated: pd.DataFrame, mode: str, threads: int | None) -> pd.DataFrame:
    """The sweep at one lane setting beside the lane off, by policy (``threads`` ignored when off)."""
    off = simulated[simulated["CPU lane"] == "off"].set_index("policy")
    on = off if mode == "off" else simulated[(simulated["CPU lane"] == mode)
                                            & (simulated["threads"] == threads)].set_index("policy")
    if on.empty:
        raise ValueError(f"the sweep has no run at {_label(mode, threads)}; it has threads "
                         f"{sorted(int(t) for t in simulated['threads'].dropna().unique())}")
    label = _label(mode, threads)
    return pd.DataFrame({"TPOT, lane off (ms)": off["TPOT (ms)"], f"TPOT, {label} (ms)": on["TPOT (ms)"],
                         "CPU share": on["CPU share"], "copies per token": on["copies per token"],
                         "host computes per token": on["host computes per token"]}).loc[list(POLICIES)].round(3)


def comparison(simulated: pd.DataFrame, measured_runs: pd.DataFrame) -> pd.DataFrame:
    """Per measured policy: TPOT measured (lane off and auto) and simulated (off, auto and the forced
    half), at the measured threads."""
    threads = int(measured_runs.loc[measured_runs["CPU lane"] == "auto", "threads"].iloc[0])
    sim = simulated[(simulated["CPU lane"] == "off") | (simulated["threads"] == threads)]
    m, s, h = lane_effect(measured_runs), lane_effect(sim), lane_effect(sim, "half")
    out = pd.DataFrame({"measured off (ms)": m["off (ms)"], f"measured auto, {threads} threads (ms)": m["auto (ms)"],
                        "simulated off (ms)": s["off (ms)"], f"simulated auto, {threads} threads (ms)": s["auto (ms)"],
                        f"simulated half, {threads} threads (ms)": h["half (ms)"]}).loc[m.index]
    out.columns.name = f"{_measured_label(measured_runs)}; {SIMULATED}"
    return out


def live_path_note(device: str) -> str:
    """One sentence on where this section's figures come from on ``device``."""
    if device.startswith("cuda"):
        return ("A GPU is present: the figures below are the simulator (an H200 host with Mixtral-8x7B) beside the "
                "committed H200 measurements, and the \"measured here\" timeline runs the runtime on this GPU "
                "(Mixtral-size int4 experts, first 8 layers; the first run synthesizes them, tens of seconds).")
    return (f"No GPU here: the figures below are the simulator on this CPU ({SIMULATED}, "
            f"`{CALIBRATION.relative_to(DATA.parent)}`), beside the committed H200 measurements; the \"measured "
            "here\" timeline runs the bundled model on this CPU, where `auto` is off and the forced modes show "
            "the lane's work.")


def _measured_label(m: pd.DataFrame) -> str:
    return f"measured, {m['device'].iloc[0]}, {m['date'].iloc[0]}"


def share_figure(simulated: pd.DataFrame, measured_runs: pd.DataFrame, highlight: tuple[str, int | None] | None = None
                 ) -> go.Figure:
    """TPOT against the CPU share: simulated points (filled, one marker per lane setting, a line per
    policy in thread order) and the measured H200 points (open stars, labelled with device and date).
    ``highlight``: a (mode, threads) whose simulated points are ringed."""
    fig = go.Figure()
    for policy in POLICIES:
        part = simulated[simulated["policy"] == policy]
        fig.add_trace(go.Scatter(
            x=part["CPU share"], y=part["TPOT (ms)"], mode="lines+markers", name=f"{policy} ({SIMULATED})",
            line=dict(color=COLOURS[policy], width=1), legendgroup=policy,
            marker=dict(size=10, symbol=[SYMBOLS.get(t, "circle") for t in part["threads"]], color=COLOURS[policy]),
            text=[_label(m, t) for m, t in zip(part["CPU lane"], part["threads"])],
            hovertemplate=policy + ", %{text}: %{y:.1f} ms, %{x:.0%} on the CPU<extra>simulated</extra>"))
    m = measured_runs
    label = _measured_label(m)
    for policy in POLICIES:
        part = m[m["policy"] == policy]
        if part.empty:  # a policy the measured runs did not include
            continue
        fig.add_trace(go.Scatter(
            x=part["CPU share"], y=part["TPOT (ms)"], mode="markers+lines", name=f"{policy} ({label})",
            legendgroup=policy, line=dict(color=COLOURS[policy], dash="dot", width=1),
            marker=dict(size=14, symbol="star-open", color=COLOURS[policy], line_width=2),
            text=[_label(mo, t) for mo, t in zip(part["CPU lane"], part["threads"])],
            hovertemplate=policy + ", %{text}: %{y:.1f} ms, %{x:.0%} on the CPU<extra>" + label + "</extra>"))
    if highlight is not None:
        mode, threads = highlight
        threads = None if mode == "off" else threads
        ring = simulated[(simulated["CPU lane"] == mode) & (simulated["threads"].fillna(-1) == (threads or -1))]
        fig.add_trace(go.Scatter(x=ring["CPU share"], y=ring["TPOT (ms)"], mode="markers", name=_label(mode, threads),
                                 marker=dict(size=22, symbol="circle-open", color="grey", line_width=2),
                                 hoverinfo="skip"))
    source, slots = simulated["source"].iloc[0], simulated["slots"].iloc[0]
    top = max(simulated["CPU share"].max(), m["CPU share"].max())
    fig.update_xaxes(title_text="CPU share (experts decode needed that the host computed)", tickformat=".0%",
                     range=[-0.03, max(0.6, top + 0.05)])
    fig.update_yaxes(title_text="decode TPOT (ms)")
    fig.update_layout(height=460, legend_title="simulated: ○ off, △ 4, □ 8, ◇ 16 threads",
                      title=f"TPOT against the CPU share: simulated ({source} routing, {slots} slots, "
                            f"{int(simulated['decode tokens'].iloc[0])} decode tokens) and {label} "
                            f"({int(m['slots'].iloc[0])} slots, {int(m['decode tokens'].iloc[0])} decode tokens)")
    return fig


__all__ = ["CALIBRATION", "MEASURED", "MODES", "POLICIES", "SIMULATED", "SOURCES", "at_setting", "calibration",
           "comparison", "cpu_share", "lane_effect", "live_path_note", "measured", "measured_slots", "model", "settings", "share_figure", "sweep",
           "thread_choices", "timeline_figure", "token_timeline"]

"""What notebook 06 draws: every policy end to end against the bounds and the accelerate peer.

Three sources, never mixed in one figure, each named in the figure's title:

- **measured**: the committed GPU measurements (``benchmarks/results/bench_*.json``, written by
  ``python -m duoserve_core.bench``), each labelled with the device and date the file records, with
  the bounds each run computed from its own timeline and the accelerate peer the file compared
  against where it has one. ``MEASURED_FILES`` lists them newest first: the H200 runs of 2026-11-29
  (the current decode policy; ``MEASURED_DEFAULT`` is the trace-gate run) and the H100 runs of
  2026-11-23, which measured the decode cache before the stale-score fix and are kept for comparison;
- **live**: the same benchmark logic run now (``bench.open_runtime`` / ``bench.run_policy``), a
  shortened run, only where there is a CUDA GPU;
- **simulated (<device> calibration)**: ``duoserve_core.sim`` replaying the bundled trace through the
  real policies on the committed calibration (``CALIBRATION``, the H200's of 2026-12-01, its host terms
  measured; ``SIMULATED`` names its device as the file records it); Mixtral-8x22B from the same file with its kernel times
  scaled by the bytes they read (an extrapolation, and labelled as one).

Every source becomes the same ``Comparison`` (one row per policy, bench's field names), so one set
of figures serves all three.
"""

from __future__ import annotations

import copy
import datetime
import functools
import itertools
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from duoserve_core import bench
from duoserve_core.errors import BudgetError
from duoserve_core.memory import plan_context
from duoserve_core.policy import PolicyKnobs, policy_class
from duoserve_core.sim import Calibration, build_model, load_calibration, reference, simulate
from duoserve_core.sim.sim_model import open_config
from duoserve_core.traces import RoutingReplay, read_trace
from duoserve_core.units import format_bytes

from .gpu_results import RESULTS
from .paths import DATA

CALIBRATION = DATA / "calibration" / "h200_mixtral-8x7b_nf4_2026-12-01.json"
TRACE = DATA / "traces" / "small-moe-heldout.parquet"
POLICIES = ("duoserve", "uniform", "on-demand", "lru-speculative", "resident")
# The knobs of the committed trace-gate GPU runs these figures stand beside (not the knobs' defaults,
# ``duoserve_core.policy.DEFAULT_KNOBS``): the simulated and live runs default to them so that the
# three sources compare like for like.
COMMITTED_DEPTH, COMMITTED_THRESHOLD = 2, 0.8
PEER = "accelerate peer"

_SPEC_WORD = re.compile(r"^(\d+GB|HBM\w*|PCIe|SXM\w*|NVL)$", re.IGNORECASE)


def device_short(device: str) -> str:
    """A device name as a reader says it: ``NVIDIA H100 80GB HBM3`` -> ``H100``, ``NVIDIA H200`` -> ``H200``."""
    words = [w for w in str(device).split() if w.upper() != "NVIDIA"]
    return " ".join(itertools.takewhile(lambda w: not _SPEC_WORD.match(w), words)) or str(device)


def calibration_label(raw: dict) -> str:
    """``H200 calibration, 2026-12-01``: the device and date a calibration file records."""
    return f"{device_short(raw.get('device', '?'))} calibration, {raw.get('date', '?')}"


# What the simulator's figures are labelled with: the committed calibration's own device.
SIMULATED = f"simulated ({device_short(json.loads(CALIBRATION.read_text())['device'])} calibration)"

# The committed bench runs the notebook draws, by label (device, date, what differs), newest first.
# The H100 runs measured the decode cache before the stale-score fix (guesses outliving their layer,
# reuse not counted per token); the H200 runs measured it after. Left out: the single-repeat 8x22B run
# (bench_h200_8x22b_trace_gate.json; its repeats file below is the median of 3) and the superseded file.
MEASURED_DEFAULT = "bench_h200_8x7b_trace_gate.json"
MEASURED_FILES = {
    "H200, 2026-11-29: Mixtral-8x7B, bundled trace's routing, speculative gate (bench_h200_8x7b_trace_gate.json)":
        "bench_h200_8x7b_trace_gate.json",
    "H200, 2026-11-29: Mixtral-8x7B, own router of synthesized weights (bench_h200_8x7b_synth.json)":
        "bench_h200_8x7b_synth.json",
    "H200, 2026-11-29: Mixtral-8x7B, bundled trace's routing, trained predictor (threshold 0.9); duoserve and "
    "uniform only, no peer (bench_h200_8x7b_trace_predictor.json)": "bench_h200_8x7b_trace_predictor.json",
    "H200, 2026-11-29: Mixtral-8x22B (56 layers), bundled trace's routing, speculative gate, 32 tokens, median of 3; "
    "duoserve and uniform only, no peer (bench_h200_8x22b_trace_gate_repeats.json)":
        "bench_h200_8x22b_trace_gate_repeats.json",
    "H100, 2026-11-23, decode cache before the stale-score fix: Mixtral-8x7B, bundled trace's routing, "
    "speculative gate (bench_h100_8x7b_trace_gate.json)": "bench_h100_8x7b_trace_gate.json",
    "H100, 2026-11-23, decode cache before the stale-score fix: Mixtral-8x7B, own router of synthesized weights "
    "(bench_h100_8x7b_synth.json)": "bench_h100_8x7b_synth.json",
}
SUPERSEDED = {"bench_h100_8x7b_trace_predictor.json":
              "ran before a fix; superseded by bench_h200_8x7b_trace_predictor.json, not drawn"}

# Models the simulator runs: label -> preset. 8x22B has no calibration of its own (see scaled_calibration).
SIM_MODELS = {"Mixtral-8x7B (32 layers)": "mixtral-8x7b", "Mixtral-8x22B (56 layers)": "mixtral-8x22b"}

POLICY_COLOURS = {"duoserve": "#e45756", "uniform": "#f58518", "on-demand": "#4c78a8",
                  "lru-speculative": "#72b7b2", "resident": "#54a24b", PEER: "#9d9da1"}


@dataclass
class Comparison:
    """Policies side by side, one source: ``table`` has one row per policy (seconds, bytes)."""

    source: str                  # what the numbers are, for titles: "measured on ...", "simulated (...)"
    kind: str                    # "measured" | "live" | "simulated"
    model: str
    table: pd.DataFrame
    peer: dict | None = None     # the accelerate peer (bench's "peer" record), measured sources only
    skipped: dict = field(default_factory=dict)
    command: str = ""

    def row(self, policy: str) -> pd.Series:
        return self.table.set_index("policy").loc[policy]


def _decode_tokens(r: dict) -> int:
    if "tokens" in r:
        return len(r["tokens"]) - 1
    return int(r["new_tokens"]) - 1


def comparison(record: dict, *, source: str, kind: str) -> Comparison:
    """A bench-shaped record (a committed file, a live run, or the simulator's results) as a Comparison."""
    rows = []
    for name, r in record["results"].items():
        b, plan = r.get("bounds", {}), r["runtime"]["memory_plan"]
        n = _decode_tokens(r)
        decode = r["phases"]["decode"]
        uses = decode["hits"] + decode["misses"]
        rows.append({
            "policy": name, "ttft_s": r["ttft_s"], "tpot_s": r.get("tpot_s"), "e2e_s": r["e2e_s"],
            "peak_gpu_bytes": r.get("peak_gpu_bytes"), "budget_bytes": plan.get("budget_bytes"),
            "slots": plan["num_slots"], "total_experts": plan["total_experts"], "decode_tokens": n,
            "prompt_tokens": r.get("prompt_tokens"), "h2d_bytes": r.get("h2d_bytes"), "hit_rate": r.get("hit_rate"),
            "decode_hit_rate": decode["hits"] / uses if uses else None,
            "transfer_floor_s": b.get("transfer_floor_s"), "compute_prefill_s": b.get("compute_prefill_s"),
            "compute_decode_s": b.get("compute_decode_s"), "ttft_floor_s": b.get("ttft_floor_s"),
            "oracle_tpot_s": b.get("oracle_tpot_s"), "oracle_decode_loads": b.get("oracle_decode_loads"),
        })
    order = {p: i for i, p in enumerate(POLICIES)}
    table = pd.DataFrame(rows).sort_values("policy", key=lambda s: s.map(lambda p: order.get(p, 99)))
    model = next(iter(record["results"].values()))["runtime"].get("model", "?")
    peer = record.get("peer") if isinstance(record.get("peer"), dict) else None
    return Comparison(source, kind, model, table.reset_index(drop=True), peer, dict(record.get("skipped") or {}),
                      record.get("command", ""))


# -- measured (committed) ----------------------------------------------------------------------------
def load_measured(file: str, results_dir: str | Path = RESULTS) -> Comparison:
    """One committed bench file: ``measured on <device>, <date> (<file>)``."""
    if file in SUPERSEDED:
        raise ValueError(f"{file} {SUPERSEDED[file]}")
    record = json.loads((Path(results_dir) / file).read_text())
    return comparison(record, source=f"measured on {record['device']}, {record['date']} ({file})", kind="measured")


# -- live (GPU only) ---------------------------------------------------------------------------------
def _live_setup() -> bench.BenchSetup:
    return bench.BenchSetup(model="synthetic:mixtral-8x7b", quant="nf4", attention_quant="nf4", device="cuda",
                            routing_trace=str(TRACE))


@functools.lru_cache(maxsize=1)
def _gpu_runtime(max_context: int):
    """Loaded once (synthesizing 8x7B's weights takes a while); each run reconfigures it."""
    return bench.open_runtime(_live_setup(), "15%", max_context)


def live_bench(budget_pct: float = 15, depth: int = COMMITTED_DEPTH, threshold: float = COMMITTED_THRESHOLD,
               policies: tuple[str, ...] = POLICIES[:4], prompt_len: int = 512, gen: int = 32) -> Comparison:
    """``python -m duoserve_core.bench`` at these knobs, on this machine's GPU (refuses without one)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("live_bench needs a CUDA GPU; on a CPU use load_measured and simulated")
    runtime = _gpu_runtime(prompt_len + gen)
    knobs = PolicyKnobs(prefetch_depth=depth, predictor_threshold=threshold, speculative_gate=True)
    budget = f"{budget_pct:g}%"
    results, skipped = bench.compare_policies(runtime, knobs, list(policies), bench.make_prompt(prompt_len), gen,
                                              memory_budget=budget, repeats=1)
    for r in results.values():
        r.pop("timeline")
    setup = _live_setup()
    command = (f"python -m duoserve_core.bench --model {setup.model} --quant nf4 --quant-attention nf4 "
               f"--memory-budget {budget} --prompt-len {prompt_len} --gen {gen} --repeats 1 "
               f"--policies {','.join(policies)} --speculative-gate --predictor-threshold {threshold} "
               f"--prefetch-depth {depth} --routing-trace {TRACE} --device cuda")
    record = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "command": command, "results": results, "skipped": skipped}
    return comparison(record, source=f"measured live on {record['device']} (prompt {prompt_len}, {gen} tokens, "
                      "1 repeat)", kind="live")


# -- simulated ---------------------------------------------------------------------------------------
def _attention_weights(c) -> int:
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.num_key_value_heads * head_dim


def scaled_calibration(cal: Calibration, config, expert_record_bytes: int) -> tuple[Calibration, str]:
    """``cal`` for another Mixtral shape: each kernel's time scaled by the bytes of weights it reads
    (experts by hidden x intermediate, attention by its projections, the router by hidden size),
    host terms and the H2D curve kept (the copy of a bigger record is read off the measured curve at
    its size). Returns the calibration and a sentence saying what was done."""
    raw = copy.deepcopy(cal.raw)
    m = raw["model"]
    src = type(config)(hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                       num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_key_value_heads"])
    expert = config.hidden_size * config.intermediate_size / (m["hidden_size"] * m["intermediate_size"])
    attention = _attention_weights(config) / _attention_weights(src)
    router = config.hidden_size / m["hidden_size"]

    def scale(points, by):
        return [[x, s * by] for x, s in points]

    raw["expert_compute"] = {k: scale(v, expert) for k, v in raw["expert_compute"].items()}
    for phase in ("prefill", "decode"):
        raw["attention"][phase] = scale(raw["attention"][phase], attention)
        raw["router"][phase] = scale(raw["router"][phase], router)
    fmt = raw["quant"]
    if raw["h2d"].get("runtime"):  # the runtime's copies ran this much slower than isolated ones
        (old_bytes, old_s), = raw["h2d"]["runtime"][:1]
        slowdown = old_s / cal.h2d["pinned"].at(old_bytes)
        raw["h2d"]["runtime"] = [[expert_record_bytes, cal.h2d["pinned"].at(expert_record_bytes) * slowdown]]
    raw["expert_bytes"] = {fmt: expert_record_bytes}
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_local_experts", "num_experts_per_tok"):
        m[key] = getattr(config, key)
    m["name"] = f"{m['name']} scaled to {config.hidden_size}x{config.intermediate_size}"
    note = (f"no calibration of this shape exists: the {calibration_label(cal.raw)}, of Mixtral-8x7B, with expert "
            f"kernels x{expert:.2f}, attention x{attention:.2f}, router x{router:.2f} (weight bytes read), host and "
            "copy terms as measured (an extrapolation)")
    return Calibration(raw, f"{cal.where} (scaled)"), note


@functools.lru_cache(maxsize=8)
def _sim_setup(preset: str, budget: str, max_context: int):
    cal = load_calibration(CALIBRATION)
    model = build_model(preset, quant="nf4", attention_quant="nf4", memory_budget=budget, max_context=max_context,
                        device_type=cal.raw["device_type"])
    note = f"the {calibration_label(cal.raw)}, measured at this shape"
    try:
        cal.check(model.config, "nf4", "nf4")
    except Exception:
        cal, note = scaled_calibration(cal, model.config, model.format.nbytes)
    c = model.config
    replay = RoutingReplay(_trace(), c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok)
    return model, cal, replay, note


@functools.lru_cache(maxsize=1)
def _trace():
    return read_trace(TRACE)


@functools.lru_cache(maxsize=8)
def _model_context(preset: str) -> int:
    return open_config(preset)[1].max_position_embeddings


def sim_setup(preset: str, budget_pct: float | str, longest_request: int):
    """(SimModel, Calibration, RoutingReplay, calibration note) at a budget in % of the model (or bench's
    spellings), for requests of up to ``longest_request`` tokens (prompt + generated). The memory plan
    reserves ``plan_context`` of them, as ``sim`` does, so a budget is the same slots in every figure."""
    budget = f"{budget_pct:g}%" if isinstance(budget_pct, (int, float)) else budget_pct
    return _sim_setup(preset, budget, plan_context(longest_request, _model_context(preset)))


def simulated(preset: str = "mixtral-8x7b", budget_pct: float = 15, depth: int = COMMITTED_DEPTH, threshold: float = COMMITTED_THRESHOLD,
              policies: tuple[str, ...] = POLICIES, prompt_len: int = 512, gen: int = 128, warmup: int = 0
              ) -> Comparison:
    """Every policy through the simulator at these knobs (speculative gate, no trained predictor:
    the configuration of the committed trace-gate run). Policy decision time is not charged, so the
    figures are deterministic."""
    model, cal, replay, note = sim_setup(preset, budget_pct, prompt_len + gen)
    extrapolated = cal.where.endswith("(scaled)")   # scaled_calibration's mark
    results, skipped = {}, {}
    for policy in policies:
        try:
            everything = policy_class(policy).holds_every_expert
            sim_model = sim_setup(preset, "all", prompt_len + gen)[0] if everything else model
            if everything and budget_pct < 100:
                raise BudgetError(f"resident needs every expert on the device ({sim_model.plan.total_experts} slots); "
                                  f"the budget leaves {model.plan.num_slots}")
            knobs = PolicyKnobs(policy=policy, prefetch_depth=depth, predictor_threshold=threshold,
                                speculative_gate=True)
            results[policy] = simulate(sim_model, cal, replay, knobs, prompt_len, gen, warmup=warmup,
                                       routing_trace=str(TRACE), policy_time=False)
            results[policy].pop("timeline")
        except BudgetError as exc:
            skipped[policy] = str(exc)
    if not results:
        raise BudgetError("no policy fits this budget: " + "; ".join(skipped.values()))
    label = f"{SIMULATED}, {preset}" + (", extrapolated" if extrapolated else "")
    comp = comparison({"results": results, "skipped": skipped}, source=label, kind="simulated")
    comp.command = note
    return comp


# -- tables ------------------------------------------------------------------------------------------
def summary_table(comp: Comparison) -> pd.DataFrame:
    """The paper's table: TTFT, TPOT, E2E and peak memory per policy, each against its bound."""
    t = comp.table
    out = pd.DataFrame({
        "policy": t["policy"], "slots": [f"{s} of {n}" for s, n in zip(t["slots"], t["total_experts"])],
        "TTFT (ms)": t["ttft_s"] * 1e3, "TTFT floor (ms)": t["ttft_floor_s"] * 1e3,
        "TPOT (ms)": t["tpot_s"] * 1e3, "oracle TPOT (ms)": t["oracle_tpot_s"] * 1e3, "E2E (s)": t["e2e_s"],
        "peak GPU (GiB)": t["peak_gpu_bytes"] / 2**30, "budget (GiB)": t["budget_bytes"] / 2**30,
        "decode hit rate": t["decode_hit_rate"]})
    if comp.peer:
        p = comp.peer
        out = pd.concat([out, pd.DataFrame([{"policy": f"{PEER} (scaled)", "TTFT (ms)": p["ttft_s"] * 1e3,
                                             "TPOT (ms)": p["tpot_s"] * 1e3, "E2E (s)": p["e2e_s"]}])])
    return out.round(3).set_index("policy")


def speedups(comp: Comparison, mine: str = "duoserve") -> pd.DataFrame:
    """How many times faster ``mine`` is than every other policy and the peer (TTFT, TPOT, E2E).
    A source that did not run ``mine`` (some files hold duoserve and uniform only) gives one row saying so."""
    ran = list(comp.table["policy"])
    if mine not in ran:
        return pd.DataFrame({"over": ["-"], "note": [f"{mine} did not run in this source (it ran {', '.join(ran)})"]}
                            ).set_index("over")
    me = comp.row(mine)
    rows = []
    for _, r in comp.table.iterrows():
        if r["policy"] == mine:
            continue
        rows.append({"over": r["policy"], "TTFT": r["ttft_s"] / me["ttft_s"],
                     "TPOT": r["tpot_s"] / me["tpot_s"] if r["tpot_s"] and me["tpot_s"] else None,
                     "E2E": r["e2e_s"] / me["e2e_s"]})
    if comp.peer:
        p = comp.peer
        rows.append({"over": f"{PEER} ({p.get('note', 'scaled')})", "TTFT": p["ttft_s"] / me["ttft_s"],
                     "TPOT": p["tpot_s"] / me["tpot_s"], "E2E": p["e2e_s"] / me["e2e_s"]})
    return pd.DataFrame(rows).set_index("over").round(2).rename(columns=lambda c: f"{mine} speed-up, {c}")


# -- figures -----------------------------------------------------------------------------------------
PANELS = (("ttft_s", "TTFT (ms)", 1e3), ("tpot_s", "TPOT (ms)", 1e3), ("e2e_s", "E2E (s)", 1.0),
          ("peak_gpu_bytes", "peak GPU memory (GiB)", 1 / 2**30))


def bounds_of(comp: Comparison, reference_policy: str = "duoserve") -> dict[str, dict[str, float]]:
    """The bound lines per panel, taken from ``reference_policy``'s run (the source's first policy where
    it did not run that one; each run computes its own bounds, and they differ by the run's measured
    bandwidth, a few percent): transfer and compute floors for
    TTFT, Belady's oracle and the decode compute floor for TPOT, their sum for E2E, the budget."""
    t = comp.table.set_index("policy")
    r = t.loc[reference_policy if reference_policy in t.index else t.index[0]]
    n = max(int(r["decode_tokens"]), 1)
    out: dict[str, dict[str, float]] = {"ttft_s": {}, "tpot_s": {}, "e2e_s": {}, "peak_gpu_bytes": {}}

    def put(panel, label, value):
        if value is not None and pd.notna(value):
            out[panel][label] = float(value)

    put("ttft_s", "transfer floor", r["transfer_floor_s"])
    put("ttft_s", "compute floor", r["compute_prefill_s"])
    put("tpot_s", "oracle (Belady)", r["oracle_tpot_s"])
    put("tpot_s", "compute floor", r["compute_decode_s"] / n if pd.notna(r["compute_decode_s"]) else None)
    if pd.notna(r["ttft_floor_s"]) and pd.notna(r["oracle_tpot_s"]):
        put("e2e_s", "floor + oracle", r["ttft_floor_s"] + n * r["oracle_tpot_s"])
    put("peak_gpu_bytes", "budget", r["budget_bytes"])
    return out


def comparison_figure(comp: Comparison, *, highlight: str = "duoserve", peer: bool = True) -> go.Figure:
    """Four panels of bars, one per policy (and the accelerate peer where the source has it), with
    the bounds of ``highlight``'s run as dashed lines. Time panels are logarithmic when the peer is drawn."""
    t = comp.table
    show_peer = peer and comp.peer is not None
    fig = make_subplots(rows=1, cols=4, subplot_titles=[p[1] for p in PANELS], horizontal_spacing=0.07)
    names = list(t["policy"]) + ([f"{PEER}*"] if show_peer else [])
    for col, (key, label, scale) in enumerate(PANELS, start=1):
        values = list(t[key] * scale)
        if show_peer:
            values.append(comp.peer.get(key, float("nan")) * scale if key in comp.peer else None)
        colours = [POLICY_COLOURS.get(n.rstrip("*"), "#888") for n in names]
        widths = [3 if n == highlight else 0 for n in names]
        fig.add_trace(go.Bar(x=names, y=values, marker_color=colours, marker_line_width=widths,
                             marker_line_color="black", showlegend=False, name=label,
                             hovertemplate="%{x}: %{y:.4g} " + label.split("(")[-1].rstrip(")") + "<extra></extra>"),
                      row=1, col=col)
        for i, (bound, value) in enumerate(bounds_of(comp, highlight)[key].items()):
            fig.add_hline(y=value * scale, line_dash=["dash", "dot"][i % 2], line_color="black", row=1, col=col,
                          annotation_text=bound, annotation_position="top left", annotation_font_size=10)
        if show_peer and key != "peak_gpu_bytes":
            fig.update_yaxes(type="log", row=1, col=col)
        fig.update_yaxes(title_text=label, row=1, col=col)
    note = f"; *{PEER}: {comp.peer.get('note', '')}" if show_peer else ""
    fig.update_layout(height=420, title=dict(text=f"{comp.model}, {comp.source}{note}", font_size=13),
                      margin=dict(t=90))
    return fig


def both_models_table(budget_pct: float, depth: int, threshold: float, gen: int = 64) -> pd.DataFrame:
    """duoserve, on-demand and lru-speculative on both Mixtral sizes at the knobs (simulated)."""
    rows = []
    for label, preset in SIM_MODELS.items():
        try:
            comp = simulated(preset, budget_pct, depth, threshold, ("duoserve", "on-demand", "lru-speculative"),
                             gen=gen)
        except BudgetError as exc:
            rows.append({"model": label, "policy": "-", "note": str(exc)})
            continue
        for _, r in comp.table.iterrows():
            rows.append({"model": label, "policy": r["policy"], "slots": f"{r['slots']} of {r['total_experts']}",
                         "TTFT (ms)": r["ttft_s"] * 1e3, "TPOT (ms)": r["tpot_s"] * 1e3,
                         "oracle TPOT (ms)": r["oracle_tpot_s"] * 1e3, "E2E (s)": r["e2e_s"],
                         "peak GPU": format_bytes(int(r["peak_gpu_bytes"])),
                         "calibration": "measured" if "extrapolated" not in comp.source else "extrapolated"})
    return pd.DataFrame(rows).round(2).set_index(["model", "policy"])


# -- budget sweep ------------------------------------------------------------------------------------
def reference_sweep(preset: str = "mixtral-8x7b", requests: int = 2, prompt_len: int = 512, gen: int = 32
                    ) -> list[dict]:
    """Belady / LRU / per-layer LRU / LFU at every slot count (``sim.reference``), on the bundled
    trace's routing replayed at this model's depth."""
    model, cal, replay, _ = sim_setup(preset, 15, prompt_len + gen)
    c = model.config
    w = reference.workload(replay, [(i, prompt_len, gen) for i in range(requests)], c.num_hidden_layers,
                           c.num_local_experts)
    return reference.table(w, model, cal, reference.sweep(w))


def policy_sweep(preset: str = "mixtral-8x7b", budgets_pct: tuple[float, ...] = (8, 15, 25, 40),
                 depth: int = COMMITTED_DEPTH, threshold: float = COMMITTED_THRESHOLD, policies: tuple[str, ...] = POLICIES[:4],
                 prompt_len: int = 512, gen: int = 32) -> list[dict]:
    """The real policies through the simulator at a few budgets: decode hit rate and TPOT, rows for
    ``lab.sim_plots`` (``policy``, ``budget_pct``, ``slots``, ``hit_rate``, ``tpot_s``)."""
    rows = []
    for pct in budgets_pct:
        try:
            comp = simulated(preset, pct, depth, threshold, policies, prompt_len, gen)
        except BudgetError:
            continue
        model = sim_setup(preset, pct, prompt_len + gen)[0]
        actual_pct = 100.0 * model.plan.budget_bytes / model.full_model_bytes
        for _, r in comp.table.iterrows():
            rows.append({"policy": r["policy"], "budget_pct": actual_pct, "slots": int(r["slots"]),
                         "hit_rate": r["decode_hit_rate"], "tpot_s": r["tpot_s"],
                         "oracle_tpot_s": r["oracle_tpot_s"]})
    return rows


def knob_note(preset: str, budget_pct: float, prompt_len: int, gen: int) -> str:
    """One sentence: slots the budget gives, and which calibration the simulator used."""
    model, _, _, note = sim_setup(preset, budget_pct, prompt_len + gen)
    p = model.plan
    return (f"**{preset}** at {budget_pct:g}% of {format_bytes(model.full_model_bytes)}: {p.num_slots} of "
            f"{p.total_experts} expert slots of {format_bytes(p.expert_bytes)} on top of "
            f"{format_bytes(p.fixed_bytes)} for everything else. Calibration: {note}.")


def source_note(device: str) -> str:
    """Which sources this notebook draws on this machine."""
    if device.startswith("cuda"):
        return ("CUDA GPU found: the first section runs the benchmark **live** on it (a shortened run); the committed "
                "GPU measurements and the simulator follow, each labelled.")
    return ("No GPU here: the measured figures are the **committed GPU measurements** (`benchmarks/results/`, each "
            f"labelled with the device and date it records; by default `{MEASURED_DEFAULT}`), and "
            f"everything at other knob settings is **{SIMULATED}**: the real policies replayed on "
            f"`data/calibration/{CALIBRATION.name}`. The two are never drawn in one figure.")


def warn_quietly():
    """The bundled predictor is not used here; keep transformers' and bitsandbytes' notices out of outputs."""
    warnings.filterwarnings("ignore", category=UserWarning)

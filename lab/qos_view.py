"""What notebook 07 draws: batched serving, throughput by batch size and latency under arrivals, per policy.

The runtime serves requests with continuous batching (``Runtime.generate_many``: up to
``max_batch`` requests decoding together, newcomers joining in arrival order), and the simulator
schedules them the same way (``Simulator.generate_many``). This view asks both the bench's two
questions (``duoserve_core.bench.batch_rows`` and ``arrival_rows``, which made the committed H200
files) at the notebook's knobs:

- **throughput by batch size**: B requests of ``PROMPT`` tokens submitted at once, ``gen`` tokens each;
  decode tokens per second of decode steps (prefills apart) against the **copy floor**, B tokens a
  step over the time to copy the experts a step computes, what the link allows if each crossed once;
- **latency under load**: ``requests`` requests arriving as a seeded Poisson process at each rate,
  at most ``max_batch`` decoding together; TTFT (its queueing included), TPOT and latency
  percentiles and SLO attainment by ``sim.qos.summarize``, the bench's summary.

The memory budget is the bench's rule: ``budget_pct`` of the model buys the batch-1 plan, and a
batch of B adds the KV caches of its B - 1 other requests (``memory.kv_cache_bytes``), so every batch
size keeps the same expert slots and the curves compare schedules, not budgets.

Where the figures come from (``source_label`` names it in every title): on a CUDA GPU the real
runtime (``live_batches``, ``live_arrivals``: synthesized Mixtral-8x7B, NF4 experts and attention,
routing replayed from the bench's trace), elsewhere the simulator on the committed H200 calibration
(``simulated_batches``, ``simulated_arrivals``). The committed H200 measurements (``measured_batches``,
``measured_arrivals``, read from ``benchmarks/results``) are drawn beside either as markers labelled
with their device and date. Both sources replay the bench's routing: the ``mixtral-like`` preset,
seed 1, 64 requests of a 512-token prompt and 128 tokens (``routing_trace``), request i as trace
request i. The simulated runs charge no policy decision time, so they are deterministic.
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from duoserve_core import bench
from duoserve_core.batching import DEFAULT_SCHEDULE
from duoserve_core.errors import BudgetError, KnobError
from duoserve_core.memory import kv_cache_bytes
from duoserve_core.policy import PolicyKnobs
from duoserve_core.sim import Simulator, qos, serving
from duoserve_core.sim.decode_routing import mixtral_replay, preset_routing
from duoserve_core.traces import RoutingReplay, Trace, write_trace
from duoserve_core.units import format_bytes

from .gpu_results import RESULTS
from .paper_figures import POLICY_COLOURS, SIMULATED, device_short, sim_setup

# Every policy batches decode; the notebook's default is the three the H200 measured.
POLICIES = ("on-demand", "lru", "per-layer-lru", "lru-speculative", "duoserve", "uniform")
MEASURED_POLICIES = ("on-demand", "lru", "duoserve")
COLOURS = {**POLICY_COLOURS, "lru": "#9d755d", "per-layer-lru": "#b279a2"}
SIM_MODEL = "mixtral-8x7b"                 # the calibration's shape and the measured runs'
GPU_MODEL = "synthetic:mixtral-8x7b"       # what the bench loads on a GPU
PROMPT = 512                               # the bench's prompt (benchmarks/batch_gpu.sh)
MAX_GEN = 128                              # the notebook's largest generated-tokens knob
# The bench's routing trace: ``traces synth --preset mixtral-like --seed 1 --requests 64 --tokens 128
# --prompt-len 512`` (benchmarks/batch_gpu.sh); grown where the knobs ask for more requests or tokens.
TRACE_PRESET, TRACE_SEED, TRACE_REQUESTS, TRACE_TOKENS = "mixtral-like", 1, 64, 128
MEASURED_BATCH_GLOB = "batch_*_8x7b_mixtral_like_*.json"
# the arrival runs drawn: 2026-11-30's (prefill-first, 16 requests) and 2026-12-01's (mixed, 12 requests, each
# policy warmed up on a full batch first, attention on the memory-efficient kernel; then duoserve, and later
# on-demand and lru, with 24 requests and CUDA graphs; then the three policies with 128 tokens at 0.1-0.3/s, 12
# requests, on one machine); not that day's earlier runs, whose first rows paid a cold start or cuDNN's plan builds
# (docs/simulator.md), nor on-demand's 128-token run at 0.5-2/s, which those rates overload, nor duoserve's first
# 128-token run (another machine: one curve a label)
MEASURED_ARRIVALS = ("arrivals_h200_8x7b_mixtral_like.json", "arrivals_h200_8x7b_mixtral_like_12req_attention_fix.json",
                     "arrivals_h200_8x7b_mixtral_like_24req_graphs.json",
                     "arrivals_h200_8x7b_mixtral_like_24req_graphs_on-demand_lru.json",
                     *(f"arrivals_h200_8x7b_mixtral_like_12req_gen128_graphs_{run}.json"
                       for run in ("duoserve_rerun", "on-demand", "lru", "rate0.3")))
PERCENTILES = ("p50", "p99")


# -- the routing and the budget ----------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def routing_trace(requests: int = TRACE_REQUESTS, tokens: int = TRACE_TOKENS) -> Trace:
    """The bench's routing trace (at least its size; synthesizing 64 requests takes about 10 s, once)."""
    return Trace(*preset_routing(TRACE_PRESET, seed=TRACE_SEED, requests=max(requests, TRACE_REQUESTS),
                                 tokens=max(tokens, TRACE_TOKENS), prompt_len=PROMPT))


def _replay(requests: int, gen: int) -> RoutingReplay:
    return mixtral_replay(routing_trace(requests, gen))


def context() -> int:
    """The longest request the knobs allow (prompt + ``MAX_GEN``), which every plan here reserves KV
    cache for (640 tokens, ``memory.PLAN_CONTEXT``): one plan for every ``gen``, so the generated-tokens
    knob never moves the slots, and 15% buys the 21 slots it buys in every other view."""
    return PROMPT + MAX_GEN


def budget_rows(budget_pct: float, batches: Iterable[int]) -> pd.DataFrame:
    """The bench's budget rule on the simulator's plan: per batch size, the budget (batch-1 budget plus
    the other requests' KV caches) and the expert slots it keeps (the same at every size)."""
    model = sim_setup(SIM_MODEL, budget_pct, context())[0]
    rows = []
    for b in batches:
        kv = kv_cache_bytes(model.config, model.max_context, model.dtype, b - 1)
        rows.append({"max batch": b, "budget": format_bytes(model.plan.budget_bytes + kv),
                     "KV caches added": format_bytes(kv), "expert slots": f"{model.plan.num_slots} of "
                     f"{model.plan.total_experts}", "budget (% of the model)":
                     round(100 * (model.plan.budget_bytes + kv) / model.full_model_bytes, 1)})
    return pd.DataFrame(rows).set_index("max batch")


# -- simulated ---------------------------------------------------------------------------------------
def _simulator(policy: str, budget_pct: float, requests: int, gen: int, record_timeline: bool) -> Simulator:
    model, cal, _, _ = sim_setup(SIM_MODEL, budget_pct, context())
    return Simulator(model, cal, _replay(requests, gen), PolicyKnobs(policy=policy), record_timeline=record_timeline,
                     policy_time=False)


@functools.lru_cache(maxsize=256)
def _simulated_batch(policy: str, budget_pct: float, batch: int, gen: int) -> dict:
    """One bench row (``bench.batch_rows``' fields) of the simulator: ``batch`` requests at once."""
    sim = _simulator(policy, budget_pct, batch, gen, record_timeline=True)
    return serving.batch_row(sim, policy, [(PROMPT, gen)] * batch)  # prefill-first, as batch_rows


def simulated_batches(policies: Iterable[str], budget_pct: float, batches: Iterable[int], gen: int) -> pd.DataFrame:
    """``bench.batch_rows`` on the simulator: one row per (batch size, policy); a policy the budget
    cannot hold gets a ``skipped`` row with the reason, as the bench's."""
    rows = []
    for b in batches:
        for policy in policies:
            try:
                rows.append(_simulated_batch(policy, float(budget_pct), int(b), int(gen)))
            except (BudgetError, KnobError) as exc:
                rows.append({"max_batch": b, "policy": policy, "skipped": str(exc)})
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=256)
def _simulated_arrivals(policy: str, budget_pct: float, rate: float, requests: int, gen: int, max_batch: int,
                        seed: int) -> tuple[tuple[dict, ...], float]:
    sim = _simulator(policy, budget_pct, requests, gen, record_timeline=False)
    recs, mean_batch = serving.served_under_load(sim, [(PROMPT, gen)] * requests, qos.poisson_arrivals(rate, requests, seed),
                                                 max_batch, DEFAULT_SCHEDULE)
    return tuple(recs), mean_batch


def simulated_arrivals(policies: Iterable[str], budget_pct: float, rates: Iterable[float], requests: int, gen: int,
                       max_batch: int, seed: int = 0) -> dict[tuple[str, float], dict]:
    """``bench.arrival_rows`` on the simulator, its records kept: ``{(policy, rate): {"records",
    "mean_batch"}}`` (or ``{"skipped"}``), the same seeded arrivals for every policy, scaled with the rate.
    SLOs are applied later (``arrival_table``), so a change of SLO only re-counts."""
    out = {}
    for rate in rates:
        for policy in policies:
            try:
                recs, mean_batch = _simulated_arrivals(policy, float(budget_pct), float(rate), int(requests), int(gen),
                                                       int(max_batch), seed)
                out[(policy, float(rate))] = {"records": list(recs), "mean_batch": mean_batch}
            except (BudgetError, KnobError) as exc:
                out[(policy, float(rate))] = {"skipped": str(exc)}
    return out


# -- live (a CUDA GPU, or any runtime handed in) -----------------------------------------------------
@functools.lru_cache(maxsize=1)
def gpu_runtime(model: str = GPU_MODEL):
    """The bench's runtime on this machine's GPU, loaded once (synthesizing 8x7B's weights takes a while):
    NF4 experts and attention, and for a synthesized model the bench's routing trace replayed (its own
    router routes at random); a checkpoint routes with its own router."""
    trace = None
    if model.startswith("synthetic:"):
        t = routing_trace()
        trace = Path(tempfile.gettempdir()) / f"duoserve_lab_{TRACE_PRESET}_{TRACE_SEED}_{TRACE_REQUESTS}.parquet"
        write_trace(trace, t.df, t.meta, overwrite=True)
    setup = bench.BenchSetup(model=model, quant="nf4", attention_quant="nf4", device="cuda",
                             routing_trace=None if trace is None else str(trace))
    return bench.open_runtime(setup, "15%", context())


def live_batches(runtime, policies: Iterable[str], budget_pct: float, batches: Iterable[int], gen: int,
                 prompt_len: int = PROMPT) -> pd.DataFrame:
    """``bench.batch_rows`` itself (one warm-up, one measured run each) on ``runtime``."""
    return pd.DataFrame(bench.batch_rows(runtime, PolicyKnobs(), list(policies), [int(b) for b in batches], prompt_len,
                                         int(gen), memory_budget=f"{budget_pct:g}%", repeats=1, quiet=True))


def live_arrivals(runtime, policies: Iterable[str], budget_pct: float, rates: Iterable[float], requests: int, gen: int,
                  max_batch: int, seed: int = 0, prompt_len: int = PROMPT) -> dict[tuple[str, float], dict]:
    """``bench.arrival_rows`` itself on ``runtime`` (arrivals replayed in real time), its records kept in the
    shape ``simulated_arrivals`` gives."""
    rows = bench.arrival_rows(runtime, PolicyKnobs(), list(policies), [float(r) for r in rates], int(requests),
                              prompt_len, int(gen), max_batch=int(max_batch), memory_budget=f"{budget_pct:g}%",
                              seed=seed, quiet=True, keep_records=True)
    return {(r["policy"], float(r["arrival_rate"])): {"skipped": r["skipped"]} if "skipped" in r else
            {"records": r["records"], "mean_batch": r["mean_batch"]} for r in rows}


# -- one entry point per question: the GPU's runtime where there is one, else the simulator --------------
def _live(device: str) -> bool:
    return str(device).startswith("cuda")


@functools.lru_cache(maxsize=8)
def throughput_runs(device: str, policies: tuple[str, ...], budget_pct: float, batches: tuple[int, ...], gen: int,
                    model: str = GPU_MODEL) -> pd.DataFrame:
    """Throughput by batch size on ``device``: ``live_batches`` on a CUDA GPU (``model`` loaded there),
    else ``simulated_batches``. Cached: treat the table as read-only."""
    if _live(device):
        return live_batches(gpu_runtime(model), policies, budget_pct, batches, gen)
    return simulated_batches(policies, budget_pct, batches, gen)


@functools.lru_cache(maxsize=8)
def arrival_runs(device: str, policies: tuple[str, ...], budget_pct: float, rates: tuple[float, ...], requests: int,
                 gen: int, max_batch: int, model: str = GPU_MODEL) -> dict[tuple[str, float], dict]:
    """Requests under Poisson arrivals on ``device``: ``live_arrivals`` on a CUDA GPU, else
    ``simulated_arrivals``. Cached: treat the records as read-only."""
    if _live(device):
        return live_arrivals(gpu_runtime(model), policies, budget_pct, rates, requests, gen, max_batch)
    return simulated_arrivals(policies, budget_pct, rates, requests, gen, max_batch)


def source_label(device: str) -> str:
    """What a figure's numbers are: ``measured on <GPU>, <date>`` on a CUDA device, else ``SIMULATED``."""
    if not _live(device):
        return SIMULATED
    import torch

    return f"measured on {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}"


# -- the committed H200 measurements -----------------------------------------------------------------
def _measured_label(record: dict) -> str:
    """``measured H200, 2026-11-30, 32 tokens``: runs of different lengths are different curves (the KV
    context, and with it each step's attention, grows with the tokens generated), and so are runs with
    CUDA graphs (``..., CUDA graphs``: less host time a layer), with experts in another format than NF4
    (``..., int4``) and with the CPU lane (``..., CPU lane auto``: missed experts computed on the host)."""
    command = record.get("command", "")
    graphs = ", CUDA graphs" if bench.ran_with_cuda_graphs(record) else ""
    quant = re.search(r"--quant[ =](\w+)", command)
    quant = f", {quant.group(1)}" if quant and quant.group(1) != "nf4" else ""
    lane = re.search(r"--cpu-experts[ =](\w+)", command)
    lane = f", CPU lane {lane.group(1)}" if lane and lane.group(1) != "off" else ""
    return f"measured {device_short(record['device'])}, {record['date']}, {_gen(record)} tokens{graphs}{quant}{lane}"


def _gen(record: dict) -> int:
    """The tokens per request of a bench run, from its command."""
    found = re.search(r"--gen[ =](\d+)", record.get("command", ""))
    return int(found.group(1)) if found else bench_default_gen()


def bench_default_gen() -> int:
    """The bench's ``--gen`` default, for a command that did not give one."""
    from duoserve_core.bench.__main__ import parse_args
    return parse_args([]).gen


def measured_batches(results_dir: str | Path = RESULTS) -> pd.DataFrame:
    """Every committed ``batch_*_8x7b_mixtral_like_<policy>.json`` row (the bench's ``--max-batch`` runs),
    with ``gen`` (tokens per request), ``label`` (``measured H200, 2026-11-30, 32 tokens``) and ``file``."""
    rows = []
    for path in sorted(Path(results_dir).glob(MEASURED_BATCH_GLOB)):
        record = json.loads(path.read_text())
        rows += [{**r, "gen": _gen(record), "label": _measured_label(record), "file": path.name}
                 for r in record["rows"] if "skipped" not in r]
    return pd.DataFrame(rows)


def measured_arrivals(results_dir: str | Path = RESULTS) -> pd.DataFrame:
    """The committed arrival runs' rows (``MEASURED_ARRIVALS``, those present) flattened (``ttft_p50_s``...),
    with ``label`` saying device, date, tokens, max batch, requests and schedule (the run's own, whatever
    the knobs say)."""
    rows = []
    for path in (p for p in (Path(results_dir) / name for name in MEASURED_ARRIVALS) if p.is_file()):
        record = json.loads(path.read_text())
        for r in record["rows"]:
            if "skipped" in r:
                continue
            flat = {f"{m}_{p}_s": r[f"{m}_s"][p] for m in ("ttft", "tpot", "latency") for p in PERCENTILES}
            rows.append({"policy": r["policy"], "arrival_rate": r["arrival_rate"], "max_batch": r["max_batch"],
                         "requests": r["requests"], "mean_batch": r["mean_batch"], **flat,
                         "label": f"{_measured_label(record)} (max batch {r['max_batch']}, {r['requests']} requests, "
                                  f"{r.get('prefill_schedule', 'prefill-first')})",
                         "file": path.name})
    return pd.DataFrame(rows)


# -- tables ------------------------------------------------------------------------------------------
def arrival_table(runs: dict[tuple[str, float], dict], slo_ttft_s: float | None = None,
                  slo_tpot_s: float | None = None) -> pd.DataFrame:
    """One row per (policy, rate) that ran: SLO attainment, mean batch, tokens/s and p50/p99 of TTFT,
    TPOT and latency (``qos.summarize``, the bench's summary), rates ascending within each policy."""
    rows = []
    for (policy, rate), run in runs.items():
        if "skipped" in run:
            continue
        s = qos.summarize(run["records"], slo_ttft_s, slo_tpot_s)
        rows.append({"policy": policy, "arrival_rate": rate, "slo_attainment": s["slo_attainment"],
                     "mean_batch": run["mean_batch"], "tokens_per_s": s["tokens_per_s"],
                     **{f"{m}_{p}_s": s[f"{m}_s"][p] for m in ("ttft", "tpot", "latency") for p in PERCENTILES}})
    if not rows:
        raise BudgetError("no chosen policy fits this budget: " + "; ".join(r["skipped"] for r in runs.values()))
    order = {p: i for i, p in enumerate(POLICIES)}
    return pd.DataFrame(rows).sort_values(["policy", "arrival_rate"], key=lambda s: s.map(order.get) if s.name ==
                                          "policy" else s).reset_index(drop=True)


def percentile_table(table: pd.DataFrame) -> pd.DataFrame:
    """``arrival_table`` as a reader wants it: per policy and rate, the mean batch, p50/p99 of TTFT and
    TPOT in ms and of latency in s, and the attainment."""
    out = pd.DataFrame({"mean batch": table["mean_batch"],
                        **{f"{m.upper()} {p} (ms)": table[f"{m}_{p}_s"] * 1e3 for m in ("ttft", "tpot")
                           for p in PERCENTILES},
                        **{f"latency {p} (s)": table[f"latency_{p}_s"] for p in PERCENTILES},
                        "SLO attainment": table["slo_attainment"]})
    out.index = pd.MultiIndex.from_frame(table[["policy", "arrival_rate"]], names=["policy", "requests/s"])
    return out.round(2)


def batch_table(rows: pd.DataFrame, measured: pd.DataFrame | None = None) -> pd.DataFrame:
    """Decode tokens/s against the copy floor per policy and batch size, beside each committed
    measurement (a column per run: device, date, tokens) at the same batch size where there is one."""
    ran = rows[rows["decode_tokens_per_s"].notna()] if "decode_tokens_per_s" in rows else rows.iloc[0:0]
    out = pd.DataFrame({"policy": ran["policy"], "max batch": ran["max_batch"], "slots": ran["slots"],
                        "decode tokens/s": ran["decode_tokens_per_s"], "copy floor (tokens/s)":
                        ran["copy_floor_tokens_per_s"], "of the floor": ran["decode_tokens_per_s"] /
                        ran["copy_floor_tokens_per_s"], "TPOT p50 (ms)": ran["tpot_p50_s"] * 1e3})
    for label, runs in ([] if measured is None or measured.empty else measured.groupby("label", sort=True)):
        m = runs.set_index(["policy", "max_batch"])["decode_tokens_per_s"]  # one column per measured run
        out[f"{label}: decode tokens/s"] = [m.get((p, b)) for p, b in zip(out["policy"], out["max batch"])]
    return out.round(2).set_index(["policy", "max batch"])


def skipped(rows: pd.DataFrame) -> str:
    """The policies a budget could not hold, and why (empty when every one ran)."""
    if "skipped" not in rows:
        return ""
    gone = rows[rows["skipped"].notna()]
    return "; ".join(f"{r.policy} at batch {r.max_batch}: {r.skipped}" for r in gone.itertuples())


# -- figures -----------------------------------------------------------------------------------------
def throughput_figure(rows: pd.DataFrame, source: str, measured: pd.DataFrame | None = None) -> go.Figure:
    """Decode tokens/s (solid) and the copy floor (dotted) against batch size per policy, both axes
    logarithmic; the committed measurements of the same policies as markers, a shape per run (filled:
    decode tokens/s, open: their copy floor)."""
    fig = go.Figure()
    ran = rows[rows["decode_tokens_per_s"].notna()] if "decode_tokens_per_s" in rows else rows.iloc[0:0]
    for policy, part in ran.groupby("policy", sort=False):
        colour = COLOURS.get(policy, "#888")
        fig.add_trace(go.Scatter(x=part["max_batch"], y=part["decode_tokens_per_s"], mode="lines+markers",
                                 name=f"{policy}", line_color=colour, legendgroup=policy,
                                 hovertemplate=policy + ": %{y:.1f} tokens/s at batch %{x}<extra></extra>"))
        fig.add_trace(go.Scatter(x=part["max_batch"], y=part["copy_floor_tokens_per_s"], mode="lines",
                                 name=f"{policy} copy floor", line=dict(color=colour, dash="dot"), legendgroup=policy,
                                 hovertemplate=policy + " copy floor: %{y:.1f} tokens/s at batch %{x}<extra></extra>"))
        if measured is not None and not measured.empty:
            runs = measured[measured["policy"] == policy].groupby("label", sort=True)
            for symbol, (label, m) in zip(("diamond", "square", "triangle-up", "star"), runs):  # a shape per run
                fig.add_trace(go.Scatter(x=m["max_batch"], y=m["decode_tokens_per_s"], mode="markers",
                                         name=f"{policy}, {label}", legendgroup=policy,
                                         marker=dict(color=colour, symbol=symbol, size=11,
                                                     line=dict(color="black", width=1)),
                                         hovertemplate=f"{policy}, {label}: " + "%{y:.1f} tokens/s at batch %{x}"
                                         "<extra></extra>"))
                fig.add_trace(go.Scatter(x=m["max_batch"], y=m["copy_floor_tokens_per_s"], mode="markers",
                                         name=f"{policy} copy floor, {label}", legendgroup=policy,
                                         marker=dict(color=colour, symbol=f"{symbol}-open", size=11),
                                         hovertemplate=f"{policy} copy floor, {label}: " + "%{y:.1f} tokens/s at "
                                         "batch %{x}<extra></extra>"))
    fig.update_layout(title=f"Decode throughput against batch size ({source}); dotted: copy floor; "
                      "markers: committed measurements", xaxis=dict(title="max batch (requests decoding together)",
                                                                     type="log", dtick=0.30103),
                      yaxis=dict(title="decode tokens/s", type="log"), legend_title="policy", height=440)
    return fig


def latency_figure(table: pd.DataFrame, source: str, max_batch: int, measured: pd.DataFrame | None = None
                   ) -> go.Figure:
    """TTFT (left) and TPOT (right) against arrival rate: p50 solid, p99 dashed per policy, in ms; the
    committed measurements as markers, a shape per run (filled p50, open p99)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT, queueing included (ms)", "TPOT (ms)"))
    for col, metric in enumerate(("ttft", "tpot"), start=1):
        for policy, part in table.groupby("policy", sort=False):
            colour = COLOURS.get(policy, "#888")
            for p, dash in (("p50", "solid"), ("p99", "dash")):
                fig.add_trace(go.Scatter(x=part["arrival_rate"], y=part[f"{metric}_{p}_s"] * 1e3, mode="lines+markers",
                                         name=f"{policy} {p}", line=dict(color=colour, dash=dash), legendgroup=policy,
                                         showlegend=col == 1), row=1, col=col)
            if measured is not None and not measured.empty:
                runs = measured[measured["policy"] == policy].groupby("label", sort=True)
                for run, (label, m) in enumerate(runs):  # p50 filled, p99 open; a shape per run
                    shape = ("circle", "square", "diamond", "triangle-up")[run % 4]
                    for p, symbol in (("p50", shape), ("p99", f"{shape}-open")):
                        fig.add_trace(go.Scatter(x=m["arrival_rate"], y=m[f"{metric}_{p}_s"] * 1e3, mode="markers",
                                                 name=f"{policy} {p}, {label}", legendgroup=policy,
                                                 showlegend=col == 1, marker=dict(color=colour, symbol=symbol, size=10,
                                                                                  line=dict(color="black", width=1))),
                                      row=1, col=col)
        fig.update_xaxes(title_text="arrival rate (requests/s)", type="log", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_layout(title=f"Latency percentiles against arrival rate at max batch {max_batch} ({source}); "
                      "p50 solid, p99 dashed; markers: committed measurements", legend_title="policy", height=440)
    return fig


def attainment_figure(table: pd.DataFrame, source: str, *, slo_ttft_ms: float, slo_tpot_ms: float,
                      max_batch: int) -> go.Figure:
    """SLO attainment (TTFT and TPOT both within) against arrival rate per policy."""
    fig = go.Figure()
    for policy, part in table.groupby("policy", sort=False):
        fig.add_trace(go.Scatter(x=part["arrival_rate"], y=part["slo_attainment"], mode="lines+markers", name=policy,
                                 line_color=COLOURS.get(policy, "#888"), customdata=part[["mean_batch"]],
                                 hovertemplate=policy + ": %{y:.2f} at %{x:.3g} req/s, mean batch "
                                 "%{customdata[0]:.1f}<extra></extra>"))
    fig.update_layout(title=f"SLO attainment (TTFT <= {slo_ttft_ms:g} ms and TPOT <= {slo_tpot_ms:g} ms) at max batch "
                      f"{max_batch} ({source})", xaxis=dict(title="arrival rate (requests/s)", type="log"),
                      yaxis=dict(title="share of requests meeting both SLOs", range=[0, 1.02]), legend_title="policy",
                      height=400)
    return fig


def requests_figure(runs: dict[tuple[str, float], dict], rate: float, source: str) -> go.Figure:
    """Requests over time at one rate: per policy and request, its wait in the queue (faint), its prefill
    (solid, up to the first token) and its decode in the batch (mid), from arrival to last token."""
    fig = go.Figure()
    height = 0
    for (policy, at), run in runs.items():
        if at != rate or "skipped" in run:
            continue
        colour, recs = COLOURS.get(policy, "#888"), run["records"]
        y = [f"{policy} #{i}" for i in range(len(recs))]
        height += len(recs)
        parts = (("queued", [r["queued_s"] for r in recs], [r["arrival_s"] for r in recs], 0.25),
                 ("prefill", [r["ttft_s"] - r["queued_s"] for r in recs],
                  [r["arrival_s"] + r["queued_s"] for r in recs], 1.0),
                 ("decode", [r["latency_s"] - r["ttft_s"] for r in recs], [r["arrival_s"] + r["ttft_s"] for r in recs],
                  0.6))
        for name, width, base, opacity in parts:
            fig.add_trace(go.Bar(y=y, x=width, base=base, orientation="h", marker_color=colour, opacity=opacity,
                                 name=policy, legendgroup=policy, showlegend=name == "prefill",
                                 hovertemplate="%{y}: " + name + " from %{base:.2f} s for %{x:.2f} s<extra></extra>"))
    fig.update_layout(barmode="overlay", height=max(300, 14 * height), legend_title="policy",
                      title=f"Requests over time at {rate:g} requests/s: queued faint, prefill solid, decode mid "
                      f"({source})", xaxis_title="time (s)", yaxis=dict(title="request", autorange="reversed"))
    return fig


def parse_numbers(text: str, cast=float) -> tuple:
    """``"1, 4, 16"`` -> ``(1, 4, 16)``: the knobs that take a list (sorted, duplicates dropped)."""
    values = sorted({cast(v) for v in str(text).replace(";", ",").split(",") if v.strip()})
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"need positive numbers separated by commas, got {text!r}")
    return tuple(values)

"""What notebook 06's "One GPU against two" section draws (issue 16): the same request on one GPU and on two.

Each GPU has its own PCIe link and its own memory. Expert slots and copies are spread over the
devices (``duoserve_core.load(..., gpus=N)``: every layer's copies balanced over the links, an expert
computed where its slot is, the hidden states crossing to the other device and back), so a second GPU
at the same per-GPU budget brings two things at once: a second copy link and the slots its budget
buys. One GPU at twice the budget holds about as many slots on one link; set beside the two, it
separates what the second link buys from what the extra memory buys.

Two sources, never mixed in one figure:

- **measured**: the committed runs of ``benchmarks/multi_gpu.sh`` on two H200s (``MEASURED``:
  ``python -m duoserve_core.bench --gpus 1|2``, synthesized Mixtral-8x7B, NF4 experts and attention,
  512-token prompt, 64 tokens, median of 3, mixtral-like routing; ``MEASURED_BATCH``: batch-64 decode
  throughput; ``MEASURED_BIG``: Mixtral-8x22B, duoserve, 16 tokens, one run). Every setup's label
  (GPUs and per-GPU budget) and every device and date are read from the files, not written here;
- **simulated**: ``duoserve_core.sim`` with the two-GPU calibration (``CALIBRATION``: both links timed
  at once and the peer copies measured), at 1, 2 and 4 GPUs, each GPU at the same budget. What the
  simulator assumes beyond what the calibration measured (4 identical links, say) comes with every
  row (``Simulator.assumptions``) and is shown beside the figure.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from duoserve_core.errors import BudgetError
from duoserve_core.memory import plan_context
from duoserve_core.policy import PolicyKnobs
from duoserve_core.sim import Calibration, SimModel, build_model, load_calibration, simulate
from duoserve_core.sim.decode_routing import mixtral_replay, preset_routing
from duoserve_core.sim.sim_model import open_config
from duoserve_core.traces import RoutingReplay, Trace

from .gpu_results import RESULTS
from .paper_figures import calibration_label, device_short
from .paths import DATA
from .qos_view import COLOURS

CALIBRATION = DATA / "calibration" / "h200x2_mixtral-8x7b_nf4.json"
MODEL = "mixtral-8x7b"
POLICIES = ("on-demand", "lru", "duoserve")    # what the two-GPU runs measured
GPU_COUNTS = (1, 2, 4)                         # what the simulated figure can show
PROMPT = 512                                   # the measured runs' prompt
SIM_GEN = 32                                   # simulated tokens (the measured runs: 64); TPOT barely moves
# The bench's routing (benchmarks/multi_gpu.sh: ``traces synth --preset mixtral-like --seed 1``), one request.
TRACE_PRESET, TRACE_SEED = "mixtral-like", 1

# The committed single-request runs, in the order drawn: one GPU at 15%, two at 15% each (lru ran on its
# own, a second file), one at 30% (the two's total memory on one link).
MEASURED = ("multi_h200_8x7b_mixtral_like_1gpu_15.json", "multi_h200_8x7b_mixtral_like_2gpu_15.json",
            "multi_h200_8x7b_mixtral_like_2gpu_15_lru.json", "multi_h200_8x7b_mixtral_like_1gpu_30.json")
MEASURED_BATCH = ("multi_batch_h200_8x7b_mixtral_like_1gpu.json", "multi_batch_h200_8x7b_mixtral_like_2gpu.json")
MEASURED_BIG = ("multi_h200_8x22b_synth_1gpu.json", "multi_h200_8x22b_synth_2gpu.json")

_BUDGET = re.compile(r"--memory-budget\s+(\S+)")


# -- labels, read from the files -------------------------------------------------------------------
def devices_of(record: dict) -> list[str]:
    """The GPUs a result file names (``"NVIDIA H200, NVIDIA H200"``: two)."""
    return [d.strip() for d in str(record["device"]).split(",") if d.strip()]


def device_label(record: dict) -> str:
    """``H200`` for one GPU, ``2 x H200`` for two of a kind: the device as a reader says it."""
    names = [device_short(d) for d in devices_of(record)]
    if len(names) > 1 and len(set(names)) == 1:
        return f"{len(names)} x {names[0]}"
    return " + ".join(names)


def budget_of(record: dict) -> str:
    """The per-GPU budget the bench was given (``--memory-budget``, as typed: ``15%``)."""
    found = _BUDGET.search(record.get("command", ""))
    if not found:
        raise ValueError(f"no --memory-budget in the command {record.get('command')!r}")
    return found.group(1)


def model_label(model: str) -> str:
    """``synthetic:mixtral-8x7b`` -> ``Mixtral-8x7B (synthesized)``: the model a file ran, as the tables name it."""
    kind, _, name = model.rpartition(":")
    if kind != "synthetic":
        return model
    return re.sub(r"(\d)b\b", r"\1B", name[:1].upper() + name[1:]) + " (synthesized)"


def setup_label(gpus: int, budget: str) -> str:
    """``1 GPU, 15%``, ``2 GPUs, 15% each``: a setup as the figures name it."""
    return f"1 GPU, {budget}" if gpus == 1 else f"{gpus} GPUs, {budget} each"


def _read(file: str, results_dir: str | Path) -> dict:
    return json.loads((Path(results_dir) / file).read_text())


# -- measured --------------------------------------------------------------------------------------
def measured_table(files: tuple[str, ...] = MEASURED, results_dir: str | Path = RESULTS) -> pd.DataFrame:
    """One row per (setup, policy) of the committed runs, the files' own numbers (seconds, bytes):
    ``setup``, ``gpus``, ``budget`` (per GPU), ``policy``, ``ttft_s``, ``tpot_s``, ``e2e_s``, the slots in all
    and per device (``runtime.memory_plan_by_device``), the largest per-device peak and budget, the run's
    transfer floor and oracle TPOT, the generated tokens and measured repeats (the figures are their
    median), and ``model``, ``device``, ``date``, ``file``."""
    rows = []
    for file in files:
        record = _read(file, results_dir)
        for policy, r in record["results"].items():
            by_device = r["runtime"].get("memory_plan_by_device") or [r["runtime"]["memory_plan"]]
            gpus = len(by_device)
            peaks = r.get("peak_gpu_bytes_by_device") or [r["peak_gpu_bytes"]]
            budget = budget_of(record)
            rows.append({
                "setup": setup_label(gpus, budget), "gpus": gpus, "budget": budget, "policy": policy,
                "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"], "e2e_s": r["e2e_s"],
                "slots": sum(d.get("slots", d.get("num_slots", 0)) for d in by_device),
                "device_slots": " + ".join(str(d.get("slots", d.get("num_slots"))) for d in by_device),
                "peak_gpu_bytes": max(peaks), "budget_bytes": min(d["budget_bytes"] for d in by_device),
                "transfer_floor_s": r["bounds"]["transfer_floor_s"], "oracle_tpot_s": r["bounds"]["oracle_tpot_s"],
                "new_tokens": len(r["tokens"]) if "tokens" in r else None, "repeats": len(r.get("repeats_e2e_s") or [0]),
                "model": model_label(r["runtime"].get("model", "?")),
                "device": device_label(record), "date": record["date"], "file": file})
    return pd.DataFrame(rows)


def _bars(table: pd.DataFrame, notes: dict[str, str], hovers: dict[str, str], title: str) -> go.Figure:
    """TTFT and TPOT side by side: the setups on the x axis in ``table``'s order, each with its note
    under it, one bar per policy in the policy colours (a trace per policy and panel), the hover
    naming where the setup's numbers come from."""
    setups = list(dict.fromkeys(table["setup"]))
    ticks = {s: f"{s}<br><sup>{notes[s]}</sup>" for s in setups}
    fig = make_subplots(rows=1, cols=2, subplot_titles=["TTFT (ms)", "TPOT (ms)"], horizontal_spacing=0.08)
    policies = [p for p in POLICIES if p in set(table["policy"])] + \
        sorted(set(table["policy"]) - set(POLICIES))
    for col, key in enumerate(("ttft_s", "tpot_s"), start=1):
        for policy in policies:
            rows = table[table["policy"] == policy].set_index("setup").reindex(setups).dropna(subset=[key])
            fig.add_trace(go.Bar(
                x=[ticks[s] for s in rows.index], y=rows[key] * 1e3, name=policy, legendgroup=policy,
                showlegend=col == 1, marker_color=COLOURS.get(policy, "#888"),
                text=[f"{v:.0f}" for v in rows[key] * 1e3], textposition="outside", textfont_size=9,
                customdata=[hovers[s] for s in rows.index],
                hovertemplate=f"{policy}, %{{x}}: %{{y:.1f}} ms<br>%{{customdata}}<extra></extra>"), row=1, col=col)
        fig.update_yaxes(title_text="ms", row=1, col=col, rangemode="tozero")
    fig.update_layout(barmode="group", height=430, title=dict(text=title, font_size=13), margin=dict(t=90),
                      legend_title_text="policy")
    return fig


def measured_figure(table: pd.DataFrame | None = None) -> go.Figure:
    """The committed runs: TTFT and TPOT per policy for each setup, labelled with the device and date
    each file records (under the setup) and the files in the hover."""
    table = measured_table() if table is None else table
    notes, hovers = {}, {}
    for setup, rows in table.groupby("setup", sort=False):
        notes[setup] = f"{rows['device'].iloc[0]}, {rows['date'].iloc[0]}, {rows['device_slots'].iloc[0]} slots"
        hovers[setup] = ", ".join(dict.fromkeys(rows["file"]))
    devices = " / ".join(dict.fromkeys(table["device"]))
    dates = ", ".join(sorted(set(table["date"])))
    return _bars(table, notes, hovers,
                 f"{', '.join(dict.fromkeys(table['model']))}, NF4, prompt {PROMPT}, {int(table['new_tokens'].max())} "
                 f"tokens, {_runs(int(table['repeats'].min()))}: measured on {devices}, {dates}")


def _runs(repeats: int) -> str:
    return "1 run" if repeats == 1 else f"median of {repeats}"


def _pick(table: pd.DataFrame, gpus: int, budget: str) -> pd.DataFrame:
    return table[(table["gpus"] == gpus) & (table["budget"] == budget)].set_index("policy")


def ratio_table(table: pd.DataFrame | None = None, big: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per policy: TTFT and TPOT on one GPU and on two at 15% each and their ratio (two / one), and the
    two against one GPU at 30% (the same memory in all, one link); Mixtral-8x22B's duoserve (one
    GPU against two at 15%) as a last row where its files are given."""
    table = measured_table() if table is None else table
    big = big_table() if big is None else big
    one, two, wide = _pick(table, 1, "15%"), _pick(table, 2, "15%"), _pick(table, 1, "30%")
    rows = []

    def row(model: str, policy: str, a: pd.Series, b: pd.Series, c: pd.Series | None = None) -> None:
        out = {"model": model, "policy": policy,
               "slots (1 GPU / 2 GPUs / 1 GPU 30%)": f"{a['slots']} / {b['device_slots']}" +
               (f" / {c['slots']}" if c is not None else ""),
               "TTFT 1 GPU (ms)": a["ttft_s"] * 1e3, "TTFT 2 GPUs (ms)": b["ttft_s"] * 1e3,
               "TTFT 2 / 1": b["ttft_s"] / a["ttft_s"],
               "TPOT 1 GPU (ms)": a["tpot_s"] * 1e3, "TPOT 2 GPUs (ms)": b["tpot_s"] * 1e3,
               "TPOT 2 / 1": b["tpot_s"] / a["tpot_s"],
               "TTFT 2 GPUs / 1 GPU at 30%": b["ttft_s"] / c["ttft_s"] if c is not None else None,
               "TPOT 2 GPUs / 1 GPU at 30%": b["tpot_s"] / c["tpot_s"] if c is not None else None}
        rows.append(out)

    for policy in [p for p in POLICIES if p in one.index and p in two.index]:
        row(one.loc[policy, "model"], policy, one.loc[policy], two.loc[policy], wide.loc[policy] if policy in wide.index else None)
    if len(big):
        b1, b2 = _pick(big, 1, "15%"), _pick(big, 2, "15%")
        for policy in [p for p in b1.index if p in b2.index]:
            a = b1.loc[policy]
            row(f"{a['model']}, {int(a['new_tokens'])} tokens, {_runs(int(a['repeats']))}", policy, a, b2.loc[policy])
    return pd.DataFrame(rows).set_index(["model", "policy"]).round(3)


def big_table(files: tuple[str, ...] = MEASURED_BIG, results_dir: str | Path = RESULTS) -> pd.DataFrame:
    """The Mixtral-8x22B runs (synthesized weights, their own router), in ``measured_table``'s shape."""
    return measured_table(files, results_dir)


def measured_sentence(table: pd.DataFrame | None = None) -> str:
    """One sentence on the measured figure, every number read from ``table``: what the second GPU does to
    TTFT and TPOT at 15% each, and what the same memory on one link (one GPU at 30%) does."""
    table = measured_table() if table is None else table
    one, two, wide = _pick(table, 1, "15%"), _pick(table, 2, "15%"), _pick(table, 1, "30%")
    both = [p for p in POLICIES if p in one.index and p in two.index and p in wide.index]

    def span(a, b, key):
        r = [b.loc[p, key] / a.loc[p, key] for p in both]
        return f"{min(r):.2f}x" if round(min(r), 2) == round(max(r), 2) else f"{min(r):.2f}-{max(r):.2f}x"

    def ms(rows, key):
        v = [rows.loc[p, key] * 1e3 for p in both]
        return f"{min(v):.0f}-{max(v):.0f} ms"

    peak = max(table.loc[table["gpus"] > 1, "peak_gpu_bytes"] / table.loc[table["gpus"] > 1, "budget_bytes"])
    return (f"What to see: a second GPU at 15% each takes every policy's TTFT from {ms(one, 'ttft_s')} to "
            f"{ms(two, 'ttft_s')} ({span(one, two, 'ttft_s')} of one GPU's) and its TPOT from {ms(one, 'tpot_s')} "
            f"to {ms(two, 'tpot_s')} ({span(one, two, 'tpot_s')}), each GPU's peak within its budget (at most "
            f"{peak:.0%} of it); one GPU at 30%, about the same memory on one link "
            f"({wide['slots'].iloc[0]} slots against {two['device_slots'].iloc[0]}), leaves TTFT at "
            f"{span(one, wide, 'ttft_s')} and TPOT at {span(one, wide, 'tpot_s')} of one GPU at 15%: the prompt's "
            "copies need the second link, and the decode gains more from it than from the slots.")


# -- batch-64 decode throughput ----------------------------------------------------------------------
def batch_table(files: tuple[str, ...] = MEASURED_BATCH, results_dir: str | Path = RESULTS) -> pd.DataFrame:
    """The committed batch runs (``--max-batch 64``), one row per file: decode tokens per second against
    the copy floor (B tokens a step over a step's experts x the mean copy time). The floor is counted
    here over every GPU's link, the bench's rule since it counts the links that copied
    (``bench.batch_summary``); ``copy floor, file`` is the figure the file records, which the two-GPU file,
    written before that rule, counts over one link."""
    rows = []
    for file in files:
        record = _read(file, results_dir)
        for r in record["rows"]:
            gpus = len(r.get("device_slots") or [r["slots"]])
            floor = r["mean_batch"] * gpus / (r["experts_per_decode_step"] * r["copy_s"])
            rows.append({"setup": setup_label(gpus, budget_of(record)), "gpus": gpus, "policy": r["policy"],
                         "max_batch": r["max_batch"], "slots": " + ".join(map(str, r.get("device_slots") or [r["slots"]])),
                         "decode tokens/s": r["decode_tokens_per_s"], "copy floor, every link (tokens/s)": floor,
                         "decode / floor": r["decode_tokens_per_s"] / floor,
                         "copy floor, file (tokens/s)": r["copy_floor_tokens_per_s"],
                         "TTFT p50 (s)": r["ttft_p50_s"], "TPOT p50 (ms)": r["tpot_p50_s"] * 1e3,
                         "device": device_label(record), "date": record["date"], "file": file})
    return pd.DataFrame(rows)


def batch_figure(table: pd.DataFrame | None = None) -> go.Figure:
    """Decode tokens per second at batch 64, one bar per setup, with each setup's copy floor over its links
    as a marker: how close batched decode runs to what the links allow."""
    table = batch_table() if table is None else table
    ticks = [f"{s}<br><sup>{d}, {dt}, {sl} slots</sup>" for s, d, dt, sl in
             zip(table["setup"], table["device"], table["date"], table["slots"])]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=ticks, y=table["decode tokens/s"], name=", ".join(dict.fromkeys(table["policy"])),
                         marker_color=[COLOURS.get(p, "#888") for p in table["policy"]],
                         text=[f"{v:.0f}" for v in table["decode tokens/s"]], textposition="inside",
                         customdata=table["file"], hovertemplate="%{x}: %{y:.1f} tokens/s<br>%{customdata}<extra></extra>"))
    fig.add_trace(go.Scatter(x=ticks, y=table["copy floor, every link (tokens/s)"], mode="markers",
                             name="copy floor over its links", marker=dict(symbol="line-ew-open", size=60, color="black",
                                                                           line_width=2),
                             hovertemplate="copy floor: %{y:.1f} tokens/s<extra></extra>"))
    batch = int(table["max_batch"].max())
    fig.update_layout(height=380, width=620, title=dict(
        text=f"Mixtral-8x7B, batch {batch}, decode throughput: measured on {' / '.join(dict.fromkeys(table['device']))}, "
             f"{', '.join(sorted(set(table['date'])))}", font_size=13), yaxis_title="decode tokens/s",
        yaxis_rangemode="tozero", margin=dict(t=70))
    return fig


def batch_sentence(table: pd.DataFrame | None = None) -> str:
    """One sentence on the batch figure, its numbers read from ``table``."""
    table = batch_table() if table is None else table
    one, two = table[table["gpus"] == 1].iloc[0], table[table["gpus"] == 2].iloc[0]
    return (f"What to see: at batch {int(two['max_batch'])} two GPUs decode {two['decode tokens/s']:.0f} tokens/s against "
            f"one's {one['decode tokens/s']:.0f} ({two['decode tokens/s'] / one['decode tokens/s']:.2f}x), each at "
            f"{one['decode / floor']:.0%} and {two['decode / floor']:.0%} of the copy floor over its links "
            f"({one['copy floor, every link (tokens/s)']:.0f} and {two['copy floor, every link (tokens/s)']:.0f} "
            "tokens/s): a batch's decode uses nearly every expert each step, so it is copy-bound and the second "
            f"link doubles what it can do (the two-GPU file records its floor over one link, "
            f"{two['copy floor, file (tokens/s)']:.0f} tokens/s; the table gives both).")


# -- simulated ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def calibration() -> Calibration:
    """The two-GPU calibration (both links timed at once, peer copies measured)."""
    return load_calibration(CALIBRATION)


@functools.lru_cache(maxsize=4)
def _replay(gen: int) -> RoutingReplay:
    """The bench's routing preset and seed, one request of ``PROMPT`` + ``gen`` tokens (about 1 s, once)."""
    return mixtral_replay(Trace(*preset_routing(TRACE_PRESET, seed=TRACE_SEED, requests=1, tokens=gen,
                                                prompt_len=PROMPT)))


@functools.lru_cache(maxsize=32)
def sim_model(gpus: int, budget_pct: float, gen: int = SIM_GEN) -> SimModel:
    """Mixtral-8x7B, NF4 experts and attention, ``budget_pct`` of the model on each of ``gpus`` GPUs (the
    first also holds the dense weights and KV cache, so the others hold more slots), planned for
    ``plan_context`` tokens as every other view, so 15% buys the 21 slots it buys elsewhere."""
    cal = calibration()
    context = plan_context(PROMPT + gen, open_config(MODEL)[1].max_position_embeddings)
    model = build_model(MODEL, quant="nf4", attention_quant="nf4", memory_budget=f"{budget_pct:g}%",
                        max_context=context, device_type=cal.raw["device_type"], devices=gpus)
    cal.check(model.config, "nf4", "nf4")
    return model


@functools.lru_cache(maxsize=256)
def _simulated(policy: str, gpus: int, budget_pct: float, depth: int, threshold: float, gen: int) -> dict:
    model = sim_model(gpus, budget_pct, gen)
    knobs = PolicyKnobs(policy=policy, prefetch_depth=depth, predictor_threshold=threshold)
    r = simulate(model, calibration(), _replay(gen), knobs, PROMPT, gen, warmup=0, policy_time=False)
    plan, prefill = model.plan, r["phases"]["prefill"]
    return {"gpus": gpus, "setup": setup_label(gpus, f"{budget_pct:g}%"), "policy": policy,
            "slots": plan.num_slots, "device_slots": " + ".join(map(str, plan.device_slots or [plan.num_slots])),
            "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"], "transfer_floor_s": r["bounds"]["transfer_floor_s"],
            "oracle_tpot_s": r["bounds"]["oracle_tpot_s"], "prefill_experts": prefill["hits"] + prefill["misses"],
            "assumptions": tuple(a.replace(str(CALIBRATION), CALIBRATION.name) for a in r["assumptions"])}


def counts_up_to(most: int) -> tuple[int, ...]:
    """The GPU counts of ``GPU_COUNTS`` up to ``most``."""
    return tuple(n for n in GPU_COUNTS if n <= most)


def simulated_table(budget_pct: float = 15, depth: int = 2, threshold: float = 0.8,
                    gpus: tuple[int, ...] = GPU_COUNTS, policies: tuple[str, ...] = POLICIES,
                    gen: int = SIM_GEN) -> pd.DataFrame:
    """One row per (GPU count, policy) from the simulator, each GPU at ``budget_pct`` (the bench's
    default policy knobs but prefetch depth and threshold; no policy decision time charged, so the
    table is deterministic): TTFT, TPOT, the slots, the run's transfer floor and oracle, and what the
    simulator assumed for that many GPUs. A count the budget cannot plan is left out."""
    rows, skipped = [], []
    for n in gpus:
        for policy in policies:
            try:
                rows.append(_simulated(policy, int(n), float(budget_pct), int(depth), float(threshold), int(gen)))
            except BudgetError as exc:
                skipped.append(f"{policy} on {n} GPU(s): {exc}")
    if not rows:
        raise BudgetError(f"{budget_pct:g}% per GPU plans no run: " + "; ".join(dict.fromkeys(skipped)))
    return pd.DataFrame(rows)


def simulated_figure(table: pd.DataFrame) -> go.Figure:
    """The simulated table as the measured figure draws it (setups by GPU count), titled with the calibration."""
    notes, hovers = {}, {}
    for setup, rows in table.groupby("setup", sort=False):
        assumed = rows["assumptions"].iloc[0]
        notes[setup] = f"{rows['device_slots'].iloc[0]} slots" + (", assumed beyond the calibration" if assumed else "")
        hovers[setup] = "; ".join(assumed) or "as calibrated"
    cal = calibration().raw
    return _bars(table, notes, hovers, f"Mixtral-8x7B (NF4), prompt {PROMPT}, {SIM_GEN} tokens: simulated "
                 f"({cal.get('gpus', 1)} x {calibration_label(cal)})")


def simulated_sentence(table: pd.DataFrame, measured: pd.DataFrame | None = None) -> str:
    """One sentence on the simulated figure, its numbers read from ``table``, the model and the calibration:
    TPOT and TTFT by GPU count; the two things a prefill cannot beat, the copies over the links (the
    transfer floor) and the host queueing the prompt's expert calls one after another (the calibration's
    host term, which the measured two-GPU prefills in ``measured`` show to be pessimistic there)."""
    counts = sorted(set(table["gpus"]))
    t = table.set_index(["policy", "gpus"])
    policies = [p for p in POLICIES if p in set(table["policy"])]

    def by_count(policy, key):
        return " -> ".join(f"{t.loc[(policy, n), key] * 1e3:.0f}" for n in counts if (policy, n) in t.index)

    tpot = "; ".join(f"{p} {by_count(p, 'tpot_s')}" for p in policies)
    ttft = "; ".join(f"{p} {by_count(p, 'ttft_s')}" for p in policies)
    floors = " -> ".join(f"{table[table['gpus'] == n]['transfer_floor_s'].iloc[0] * 1e3:.0f}" for n in counts)
    per_expert = calibration().per_expert("prefill")
    experts = int(table["prefill_experts"].max())
    top_k = sim_model(counts[0], 100.0).config.num_experts_per_tok
    sim_two = table[table["gpus"] == 2]["ttft_s"]
    measured_note = ""
    if measured is not None and len(two := measured[measured["gpus"] == 2]) and len(sim_two):
        measured_note = (f"; the measured two-GPU prefills ({two['budget'].iloc[0]} each) took "
                         f"{two['ttft_s'].min() * 1e3:.0f}-{two['ttft_s'].max() * 1e3:.0f} ms against the simulated "
                         f"{sim_two.min() * 1e3:.0f}-{sim_two.max() * 1e3:.0f} ms, so that term is pessimistic there "
                         "(`docs/multi_gpu.md`)")
    if len(counts) == 1:
        return (f"What to see: on {counts[0]} GPU TPOT is (ms) {tpot}, and TTFT {ttft}, over a transfer floor of "
                f"{floors} ms; choose more GPUs to compare.")
    return (f"What to see: from {' to '.join(map(str, counts))} GPUs TPOT goes (ms) {tpot}, and TTFT {ttft}. The "
            f"prompt's transfer floor falls with the links ({floors} ms), but the simulator's host queues the "
            f"prompt's {experts} expert calls one after another at {per_expert * 1e3:.2f} ms each ("
            f"{experts * per_expert * 1e3:.0f} ms, the calibration's host term), so once the copies are spread TTFT "
            f"stays near that{measured_note}. A decode token needs {top_k} experts a layer, so on-demand, which "
            f"copies only what the router asks, uses at most {top_k} links at once: past {top_k} GPUs only the "
            "policies that keep experts in the added slots gain.")


def assumptions_note(table: pd.DataFrame) -> str:
    """What the simulator assumed for the GPU counts drawn that the calibration did not measure."""
    cal = calibration()
    notes = {n: list(dict.fromkeys(a for row in table[table["gpus"] == n]["assumptions"] for a in row))
             for n in sorted(set(table["gpus"]))}
    said = [f"{n} GPUs: " + "; ".join(a) for n, a in notes.items() if a]
    measured = (f"*Calibration: `{CALIBRATION.name}` ({calibration_label(cal.raw)}, {cal.raw.get('gpus', 1)} GPUs: "
                f"{cal.links[0] if cal.links else 1} links timed at once, peer copies "
                f"{'measured' if cal.peer is not None else 'not measured'}).* ")
    if not said:
        return measured + "*Nothing assumed beyond it for the GPU counts drawn.*"
    return measured + "*Assumed beyond it:* " + " ".join(f"*{s}.*" for s in said)

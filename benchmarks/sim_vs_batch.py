"""The simulator against the GPU's batched runs: throughput and latency percentiles, row by row.

    python benchmarks/sim_vs_batch.py --calibration data/calibration/h200_mixtral-8x7b_nf4.json \\
        benchmarks/results/batch_h200_*.json benchmarks/results/arrivals_h200_*.json \\
        --out benchmarks/results/sim_vs_batch_h200

``benchmarks/sim_vs_measured.py`` checks one request at a time; this checks the batched serving
the bench measures with ``--max-batch 1,4,16,64`` (``bench.batch_rows``) and ``--arrival-rate``
(``bench.arrival_rows``), against the issue's target: the simulator within 10% of the measured
throughput and p50 latencies. Every measured row is simulated as the bench ran it, the
configuration read back from the file (its bench command and the row): the same model,
quantization, routing trace (request ``i`` replays trace request ``i``, as in the runtime), policy
and knobs, the row's own slot count, the KV context the runtime was opened with (prompt + gen),
B distinct requests of ``--prompt-len`` tokens generating ``--gen`` each, submitted at once or
arriving as the bench's seeded Poisson process (``sim.qos.poisson_arrivals(rate, requests, 0)``);
the bench's habits too: a fresh policy per row, the expert cache emptied before each run, and for
batch rows one warm-up run before the reported one (arrival rows none: the bench warms each policy up
on a full batch and then starts it afresh, so nothing of the warm-up carries into its runs).

Per row the table gives simulated against measured decode throughput (batch rows), throughput,
TTFT and TPOT p50 and p99 (percentiles computed as the bench computes them: ``BatchRun.percentiles``
for batch rows, ``sim.qos.summarize`` for arrival rows), the decode step time, and the expert copies,
with relative errors; the summary gives the largest |relative error| of decode throughput and of
the p50 latencies against the 10% target, and beside it (not judged) the largest error of the arrival
rows' mean TTFT and mean queueing time, which the arrival-to-step phase moves less than the median. Written as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_vs_measured import _command_args, check_graphs, hosts  # noqa: E402

from duoserve_core.bench import ran_with_cuda_graphs  # noqa: E402
from duoserve_core.atomic import atomic_write_json, atomic_write_text, check_writable  # noqa: E402
from duoserve_core.errors import DuoServeError  # noqa: E402
from duoserve_core.host_reference import hosts_line  # noqa: E402
from duoserve_core.knob_args import Parser, knobs_from_args, whole  # noqa: E402
from duoserve_core.runtime import BatchRun  # noqa: E402
from duoserve_core.sim.calibration import load_calibration  # noqa: E402
from duoserve_core.sim.qos import poisson_arrivals, poisson_arrivals_within, summarize  # noqa: E402
from duoserve_core.sim.serving import records  # noqa: E402
from duoserve_core.sim.sim_model import build_model  # noqa: E402
from duoserve_core.sim.simulator import Simulator  # noqa: E402
from duoserve_core.timeline import step_split  # noqa: E402
from duoserve_core.traces import RoutingReplay, TraceError, read_trace  # noqa: E402

TARGET = 0.10  # the issue's: within 10% of the measured throughput and p50 latencies
ARRIVAL_SEED = 0  # bench.arrival_rows' default, which the bench command line does not change
# figures compared, by kind of row; the p50 latencies and decode throughput are the target's
FIGURES = {"batch": ("decode_tokens_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                     "decode_step_s", "h2d_copies"),
           "arrivals": ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "latency_p50_s",
                        "queued_p50_s", "ttft_mean_s", "queued_mean_s", "mean_batch", "decode_step_s",
                        "prompt_step_s", "h2d_copies")}
P50 = ("ttft_p50_s", "tpot_p50_s")
# Beside the target, not in it: under arrivals a TTFT is the wait for the step in progress plus the prompt's
# step, and which step boundary an arrival meets hangs on every earlier step's length, so the median of a
# dozen requests moves by a step's fraction between runs; the mean over all requests is steadier.
ARRIVAL_MEANS = ("ttft_mean_s", "queued_mean_s")
BANDED = P50 + ("queued_p50_s",) + ARRIVAL_MEANS  # the figures --jitter-runs gives a band


def configurations(path: Path, trace_override: str | None = None) -> list[dict]:
    """What each measured row of a ``bench --max-batch`` or ``--arrival-rate`` file ran: enough to simulate it."""
    record = json.loads(path.read_text())
    args = _command_args(record)
    trace = trace_override or args.routing_trace
    if trace is None:
        raise TraceError(f"{path}: the runs followed the model's own router; pass the routing they replayed "
                         "with --trace")
    out = []
    for row in record["rows"]:
        if "skipped" in row:
            continue
        arrivals = "arrival_rate" in row
        out.append({"file": path.name, "kind": "arrivals" if arrivals else "batch", "policy": row["policy"],
                    "model": args.model, "num_layers": args.num_layers, "quant": args.quant,
                    "attention_quant": args.quant_attention, "trace": trace,
                    "knobs": knobs_from_args(args, row["policy"]).effective(),
                    "slots": row["slots"], "max_context": args.prompt_len + args.gen,  # as bench opens the runtime
                    "prompt_len": args.prompt_len, "gen": args.gen, "max_batch": row["max_batch"],
                    "requests": row["requests"] if arrivals else row["max_batch"],
                    "duration_s": args.duration,
                    "arrival_rate": row.get("arrival_rate"), "measured": measured_figures(row),
                    "measured_split": row.get("decode_split"),  # rows from before 2026-12-01 lack it
                    # rows before the schedule knob ran prefill-first; "mixed, chunks of N" names a chunk
                    "prefill_schedule": row.get("prefill_schedule", "prefill-first").split(",")[0],
                    "prefill_chunk": args.prefill_chunk, "cuda_graphs": ran_with_cuda_graphs(record),
                    "host_reference_s": record.get("host_reference_s")})  # files before 2026-12-02 lack it
    return out


def measured_figures(row: dict) -> dict:
    """A bench row's figures under the names ``FIGURES`` uses."""
    if "arrival_rate" in row:
        return arrival_figures(row, row["mean_batch"], row["h2d_copies"], step_times(row))
    return {**{k: row[k] for k in FIGURES["batch"] if k in row}, "decode_step_s": step_times(row)["decode_step_s"]}


def arrival_figures(summary: dict, mean_batch: float, h2d_copies: int, steps: dict) -> dict:
    """An arrival run's figures under the names ``FIGURES`` uses, from a ``sim.qos.summarize`` summary:
    the simulated run's, or the bench row, which carries that summary's keys (``bench.arrival_rows``)."""
    stats = {f"{m}_{p}_s": summary[f"{m}_s"][p] for m, p in (
        ("ttft", "p50"), ("ttft", "p99"), ("tpot", "p50"), ("tpot", "p99"), ("latency", "p50"), ("queued", "p50"),
        ("ttft", "mean"), ("queued", "mean"))}
    return {"tokens_per_s": summary["tokens_per_s"], **stats, "mean_batch": mean_batch, "h2d_copies": h2d_copies,
            **steps}


def step_times(run) -> dict:
    """Mean time of a decode step and of a prompt step (``None`` where a run has none, or where an arrival
    file predates recording them): where a run's time went, which the p50 latencies alone do not say."""
    get = run.get if isinstance(run, dict) else lambda k: getattr(run, k, None)

    def mean(seconds, steps):
        return get(seconds) / get(steps) if get(steps) else None
    return {"decode_step_s": mean("decode_s", "decode_steps"), "prompt_step_s": mean("prompt_s", "prompt_steps")}


def bench_arrivals(config: dict) -> list[float]:
    """The arrival times the bench replayed for an arrival row: by count, or within ``--duration``."""
    if config.get("duration_s"):
        return poisson_arrivals_within(config["arrival_rate"], config["duration_s"], ARRIVAL_SEED)
    return poisson_arrivals(config["arrival_rate"], config["requests"], ARRIVAL_SEED)


def jittered(arrivals: list[float], jitter_s: float, seed: int) -> list[float]:
    """``arrivals``, each moved uniformly within ``jitter_s`` either way (never before 0), in order."""
    rng = random.Random(seed)
    return sorted(max(0.0, a + rng.uniform(-jitter_s, jitter_s)) for a in arrivals)


def simulate(config: dict, calibration, arrivals: list[float] | None = None) -> dict:
    """One measured row simulated the bench's way: its figures (``FIGURES`` names) and a few of the
    simulated run's own (copies and experts per decode step, the decode step's parts). An arrival row
    replays the bench's arrivals unless ``arrivals`` are given."""
    model = build_model(config["model"], quant=config["quant"], attention_quant=config["attention_quant"],
                        memory_budget="all", max_context=config["max_context"],
                        device_type=calibration.raw["device_type"], num_layers=config["num_layers"],
                        num_slots=config["slots"])
    c = model.config
    replay = RoutingReplay(read_trace(config["trace"]), c.num_hidden_layers, c.num_local_experts,
                           c.num_experts_per_tok)
    # the policy's decision time is timed as it runs (scaled to the calibrated host); policy_time
    # False leaves it out, which makes a run deterministic (tests)
    sim = Simulator(model, calibration, replay, config["knobs"], policy_time=config.get("policy_time", True))
    requests = [(config["prompt_len"], config["gen"])] * config["requests"]
    if config["kind"] == "arrivals" and arrivals is None:
        arrivals = bench_arrivals(config)
    for _ in range(2 if config["kind"] == "batch" else 1):  # batch rows: a warm-up run first, as the bench
        if not sim.policy.holds_every_expert:
            sim.empty_cache()
        run = sim.generate_many(requests, config["max_batch"], arrivals, config.get("prefill_schedule", "prefill-first"),
                                config.get("prefill_chunk"))
    decode = [r for r in run.rows if r["phase"] == "decode"]
    steps = run.decode_steps or 1
    split = step_split(run.rows, "decode", run.decode_steps)
    detail = {"decode_copies_per_step": split["copies_per_step"],
              "decode_experts_per_step": sum(r["kind"] == "expert" for r in decode) / steps,
              "attention_s_per_step": sum(r["duration_ms"] for r in decode if r["kind"] == "attention") / 1e3 / steps,
              "decode_split": split}
    if config["kind"] == "batch":
        # the bench's percentiles (BatchRun.percentiles) over the simulated requests
        pct = BatchRun.percentiles(SimpleNamespace(requests=[SimpleNamespace(**r) for r in run.requests]))
        figures = {"decode_tokens_per_s": run.decode_tokens_per_s, "tokens_per_s": run.tokens_per_s, **pct,
                   "decode_step_s": step_times(run)["decode_step_s"],
                   "h2d_copies": run.counts["h2d_copies"]}
    else:
        # the records bench.arrival_rows gives sim.qos.summarize
        q = summarize(records(run.requests))
        figures = arrival_figures(q, run.mean_batch, run.counts["h2d_copies"], step_times(run))
    return {"figures": figures, "detail": detail}


def rel(simulated, measured):
    return None if simulated is None or not measured else (simulated - measured) / measured


def band_error(band: list[float], measured) -> float | None:
    """Relative distance from ``measured`` to the closed interval ``band`` (0 inside it)."""
    if not measured:
        return None
    nearest = min(max(measured, band[0]), band[1])
    return (nearest - measured) / measured


def compare(config: dict, calibration, jitter_runs: int = 0) -> dict:
    """Simulate one measured row; the row of the table: per figure measured, simulated, relative error,
    and for an arrival row with ``jitter_runs``, the band of the simulated values under arrival jitter
    (the bench's own arrivals included) and the measured value's distance to it."""
    sim = simulate(config, calibration)
    figures = {name: {"measured": config["measured"].get(name), "sim": sim["figures"].get(name),
                      "rel_error": rel(sim["figures"].get(name), config["measured"].get(name))}
               for name in FIGURES[config["kind"]]}
    if config["kind"] == "arrivals" and jitter_runs:
        half_step = sim["figures"]["decode_step_s"] / 2
        runs = [sim["figures"]] + [simulate(config, calibration, jittered(bench_arrivals(config), half_step, seed))
                                   ["figures"] for seed in range(1, jitter_runs + 1)]
        for name in BANDED:
            band = [min(r[name] for r in runs), max(r[name] for r in runs)]
            figures[name].update(sim_band=band, band_error=band_error(band, figures[name]["measured"]))
    schedule = config.get("prefill_schedule", "prefill-first")
    policy = config["policy"] if schedule == "prefill-first" else f"{config['policy']} ({schedule})"
    return {"file": config["file"], "kind": config["kind"], "policy": policy, "prefill_schedule": schedule,
            "max_batch": config["max_batch"], "requests": config["requests"], "arrival_rate": config["arrival_rate"],
            "prompt_len": config["prompt_len"], "gen": config["gen"], "slots": config["slots"],
            "figures": figures, "sim_detail": sim["detail"],
            "decode_split": {"measured": config.get("measured_split"), "sim": sim["detail"]["decode_split"]}}


def summary(rows: list[dict], target: float = TARGET) -> dict:
    """The largest |relative error| of decode throughput (batch rows), throughput, and the p50
    latencies (TTFT and TPOT, every row), each with its row, and whether all are within ``target``."""
    def worst(names, kinds=("batch", "arrivals")):
        found = [(abs(r["figures"][n]["rel_error"]), r, n) for r in rows if r["kind"] in kinds
                 for n in names if n in r["figures"] and r["figures"][n]["rel_error"] is not None]
        if not found:
            return None
        err, r, n = max(found, key=lambda f: f[0])
        return {"max_abs_rel_error": err, "figure": n, "file": r["file"], "policy": r["policy"],
                "max_batch": r["max_batch"], "arrival_rate": r["arrival_rate"]}

    out = {"target": target, "decode_tokens_per_s": worst(["decode_tokens_per_s"], ("batch",)),
           "tokens_per_s": worst(["tokens_per_s"]), "p50_latency": worst(P50),
           "arrival_means": worst(list(ARRIVAL_MEANS), ("arrivals",))}  # reported, not judged
    banded = [(abs(r["figures"][n]["band_error"]), r, n) for r in rows for n in P50
              if r["figures"].get(n, {}).get("band_error") is not None]
    if banded:  # reported, not judged: how far each p50 lies from what arrival jitter gives the simulator
        err, r, n = max(banded, key=lambda f: f[0])
        out["p50_latency_band"] = {"max_abs_rel_error": err, "figure": n, "file": r["file"], "policy": r["policy"],
                                   "max_batch": r["max_batch"], "arrival_rate": r["arrival_rate"]}
    judged = [out[k] for k in ("decode_tokens_per_s", "tokens_per_s", "p50_latency") if out[k] is not None]
    out["met"] = bool(judged) and all(x["max_abs_rel_error"] <= target for x in judged)
    return out


def markdown(rows: list[dict], summ: dict, calibration: str, host: dict | None = None) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:+.1f}%"

    def num(v, scale=1.0, spec=".2f"):
        return "-" if v is None else format(v * scale, spec)

    def cell(f, scale=1.0, spec=".2f"):
        return f"{num(f['measured'], scale, spec)} / {num(f['sim'], scale, spec)} ({pct(f['rel_error'])})"

    def worst(key, what):
        w = summ[key]
        if w is None:
            return f"- {what}: -"
        where = f"batch {w['max_batch']}" if w["arrival_rate"] is None else f"{w['arrival_rate']:g}/s"
        return (f"- {what}: max |error| {100 * w['max_abs_rel_error']:.1f}% ({w['figure']}, {w['policy']}, "
                f"{where}, {w['file']})")

    lines = [f"Simulated against measured batched serving (calibration `{calibration}`). "
             "Each cell: measured / simulated (relative error).", ""]
    if host and (line := hosts_line(host)):
        lines += [line, ""]
    lines += ["Batch rows (B requests at once, `bench --max-batch`):", "",
             "| policy | B | slots | decode tok/s | tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms "
             "| decode step ms | copies |",
             "|---|---:|---:|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "batch"):
        f = r["figures"]
        lines.append(f"| {r['policy']} | {r['max_batch']} | {r['slots']} | {cell(f['decode_tokens_per_s'], spec='.1f')} "
                     f"| {cell(f['tokens_per_s'], spec='.1f')} | {cell(f['ttft_p50_s'])} | {cell(f['ttft_p99_s'])} "
                     f"| {cell(f['tpot_p50_s'], 1e3, '.1f')} | {cell(f['tpot_p99_s'], 1e3, '.1f')} "
                     f"| {cell(f['decode_step_s'], 1e3, '.1f')} | {cell(f['h2d_copies'], spec='.0f')} |")
    arrivals = [r for r in rows if r["kind"] == "arrivals"]
    if arrivals:
        lines += ["", "Arrival rows (Poisson arrivals, `bench --arrival-rate`):", "",
                  "| policy | rate /s | requests | max batch | tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms "
                  "| TPOT p99 ms | latency p50 s | queued p50 s | TTFT mean s | queued mean s | mean batch "
                  "| decode step ms | prompt step ms | copies |",
                  "|---|---:|---:|---:|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in arrivals:
            f = r["figures"]
            lines.append(f"| {r['policy']} | {r['arrival_rate']:g} | {r['requests']} | {r['max_batch']} "
                         f"| {cell(f['tokens_per_s'], spec='.1f')} | {cell(f['ttft_p50_s'])} | {cell(f['ttft_p99_s'])} "
                         f"| {cell(f['tpot_p50_s'], 1e3, '.1f')} | {cell(f['tpot_p99_s'], 1e3, '.1f')} "
                         f"| {cell(f['latency_p50_s'])} | {cell(f['queued_p50_s'])} | {cell(f['ttft_mean_s'])} "
                         f"| {cell(f['queued_mean_s'])} | {cell(f['mean_batch'])} "
                         f"| {cell(f['decode_step_s'], 1e3, '.1f')} | {cell(f['prompt_step_s'], 1e3, '.1f')} "
                         f"| {cell(f['h2d_copies'], spec='.0f')} |")
    banded = [r for r in arrivals if "sim_band" in r["figures"]["ttft_p50_s"]]
    if banded:
        def band(f, scale=1.0, spec=".2f"):
            lo, hi = f["sim_band"]
            return f"{num(lo, scale, spec)}-{num(hi, scale, spec)} ({pct(f['band_error'])})"
        lines += ["", "Arrival rows under arrival jitter: the simulated values' range when every arrival moves "
                  "within half a decode step either way (the bench's own arrivals and the seeded draws), and the "
                  "measured value's distance to that range (0 inside it):", "",
                  "| policy | rate /s | TTFT p50 s | TPOT p50 ms | queued p50 s | TTFT mean s | queued mean s |",
                  "|---|---:|---|---|---|---|---|"]
        for r in banded:
            f = r["figures"]
            lines.append(f"| {r['policy']} | {r['arrival_rate']:g} | {num(f['ttft_p50_s']['measured'])}: "
                         f"{band(f['ttft_p50_s'])} | {num(f['tpot_p50_s']['measured'], 1e3, '.1f')}: "
                         f"{band(f['tpot_p50_s'], 1e3, '.1f')} | {num(f['queued_p50_s']['measured'])}: "
                         f"{band(f['queued_p50_s'])} | {num(f['ttft_mean_s']['measured'])}: {band(f['ttft_mean_s'])} "
                         f"| {num(f['queued_mean_s']['measured'])}: {band(f['queued_mean_s'])} |")
    split = [r for r in rows if r["decode_split"]["measured"]]
    if split:
        lines += ["", "Where a decode step's time went, per step, measured / simulated: the copy streams' and "
                  "compute streams' busy time (the copies' over their count: the link's speed per copy, which machines "
                  "of one kind do not share), the compute's also by kind (files measured before 2026-12-01's split "
                  "by kind show -); the rest of the step they idled (host work, syncs):", "",
                  "| policy | B or rate | step ms | copies | copy busy ms | ms a copy | compute busy ms | attention ms "
                  "| router ms | experts ms |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in split:
            m, sm = r["decode_split"]["measured"], r["decode_split"]["sim"]
            where = f"B {r['max_batch']}" if r["arrival_rate"] is None else f"{r['arrival_rate']:g}/s"
            copies, copy, compute, attention, router, experts = (
                {"measured": m.get(k), "sim": sm.get(k), "rel_error": rel(sm.get(k), m.get(k))} for k in
                ("copies_per_step", "copy_busy_s", "compute_busy_s", "attention_busy_s", "router_busy_s",
                 "expert_busy_s"))
            per_copy = {k: copy[k] / copies[k] if copy[k] is not None and copies[k] else None for k in ("measured", "sim")}
            per_copy["rel_error"] = rel(per_copy["sim"], per_copy["measured"])
            lines.append(f"| {r['policy']} | {where} | {cell(r['figures']['decode_step_s'], 1e3, '.1f')} "
                         f"| {cell(copies, spec='.1f')} | {cell(copy, 1e3, '.1f')} | {cell(per_copy, 1e3, '.2f')} "
                         f"| {cell(compute, 1e3, '.1f')} "
                         f"| {cell(attention, 1e3, '.1f')} | {cell(router, 1e3, '.1f')} | {cell(experts, 1e3, '.1f')} |")
    lines += ["", f"Target: within {100 * summ['target']:.0f}% of the measured throughput and p50 latencies: "
              + ("met." if summ["met"] else "not met."),
              worst("decode_tokens_per_s", "decode throughput (batch rows)"),
              worst("tokens_per_s", "throughput"), worst("p50_latency", "p50 latencies (TTFT, TPOT)")]
    if summ.get("arrival_means") is not None:
        lines.append(worst("arrival_means", "arrival rows' TTFT and queueing means (reported beside the target, "
                                            "not judged)"))
    if summ.get("p50_latency_band") is not None:
        lines.append(worst("p50_latency_band", "p50 latencies' distance to their band under arrival jitter "
                                                "(reported beside the target, not judged)"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="+", help="bench --max-batch / --arrival-rate result JSON files")
    p.add_argument("--calibration", required=True)
    p.add_argument("--trace", default=None, help="routing trace to use instead of the one the bench command names")
    p.add_argument("--out", default="benchmarks/results/sim_vs_batch", help="path stem: .json and .md are written")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--jitter-runs", type=whole(0), default=0, metavar="K",
                   help="simulate each arrival row K more times under arrival jitter and report the band (default 0)")
    args = p.parse_args(argv)
    try:
        for suffix in (".json", ".md"):  # before minutes of simulating, not after
            check_writable(f"{args.out}{suffix}", args.force, "--out")
        calibration = load_calibration(args.calibration)
        configs = [c for path in args.bench for c in configurations(Path(path), args.trace)]
        check_graphs(configs, calibration, args.calibration)
        rows = [compare(c, calibration, args.jitter_runs) for c in configs]
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summ, host = summary(rows), hosts(configs, calibration)
    atomic_write_json(f"{args.out}.json", {"calibration": args.calibration, "bench_files": args.bench,
                                           "hosts": host, "summary": summ, "rows": rows})
    table = markdown(rows, summ, args.calibration, host)
    atomic_write_text(f"{args.out}.md", table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

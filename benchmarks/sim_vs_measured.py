"""The simulator against the GPU: every measured configuration simulated, TTFT and TPOT side by side.

    python benchmarks/sim_vs_measured.py --calibration data/calibration/H100.json \\
        benchmarks/results/bench_NVIDIA_H100_80GB_HBM3_*.json --out benchmarks/results/sim_vs_measured_h100

For each policy of each bench result file (``python -m duoserve_core.bench``), the configuration is
read back from the file itself: the bench command (model, quantization, routing trace, predictor,
knobs), and the run's own runtime description (slot count, context the KV cache was sized for,
prompt and generated lengths). The simulator replays the same routing (the bench's
``--routing-trace``, request 0, the same positions) through the same policy at the same slot count,
with the bench's warm-up habit, and the table gives the relative error of TTFT and TPOT, beside the
expert copies each made (equal copies: the simulator took the real decisions). Written as JSON and
Markdown.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from duoserve_core.bench.__main__ import parse_args as bench_args  # noqa: E402
from duoserve_core.bench import ran_with_cuda_graphs  # noqa: E402
from duoserve_core.calibrate import device_terms  # noqa: E402
from duoserve_core.errors import DuoServeError  # noqa: E402
from duoserve_core.host_reference import hosts as host_speeds, hosts_line  # noqa: E402
from duoserve_core.policy import policy_class  # noqa: E402
from duoserve_core.atomic import atomic_write_json, atomic_write_text, check_writable  # noqa: E402
from duoserve_core.sim.runner import simulate  # noqa: E402
from duoserve_core.sim.calibration import CalibrationError, format_name, load_calibration  # noqa: E402
from duoserve_core.sim.sim_model import build_model  # noqa: E402
from duoserve_core.traces import RoutingReplay, TraceError, read_trace  # noqa: E402


def _command_args(record: dict):
    words = shlex.split(record["command"])
    return bench_args(words[3:] if words[:3] == ["python", "-m", "duoserve_core.bench"] else words[1:])


def configurations(path: Path, trace_override: str | None = None) -> list[dict]:
    """What each policy of one bench result (or each row of a sweep) ran: enough to simulate it."""
    record = json.loads(path.read_text())
    if "rows" in record:
        return sweep_configurations(path, record, trace_override)
    args = _command_args(record)
    out = []
    for policy, r in record["results"].items():
        rt = r["runtime"]
        trace = trace_override or rt.get("routing_trace") or args.routing_trace
        if trace is None:
            raise TraceError(f"{path}: the {policy} run followed the model's own router; rerun the bench with "
                             "--routing-trace (or --record-trace, and pass it here with --trace)")
        out.append({"file": path.name, "policy": policy, "model": args.model, "num_layers": args.num_layers,
                    "quant": args.quant, "attention_quant": args.quant_attention, "trace": trace,
                    "slots": rt["memory_plan"]["num_slots"], "device_slots": rt["memory_plan"].get("device_slots"),
                    "budget_bytes": rt["memory_plan"].get("budget_bytes"),  # the headroom device routing needs
                    "max_context": rt["max_context"],
                    "prompt_len": r["prompt_tokens"], "gen": len(r["tokens"]), "predictor": args.predictor,
                    "prefetch_depth": rt.get("prefetch_depth") or args.prefetch_depth,
                    "predictor_threshold": rt.get("predictor_threshold") or args.predictor_threshold,
                    "speculative_gate": bool(rt.get("speculative_gate")), "measured": r, "label": "bench",
                    "cuda_graphs": bool(rt.get("cuda_graphs", ran_with_cuda_graphs(record))),
                    # files before 2026-12-01 routed every layer on the host
                    "device_routing": str(rt.get("decode_routing", "host")).startswith("device"),
                    "host_reference_s": record.get("host_reference_s")})  # files before 2026-12-02 lack it
    return out


def sweep_configurations(path: Path, record: dict, trace_override: str | None = None) -> list[dict]:
    """One configuration per measured row of a ``bench --sweep`` file.

    A row carries sweep, policy, prompt_len, slots and the knobs (prefetch_depth,
    predictor_threshold, speculative_gate); the rest comes from the record's command: model,
    quantization, routing trace, predictor, ``--gen``, and the context the runtime was opened with
    (the longest prompt of the sweep + gen, as ``bench.sweep`` opens it)."""
    args = _command_args(record)
    trace = trace_override or args.routing_trace
    if trace is None:
        raise TraceError(f"{path}: the sweep followed the model's own router; pass the recorded routing with --trace")
    lens = [int(x) for x in args.prompt_lens.split(",")] if getattr(args, "prompt_lens", None) else []
    max_context = max(lens + [args.prompt_len]) + args.gen
    out = []
    for row in record["rows"]:
        if "skipped" in row:
            continue
        predicts = "speculative_gate" in policy_class(row["policy"]).uses
        measured = {"ttft_s": row["ttft_s"], "tpot_s": row["tpot_s"], "h2d_bytes": row.get("h2d_bytes"),
                    "h2d_copies": row.get("h2d_copies"), "hit_rate": row.get("hit_rate")}
        out.append({"file": path.name, "policy": row["policy"], "model": args.model, "num_layers": args.num_layers,
                    "quant": args.quant, "attention_quant": args.quant_attention, "trace": trace,
                    "slots": row["slots"], "max_context": max_context, "prompt_len": row["prompt_len"],
                    "gen": args.gen, "predictor": args.predictor,
                    "prefetch_depth": row.get("prefetch_depth") or args.prefetch_depth,
                    "predictor_threshold": (row["predictor_threshold"] if row.get("predictor_threshold") is not None
                                            else args.predictor_threshold),
                    "speculative_gate": bool(row.get("speculative_gate")) if predicts else False,
                    "measured": measured, "label": f"sweep:{row['sweep']}", "cuda_graphs": ran_with_cuda_graphs(record),
                    "host_reference_s": record.get("host_reference_s")})
    return out


def derived_device_terms(bench: Path, calibration):
    """``calibrate.device_terms`` applied to the timelines a bench run wrote (``--timelines``; looked
    for as ``<dir of the file>/timelines/<stem>_<policy>.parquet``): the calibration with the
    derived ``device_time`` and decode host time per expert merged in, and a note of what was used.
    The timeline gives one 1-token expert point; where the calibration holds a per-token-count curve
    (``calibrate.measure_experts`` on CUDA) that curve is kept (``Calibration.with_device_time``)."""
    import pandas as pd

    record = json.loads(bench.read_text())
    fmt = format_name(calibration.quant, calibration)
    runs, used = [], []
    for policy, r in record["results"].items():
        timeline = bench.parent / "timelines" / f"{bench.stem}_{policy}.parquet"
        if timeline.is_file() and "skipped" not in r:
            runs.append((policy, r["prompt_tokens"], pd.read_parquet(timeline).to_dict("records")))
            used.append(str(timeline))
    if not runs:
        raise DuoServeError(f"{bench}: no timelines next to it (expected {bench.parent / 'timelines'}/{bench.stem}_<policy>.parquet)")
    # device times from the on-demand run (its compute stream waits on every layer's copies, as in
    # calibrate's own on-demand run); host per expert from the host-bound layers of the prefetching
    # policies (on-demand copies in every layer, so it has none)
    device_time, _ = device_terms([(prompt, rows) for policy, prompt, rows in runs if policy == "on-demand"], fmt)
    _, per_expert = device_terms([(prompt, rows) for policy, prompt, rows in runs if policy != "on-demand"], fmt)
    device_time["source"] = f"derived from the measured timelines of {bench} (calibrate.device_terms)"
    note = {"from": str(bench), "timelines": used, "device_time": device_time, "per_expert_decode_s": per_expert}
    return calibration.with_device_time(device_time, per_expert, f"{calibration.where} + device terms of {bench.name}"), note


def borrowed_host_terms(calibration, donor: Path):
    """The calibration with the host's time per expert and per copy taken from ``donor``, another
    calibration (and a note of it): a what-if for a calibration measured before ``calibrate`` timed the
    host's own call per expert, whose fitted figure held device waits. A diagnosis, not a calibration:
    the donor was measured on another machine."""
    from duoserve_core.sim.calibration import Calibration

    host = load_calibration(donor).raw["host"]
    raw = json.loads(json.dumps(calibration.raw))
    raw["host"] = {**raw["host"], "per_expert_s": host["per_expert_s"], "per_copy_s": host["per_copy_s"]}
    note = {"from": str(donor), "per_expert_s": host["per_expert_s"], "per_copy_s": host["per_copy_s"]}
    return Calibration(raw, f"{calibration.where} + host per expert and per copy of {donor}"), note


def compare(config: dict, calibration) -> dict:
    """Simulate one configuration; the row of the table."""
    model = build_model(config["model"], quant=config["quant"], attention_quant=config["attention_quant"],
                        memory_budget=config.get("budget_bytes") or "all", max_context=config["max_context"],
                        device_type=calibration.raw["device_type"], num_layers=config["num_layers"],
                        **({"devices": len(config["device_slots"]), "device_slots": config["device_slots"]}
                           if config.get("device_slots") else {"num_slots": config["slots"]}))
    c = model.config
    replay = RoutingReplay(read_trace(config["trace"]), c.num_hidden_layers, c.num_local_experts,
                           c.num_experts_per_tok)
    sim = simulate(model, calibration, replay, config["policy"], config["prompt_len"], config["gen"],
                   predictor=config["predictor"], prefetch_depth=config["prefetch_depth"],
                   predictor_threshold=config["predictor_threshold"], speculative_gate=config["speculative_gate"],
                   routing_trace=config["trace"], device_routing=config.get("device_routing", False))
    m = dict(config["measured"])
    if m.get("h2d_copies") is None and m.get("h2d_bytes") is not None:
        m["h2d_copies"] = m["h2d_bytes"] // model.format.nbytes

    def rel(simulated, measured):
        return None if simulated is None or not measured else (simulated - measured) / measured

    return {"file": config["file"], "run": config.get("label", "bench"), "policy": config["policy"],
            "prompt_len": config["prompt_len"], "gen": config["gen"], "slots": config["slots"],
            **{k: config[k] if k in policy_class(config["policy"]).uses else None
               for k in ("prefetch_depth", "predictor_threshold", "predictor")},
            "ttft_measured_s": m["ttft_s"], "ttft_sim_s": sim["ttft_s"], "ttft_rel_error": rel(sim["ttft_s"], m["ttft_s"]),
            "tpot_measured_s": m["tpot_s"], "tpot_sim_s": sim["tpot_s"], "tpot_rel_error": rel(sim["tpot_s"], m["tpot_s"]),
            "h2d_copies_measured": m["h2d_copies"], "h2d_copies_sim": sim["h2d_copies"],
            "hit_rate_measured": m.get("hit_rate"), "hit_rate_sim": sim["hit_rate"]}


def hosts(configs: list[dict], calibration) -> dict:
    """The calibration's host speed and each file's that recorded one (``host_reference.hosts``)."""
    return host_speeds(calibration.host_reference_s, {c["file"]: c.get("host_reference_s") for c in configs})


def markdown(rows: list[dict], calibration: str, host: dict | None = None) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:+.1f}%"

    def ms(v):
        return "-" if v is None else f"{v * 1e3:.2f}"

    def knobs(r):
        if r.get("prefetch_depth") is None:
            return "-"
        return f"d{r['prefetch_depth']} t{r['predictor_threshold']:g}" + (" +pred" if r.get("predictor") else "")

    lines = [f"Simulated against measured (calibration `{calibration}`).", ""]
    if host and (line := hosts_line(host)):
        lines += [line, ""]
    lines += ["| file | run | policy | knobs | prompt | gen | slots | TTFT meas. ms | TTFT sim ms | TTFT err "
             "| TPOT meas. ms | TPOT sim ms | TPOT err | copies meas./sim |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['file']} | {r.get('run', 'bench')} | {r['policy']} | {knobs(r)} | {r['prompt_len']} | "
                     f"{r['gen']} | {r['slots']} | "
                     f"{ms(r['ttft_measured_s'])} | {ms(r['ttft_sim_s'])} | {pct(r['ttft_rel_error'])} | "
                     f"{ms(r['tpot_measured_s'])} | {ms(r['tpot_sim_s'])} | {pct(r['tpot_rel_error'])} | "
                     f"{r['h2d_copies_measured']}/{r['h2d_copies_sim']} |")
    return "\n".join(lines) + "\n"


def check_graphs(configs: list[dict], calibration, calibration_path: str) -> None:
    """A run with CUDA graphs spends less host time a layer than the eager path whose terms a
    calibration without them holds (and the other way round): simulating it with those terms would
    report the graphs' saving as the simulator's error, so such a pair is refused."""
    graphs = bool(calibration.raw.get("cuda_graphs", False))  # files before 2026-12-01 ran eagerly
    mismatched = sorted({c["file"] for c in configs if c["cuda_graphs"] != graphs})
    if mismatched:
        ran = "without" if graphs else "with"
        raise CalibrationError(
            f"{', '.join(mismatched)} ran {ran} CUDA graphs, but {calibration_path} was calibrated "
            f"{'with' if graphs else 'without'} them (its host terms are not those runs'); calibrate the same way "
            f"(python -m duoserve_core.calibrate ... {'--cuda-graphs' if not graphs else '--no-cuda-graphs'}) or "
            "leave those files out")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="+", help="bench result JSON files")
    p.add_argument("--calibration", required=True)
    p.add_argument("--trace", default=None, help="routing trace to use where a bench file names none")
    p.add_argument("--out", default="benchmarks/results/sim_vs_measured", help="path stem: .json and .md are written")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--device-times-from", default=None, metavar="BENCH.json",
                   help="derive the device times and the decode host time per expert from the timelines of this "
                        "bench run (calibrate.device_terms), for a calibration measured without them; use a run "
                        "that is not among the ones compared")
    p.add_argument("--host-terms-from", default=None, metavar="CALIBRATION.json",
                   help="take the host's time per expert and per copy from this calibration (a what-if for one "
                        "measured before calibrate timed them; the table names both)")
    p.add_argument("--trace-for", action="append", default=[], metavar="FILE=TRACE",
                   help="routing trace for one bench/sweep file (repeatable); --trace applies to the rest")
    args = p.parse_args(argv)
    per_file = dict(item.split("=", 1) for item in args.trace_for)
    try:
        for suffix in (".json", ".md"):  # before minutes of simulating, not after
            check_writable(f"{args.out}{suffix}", args.force, "--out")
        calibration = load_calibration(args.calibration)
        derived = None
        if args.device_times_from:
            calibration, derived = derived_device_terms(Path(args.device_times_from), calibration)
        borrowed = None
        if args.host_terms_from:
            calibration, borrowed = borrowed_host_terms(calibration, Path(args.host_terms_from))
        configs = [c for path in args.bench for c in configurations(Path(path), per_file.get(path, args.trace))]
        check_graphs(configs, calibration, args.calibration)
        rows = [compare(c, calibration) for c in configs]
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = hosts(configs, calibration)
    atomic_write_json(f"{args.out}.json", {"calibration": args.calibration, "derived_terms": derived,
                                           "host_terms_from": borrowed, "bench_files": args.bench, "hosts": host,
                                           "rows": rows})
    table = markdown(rows, args.calibration + (f" + device terms derived from `{args.device_times_from}`"
                                               if args.device_times_from else "")
                     + (f" + host time per expert and per copy from `{args.host_terms_from}`"
                        if args.host_terms_from else ""), host)
    atomic_write_text(f"{args.out}.md", table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

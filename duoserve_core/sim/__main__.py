"""Replay a routing trace through the real policies on a calibrated timing model.

    python -m duoserve_core.sim --trace data/traces/small-moe-heldout.parquet --model-preset mixtral-8x7b \\
        --quant nf4 --quant-attention nf4 --calibration data/calibration/H100.json --memory-budget 15% \\
        --policy duoserve,on-demand --predictor data/predictors/small-moe-x32-depth2.safetensors \\
        --prompt-len 512 --gen 128 --json [--timeline-out trace.json]

reports per policy what ``python -m duoserve_core.bench`` reports (TTFT, TPOT, E2E, peak memory,
bytes moved, hit rate, prefetch precision, the bounds with Belady's oracle). More views:

    --sweep                 hit rate, loads and TPOT estimates of Belady / LRU / per-layer LRU / LFU at
                            every slot count, from the trace alone (``--requests N`` trace requests)
    --arrival-rate R        QoS: N requests (``--requests``) arriving as a Poisson process of R per second
    --arrivals 0,0.4,1.1    (or at these times), served FCFS; TTFT/TPOT percentiles and SLO attainment
                            (``--slo-ttft-ms``, ``--slo-tpot-ms``) per policy; with ``--max-batch N``, up to N
                            decoding together through the runtime's batcher (``--prefill-schedule``, default
                            mixed), as ``bench --arrival-rate --max-batch N`` serves them
    --max-batch 1,4,16,64   alone: B requests at once, throughput and percentiles per batch size and
                            policy with the bench's row fields (``sim.serving``; default prefill-first)

``--gpus N`` simulates N GPUs, the budget on each, every GPU its own slots and link; what that assumes
beyond the calibration (one GPU's link measured: N identical, independent links) is printed as a note
and kept in the result (``assumptions``).

A model with more layers than the trace replays it in relabelled blocks (``traces.RoutingReplay``),
exactly as the runtime's ``--routing-trace`` does; prompt and generation lengths default to the
trace request's own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import sys
from pathlib import Path

from ..batching import DEFAULT_SCHEDULE
from ..bench import format_batch_table, format_table
from ..errors import BudgetError, DuoServeError
from ..atomic import atomic_write_json, check_writable
from ..knob_args import (Parser, add_knob_arguments, add_routing_argument, add_schedule_arguments, budget, gpus,
                         knobs_from_args, listed, number, seed, whole)
from ..memory import PLAN_CONTEXT, plan_context
from ..progress import interruptible, progress
from ..traces import RoutingReplay, TraceError, read_trace
from . import qos, reference, serving
from .runner import simulate
from .calibration import load_calibration
from .simulator import Simulator, SimTimeline
from .sim_model import build_model, open_config



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m duoserve_core.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="routing trace (Parquet, duoserve-trace/1)")
    p.add_argument("--model-preset", default="mixtral-8x7b",
                   help="mixtral-8x7b, mixtral-8x22b, synthetic:<preset>, a checkpoint folder or its config.json")
    p.add_argument("--num-layers", type=whole(1), default=None)
    p.add_argument("--quant", default="nf4")
    p.add_argument("--quant-attention", default="none")
    p.add_argument("--calibration", required=True, help="from python -m duoserve_core.calibrate")
    p.add_argument("--memory-budget", type=budget, default="15%",
                   help="bytes, %% of the model, Nslots or all (on each GPU with --gpus)")
    p.add_argument("--gpus", type=gpus(auto=False), default=1,
                   help="GPUs simulated, each with its expert slots and its own link (default 1); a calibration of "
                        "one GPU's link assumes identical, independent links, and says so")
    p.add_argument("--policy", default="duoserve", help="one or several, comma-separated")
    add_knob_arguments(p)
    add_routing_argument(p)
    p.add_argument("--request", type=whole(0), default=0, help="trace request replayed (its index, wrapping)")
    p.add_argument("--prompt-len", type=whole(1), default=None, help="default: the trace request's prompt")
    p.add_argument("--gen", type=whole(1), default=None, help="default: the trace request's generated tokens")
    p.add_argument("--max-context", type=whole(1), default=None,
                   help=f"tokens of KV cache the plan reserves (default: {PLAN_CONTEXT}, or the longest request)")
    p.add_argument("--warmup", type=whole(0), default=1, help="runs before the reported one, as the bench does")
    p.add_argument("--no-policy-time", action="store_true", help="do not charge the policy's decision time")
    p.add_argument("--sweep", action="store_true", help="reference caches at every slot count")
    p.add_argument("--requests", type=whole(1), default=None, help="--sweep / QoS: how many requests")
    p.add_argument("--arrival-rate", type=number(0.0, above=True), default=None, help="QoS: Poisson arrivals per second")
    p.add_argument("--arrivals", type=listed(number(0.0)), default=None, help="QoS: comma-separated arrival times in seconds")
    p.add_argument("--max-batch", type=listed(whole(1)), default=None,
                   help="batch sizes, e.g. 1,4,16,64: B requests at once (the bench's --max-batch rows); with "
                        "--arrival-rate or --arrivals, one size: the most requests decoding together")
    add_schedule_arguments(p, default=None, default_note="; default: prefill-first with --max-batch alone, "
                           f"{DEFAULT_SCHEDULE} with arrivals")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--slo-ttft-ms", type=number(0.0, above=True), default=None)
    p.add_argument("--slo-tpot-ms", type=number(0.0, above=True), default=None)
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--timeline-out", default=None, help="Chrome trace of the run (one file per policy: NAME.POLICY.json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--force", action="store_true", help="replace --out or --timeline-out files if they exist")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return interruptible(lambda: _main(args, argv))


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    try:
        check_outputs(args)
        # --json: the record alone on stdout; the table goes to stderr
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            record = run(args, argv)
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_json(args.out, record)
    if args.json:
        print(json.dumps(record))
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """Every file this run would write, refused before the trace and the model are read."""
    if args.out:
        check_writable(args.out, args.force, "--out")
    replay_view = not args.sweep and args.arrival_rate is None and args.arrivals is None and not args.max_batch
    if args.timeline_out and replay_view:  # the other views record no timeline
        for path in timeline_paths(args.timeline_out, args.policy.split(",")).values():
            check_writable(path, args.force, "--timeline-out")


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    qos_mode = args.arrival_rate is not None or args.arrivals is not None
    sizes = [int(b) for b in args.max_batch.split(",")] if args.max_batch else []
    check_batch_view(args, qos_mode, sizes)
    cal = load_calibration(args.calibration)
    trace = read_trace(args.trace)
    lengths = qos.request_lengths(trace)
    if not lengths:
        raise TraceError(f"--trace {args.trace} holds no requests; record or synthesize a trace with at least one")
    prompt, gen = lengths[args.request % len(lengths)]
    prompt, gen = args.prompt_len or prompt, args.gen or gen
    batch_mode = bool(sizes) and not qos_mode
    n_requests = max(sizes) if batch_mode else args.requests or (8 if args.sweep or qos_mode else 1)
    requests = [(i % len(lengths), args.prompt_len or lengths[i % len(lengths)][0],
                 args.gen or lengths[i % len(lengths)][1]) for i in range(n_requests)]
    _, c, _ = open_config(args.model_preset, args.num_layers)  # shapes first: the errors a user fixes first
    longest = max([prompt + gen] + [p + g for _, p, g in requests] if qos_mode or args.sweep or batch_mode
                  else [prompt + gen])
    context = plan_context(longest, c.max_position_embeddings, args.max_context)
    cal.check(c, args.quant, args.quant_attention)
    if args.sweep and args.gpus > 1:
        raise DuoServeError("--sweep estimates one GPU's caches at every slot count; drop --gpus, or compare "
                            "GPUs in the replay or QoS view")
    replay = RoutingReplay(trace, c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok)
    knobs = knobs_from_args(args)  # checked before the model: --cpu-split also shapes its records
    model = build_model(args.model_preset, quant=args.quant, attention_quant=args.quant_attention,
                        memory_budget=args.memory_budget, max_context=context, device_type=cal.raw["device_type"],
                        num_layers=args.num_layers, devices=args.gpus, cpu_split=knobs.cpu_split)
    assumptions = cal.assumptions(model.plan.devices)  # what each Simulator says in ``assumptions``
    for note in assumptions:
        print(f"note: {note}", file=sys.stderr)
    record = {"device": "simulated " + ", ".join([cal.device] * args.gpus), "gpus": args.gpus,
              "assumptions": assumptions, "calibration": str(args.calibration), "trace": str(args.trace),
              "date": datetime.date.today().isoformat(),
              "command": "python -m duoserve_core.sim " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "model": model.describe()}
    if args.sweep:
        w = reference.workload(replay, requests, c.num_hidden_layers, c.num_local_experts)
        loads = {}  # one policy at a time, so a bar can count them (each takes seconds at 64 requests)
        for policy in progress(reference.POLICIES, desc="sweep", unit="policy", quiet=args.json):
            loads.update(reference.sweep(w, (policy,)))
        rows = reference.table(w, model, cal, loads)
        record.update(view="sweep", requests=requests, rows=rows)
        _print_sweep(rows, model.plan.num_slots)
        return record
    policies = args.policy.split(",")
    for policy in policies:  # every name and knob checked before any run
        knobs.changed(policy=policy)
    results, skipped = {}, {}

    def simulator(policy: str, timeline: bool = False) -> Simulator:
        return Simulator(model, cal, replay, knobs.changed(policy=policy).effective(), record_timeline=timeline,
                         policy_time=not args.no_policy_time, device_routing=args.device_routing)

    if batch_mode:
        schedule = args.prefill_schedule or "prefill-first"
        rows = []
        for b in sizes:
            for policy in policies:
                try:  # a fresh simulator a row, as the bench empties its cache: every row starts cold
                    rows.append(serving.batch_row(simulator(policy, timeline=True), policy,
                                                  [(p, g) for _, p, g in requests[:b]], schedule, args.prefill_chunk))
                except BudgetError as exc:
                    rows.append({"max_batch": b, "policy": policy, "skipped": str(exc)})
        record.update(view="batch", prefill_schedule=schedule, rows=rows)
        print(format_batch_table(rows))
        return record
    if qos_mode:
        arrivals = ([float(x) for x in args.arrivals.split(",")] if args.arrivals
                    else qos.poisson_arrivals(args.arrival_rate, n_requests, args.seed))
        reqs = qos.make_requests(arrivals, lengths, args.prompt_len, args.gen)
        schedule = args.prefill_schedule or DEFAULT_SCHEDULE
        for policy in policies:
            try:
                sim = simulator(policy)
            except BudgetError as exc:
                skipped[policy] = str(exc)
                continue
            mean_batch = 1.0
            if sizes:  # up to --max-batch decoding together, through the runtime's batcher
                served, mean_batch = serving.served_under_load(
                    sim, [(r.prompt_tokens, r.new_tokens) for r in reqs], [r.arrival_s for r in reqs], sizes[0],
                    schedule, args.prefill_chunk)
            else:  # one at a time, first come first served (``qos``)
                served = qos.serve(sim, reqs)
            results[policy] = {"summary": qos.summarize(served, _ms(args.slo_ttft_ms), _ms(args.slo_tpot_ms)),
                               "mean_batch": mean_batch, "requests": served}
        record.update(view="qos", arrival_rate=args.arrival_rate, max_batch=sizes[0] if sizes else 1,
                      prefill_schedule=schedule if sizes else None, results=results, skipped=skipped)
        _print_qos(results, skipped)
        return record
    for policy in policies:
        try:
            results[policy] = simulate(model, cal, replay, knobs.changed(policy=policy), prompt, gen,
                                       request_id=args.request, warmup=args.warmup, routing_trace=str(args.trace),
                                       policy_time=not args.no_policy_time, device_routing=args.device_routing)
        except BudgetError as exc:
            skipped[policy] = str(exc)
    if not results:
        raise BudgetError("no policy fits this budget: " + "; ".join(skipped.values()))
    timelines = {name: r.pop("timeline") for name, r in results.items()}
    if args.timeline_out:
        _write_timelines(timeline_paths(args.timeline_out, policies), timelines)
    record.update(view="replay", prompt_len=prompt, gen=gen, results=results, skipped=skipped)
    print(format_table(results, skipped))
    return record


def check_batch_view(args: argparse.Namespace, qos_mode: bool, sizes: list[int]) -> None:
    """``--max-batch`` and the schedule flags where they mean something, before anything is read."""
    if sizes and args.sweep:
        raise DuoServeError("--sweep estimates reference caches one request at a time; drop --max-batch, or "
                            "drop --sweep to simulate batches")
    if qos_mode and len(sizes) > 1:
        raise DuoServeError(f"with arrivals --max-batch takes one size (the most requests decoding together), "
                            f"got {args.max_batch}")
    if not sizes and (args.prefill_schedule or args.prefill_chunk):
        raise DuoServeError("--prefill-schedule and --prefill-chunk schedule a batch; add --max-batch N")


def _ms(value: float | None) -> float | None:
    return None if value is None else value / 1e3


def timeline_paths(path: str, policies: list[str]) -> dict[str, Path]:
    """``--timeline-out`` itself for one policy, ``NAME.POLICY.json`` beside it for several. Named from
    the policies asked for, not those that fit, so the files checked before the run are the ones written."""
    out = Path(path)
    if len(policies) == 1:
        return {policies[0]: out}
    return {name: out.with_name(f"{out.stem}.{name}{out.suffix or '.json'}") for name in policies}


def _write_timelines(paths: dict[str, Path], timelines: dict[str, list[dict]]) -> None:
    for name, rows in timelines.items():
        SimTimeline.from_rows(rows).write_chrome_trace(paths[name])


def _print_sweep(rows: list[dict], slots_at_budget: int) -> None:
    at = [r for r in rows if r["slots"] == slots_at_budget]
    print(f"reference caches at {slots_at_budget} slots (the budget); --json / --out for every slot count")
    print(f"{'policy':<14} {'budget %':>8} {'hit rate':>9} {'loads':>8} {'TPOT ms (overlapped..serial)':>30}")
    for r in at:
        print(f"{r['policy']:<14} {r['budget_pct']:>8.1f} {r['hit_rate']:>9.3f} {r['decode_loads']:>8} "
              f"{r['tpot_overlapped_s'] * 1e3:>14.2f} .. {r['tpot_serial_s'] * 1e3:<10.2f}")


def _print_qos(results: dict, skipped: dict) -> None:
    print(f"{'policy':<16} {'TTFT p50':>9} {'p90':>9} {'p99':>9} {'TPOT p50':>9} {'p90':>8} {'p99':>8} {'SLO met':>8} "
          f"{'mean batch':>10}")
    for name, r in results.items():
        s = r["summary"]
        t, p = s["ttft_s"], s["tpot_s"]
        print(f"{name:<16} " + " ".join(f"{v * 1e3:>9.1f}" for v in (t["p50"], t["p90"], t["p99"])) + " "
              + " ".join(f"{(v or 0) * 1e3:>8.2f}" for v in (p["p50"], p["p90"], p["p99"]))
              + f" {s['slo_attainment']:>8.2f} {r['mean_batch']:>10.2f}")
    for name, why in skipped.items():
        print(f"{name:<16} skipped: {why}")


if __name__ == "__main__":
    raise SystemExit(main())

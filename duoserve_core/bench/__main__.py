"""``python -m duoserve_core.bench``: the command line of the policy comparison (``duoserve_core.bench``)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from .. import bench  # noqa: F401  (its docstring is the --help text)
from ..atomic import atomic_write_bytes, atomic_write_json, check_writable
from ..errors import DuoServeError
from ..experts.formats import QUANT_CHOICES
from ..mixtral import ATTENTION_QUANT_CHOICES
from ..progress import Terminated, interruptible, print_line
from ..runtime import Runtime
from ..batching import DEFAULT_SCHEDULE
from ..knob_args import (Parser, add_device_arguments, add_graph_argument, add_knob_arguments, add_schedule_arguments, budget, devices_from_args,
                         knobs_from_args, listed, number, whole)
from ..traces import TraceMeta, TraceRecorder, write_trace
from . import (REPEATS, BenchSetup, arrival_rows, batch_rows, bench_record, compare_policies, default_out, device_label, format_batch_table, format_table, make_prompt,
               open_runtime, peer_comparison, sweep_rows, targets)



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m duoserve_core.bench", description=bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:mixtral-8x7b")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="nf4")
    p.add_argument("--quant-attention", choices=ATTENTION_QUANT_CHOICES, default="none")
    add_graph_argument(p)
    p.add_argument("--memory-budget", type=budget, default="15%")
    p.add_argument("--prompt-len", type=whole(1), default=512)
    p.add_argument("--gen", type=whole(1), default=128)
    p.add_argument("--policies", default="duoserve,uniform,on-demand,lru-speculative,resident")
    add_knob_arguments(p)
    p.add_argument("--routing-trace", default=None)
    p.add_argument("--num-layers", type=whole(1), default=None)
    add_device_arguments(p)
    p.add_argument("--repeats", type=whole(1), default=REPEATS)
    p.add_argument("--peer", default=None, help="a benchmarks/accelerate_peer.py result: duoserve's speed-up over it")
    p.add_argument("--timelines", default=None,
                   help="folder for each policy's timeline (Parquet); with --max-batch or --arrival-rate, each row's")
    p.add_argument("--record-trace", default=None, help="write the routing the runs took (a trace) here")
    p.add_argument("--max-batch", type=listed(whole(1)), default=None,
                   help="batch sizes, e.g. 1,4,16,64: throughput and latency percentiles per policy, B requests "
                        "decoded together (the budget adds the KV caches of the other B - 1); with --arrival-rate, "
                        "one size: the most requests decoding together")
    p.add_argument("--arrival-rate", type=listed(number(0.0, above=True)), default=None,
                   help="arrival rates per second, e.g. 0.5,1,2: --requests requests arriving as a seeded Poisson "
                        "process, replayed in real time; percentiles and SLO attainment per rate and policy")
    p.add_argument("--requests", type=whole(1), default=None, help="with --arrival-rate: requests per rate (default 16)")
    p.add_argument("--duration", type=number(0.0, above=True), default=None,
                   help="with --arrival-rate: the requests arriving within this many seconds, instead of --requests")
    add_schedule_arguments(p, many=True, default=None, default_note=(
        f"; default: prefill-first with --max-batch (every decode step then holds B requests, the throughput "
        f"the sweep is about), {DEFAULT_SCHEDULE} with --arrival-rate"))
    p.add_argument("--slo-ttft-ms", type=number(0.0, above=True), default=None)
    p.add_argument("--slo-tpot-ms", type=number(0.0, above=True), default=None)
    sweep = p.add_argument_group("sweep (--sweep): each list is swept with the other knobs at their defaults")
    sweep.add_argument("--sweep", action="store_true", help="sweep prompt lengths, budgets, depth and threshold")
    sweep.add_argument("--prompt-lens", type=listed(whole(1)), default="128,256,512,1024,2048")
    sweep.add_argument("--budgets", type=listed(budget), default="2slots,8slots,15%,30%,50%,all",
                       help="budgets as bytes, %% of the model, Nslots (fixed memory + N experts) or all")
    sweep.add_argument("--depths", type=listed(whole(1, "a whole number of layers")), default="1,2,3")
    sweep.add_argument("--thresholds", type=listed(number(0.0, 1.0)), default="0.2,0.4,0.6,0.8")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/bench_<device>_<date>.json)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--force", action="store_true", help="replace --out, --timelines files or --record-trace if they exist")
    return p.parse_args(argv)


def setup_of(args: argparse.Namespace) -> BenchSetup:
    return BenchSetup(model=args.model, quant=args.quant, attention_quant=args.quant_attention,
                      num_layers=args.num_layers, routing_trace=args.routing_trace, cuda_graphs=args.cuda_graphs,
                      device_routing=args.device_routing, cpu_split=args.cpu_split,
                      **devices_from_args(args))


def command(argv: list[str] | None) -> str:
    return "python -m duoserve_core.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stdout = sys.stdout

    def work() -> int:
        try:
            # --json: the record alone on stdout; the table, progress and "wrote" lines go to stderr
            with contextlib.redirect_stdout(sys.stderr if args.json else stdout):
                mode = sweep if args.sweep else under_load if args.arrival_rate else batches if args.max_batch else compare
                return mode(args, argv, stdout)
        except DuoServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return interruptible(work)


def output_path(args: argparse.Namespace, kind: str) -> Path:
    """``--out``, or the default named after the device and today's date (the one the result is written to)."""
    return Path(args.out) if args.out else default_out(device_label(**devices_from_args(args)), kind)


def timeline_paths(folder: str | None, stem: str, policies: list[str]) -> dict[str, Path]:
    """Where ``--timelines`` puts each policy's timeline: ``FOLDER/<--out stem>_<policy>.parquet``."""
    return {name: Path(folder) / f"{stem}_{name}.parquet" for name in policies} if folder else {}


def compare(args: argparse.Namespace, argv: list[str] | None, stdout=sys.stdout) -> int:
    """Every policy at one budget and prompt: the table of the issue, with the bounds."""
    if args.peer and not Path(args.peer).is_file():  # before minutes of measuring, not after
        raise DuoServeError(f"--peer {args.peer} does not exist; run benchmarks/accelerate_peer.py --out {args.peer}")
    if args.peer:
        try:
            json.loads(Path(args.peer).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DuoServeError(f"--peer {args.peer} is not a JSON result of benchmarks/accelerate_peer.py "
                                f"({exc})") from exc
    out = check_writable(output_path(args, "bench"), args.force, "--out")  # every output before the model loads
    timelines_at = timeline_paths(args.timelines, out.stem, args.policies.split(","))
    for path in timelines_at.values():
        check_writable(path, args.force, "--timelines")
    if args.record_trace:
        check_writable(args.record_trace, args.force, "--record-trace")
    knobs = knobs_from_args(args)  # bad knobs fail before the model loads
    runtime = open_runtime(setup_of(args), args.memory_budget, args.prompt_len + args.gen)
    recorder = TraceRecorder() if args.record_trace else None
    results, skipped = compare_policies(runtime, knobs, args.policies.split(","), make_prompt(args.prompt_len),
                                        args.gen, memory_budget=args.memory_budget, repeats=args.repeats,
                                        recorder=recorder, quiet=args.json)
    if not results:
        print("error: no policy fits this budget: " + "; ".join(skipped.values()), file=sys.stderr)
        return 2
    timelines = {name: r.pop("timeline") for name, r in results.items()}
    record = bench_record(next(iter(results.values()))["device"], command(argv), results, runtime.cuda_graphs)
    record["skipped"] = skipped
    if args.peer:
        record["peer"] = peer_comparison(args.peer, args.prompt_len, args.gen, results.get("duoserve"))
    if "duoserve" in results:
        record["targets"] = targets(record)
    atomic_write_json(out, record)
    _write_timelines(timelines_at, timelines)
    _write_trace(args.record_trace, runtime, recorder, args.force)
    print(format_table(results, skipped))
    if "peer" in record:
        peer = record["peer"]
        print(f"{'accelerate peer':<16} {peer['ttft_s'] * 1e3:>9.1f} {'':>7} {peer['tpot_s'] * 1e3:>9.2f} {'':>8} "
              f"{peer['e2e_s']:>7.2f}   ({peer['note']}; duoserve {peer.get('duoserve_speedup_e2e', 0):.1f}x faster)")
    if args.json:
        print(json.dumps(record), file=stdout)
    print(f"wrote {out}")
    return 0


def sweep(args: argparse.Namespace, argv: list[str] | None, stdout=sys.stdout) -> int:
    """Prompt lengths, then budgets, then depth x threshold, on one loaded runtime."""
    lens = [int(x) for x in args.prompt_lens.split(",")]
    out = check_writable(output_path(args, "sweep"), args.force, "--out")  # before the model loads
    knobs = knobs_from_args(args)
    runtime = open_runtime(setup_of(args), args.memory_budget, max(lens + [args.prompt_len]) + args.gen)
    rows = sweep_rows(runtime, knobs, args.policies.split(","), args.gen, prompt_len=args.prompt_len,
                      prompt_lens=lens, memory_budget=args.memory_budget, budgets=args.budgets.split(","),
                      depths=[int(x) for x in args.depths.split(",")],
                      thresholds=[float(x) for x in args.thresholds.split(",")], repeats=args.repeats,
                      progress=print_line, quiet=args.json)
    record = bench_record(device_label(**devices_from_args(args)), command(argv), {}, runtime.cuda_graphs)
    record.pop("results")
    record["rows"] = rows
    atomic_write_json(out, record)
    if args.json:
        print(json.dumps(record), file=stdout)
    print(f"wrote {out}")
    return 0


def batches(args: argparse.Namespace, argv: list[str] | None, stdout=sys.stdout) -> int:
    """Throughput against batch size, per policy (``bench.batch_rows``)."""
    out = check_writable(output_path(args, "batch"), args.force, "--out")  # before the model loads
    sizes, schedules = [int(b) for b in args.max_batch.split(",")], (args.prefill_schedule or "prefill-first").split(",")
    timelines = row_timelines(args, out, [{"max_batch": b, "prefill_schedule": s} for b in sizes for s in schedules])
    knobs = knobs_from_args(args)
    runtime = open_runtime(setup_of(args), args.memory_budget, args.prompt_len + args.gen)
    record = rows_record(args, argv, runtime)
    with partial_rows(out, record, timelines) as on_row:
        record["rows"] = batch_rows(
            runtime, knobs, args.policies.split(","), sizes, args.prompt_len, args.gen,
            memory_budget=args.memory_budget, repeats=args.repeats, quiet=args.json, schedules=tuple(schedules),
            prefill_chunk=args.prefill_chunk, keep_timelines=timelines is not None, on_row=on_row)
        atomic_write_json(out, record)
    rows = record["rows"]
    print(format_batch_table(rows))
    if args.json:
        print(json.dumps(record), file=stdout)
    print(f"wrote {out}")
    return 0


def under_load(args: argparse.Namespace, argv: list[str] | None, stdout=sys.stdout) -> int:
    """Latency percentiles and SLO attainment under Poisson arrivals (``bench.arrival_rows``)."""
    sizes = [int(b) for b in (args.max_batch or "8").split(",")]
    if args.requests and args.duration:
        raise DuoServeError("--requests and --duration both say how many requests arrive; give one")
    if len(sizes) != 1:
        raise DuoServeError("--arrival-rate takes one --max-batch (the most requests decoding together), "
                            f"got {args.max_batch}")
    out = check_writable(output_path(args, "load"), args.force, "--out")  # before the model loads
    rates, schedules = [float(r) for r in args.arrival_rate.split(",")], (args.prefill_schedule or DEFAULT_SCHEDULE).split(",")
    timelines = row_timelines(args, out, [{"arrival_rate": r, "prefill_schedule": s} for r in rates for s in schedules])
    knobs = knobs_from_args(args)
    runtime = open_runtime(setup_of(args), args.memory_budget, args.prompt_len + args.gen)
    record = rows_record(args, argv, runtime)
    with partial_rows(out, record, timelines) as on_row:
        record["rows"] = arrival_rows(
            runtime, knobs, args.policies.split(","), rates, None if args.duration else args.requests or 16,
            args.prompt_len, args.gen, max_batch=sizes[0], memory_budget=args.memory_budget,
            duration_s=args.duration, slo_ttft_s=args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None,
            slo_tpot_s=args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None, quiet=args.json,
            schedules=tuple(schedules), prefill_chunk=args.prefill_chunk, keep_timelines=timelines is not None,
            on_row=on_row)
        atomic_write_json(out, record)
    rows = record["rows"]
    for r in rows:
        if "skipped" in r:
            print(f"rate {r['arrival_rate']:g}/s {r['policy']:<16} skipped: {r['skipped']}")
            continue
        tpot = r["tpot_s"]
        print(f"rate {r['arrival_rate']:g}/s {r['policy']:<16} {r['prefill_schedule']:<14} TTFT p50/p99 {r['ttft_s']['p50'] * 1e3:.1f}/"
              f"{r['ttft_s']['p99'] * 1e3:.1f} ms  TPOT p50/p99 "
              + ("-" if tpot["p50"] is None else f"{tpot['p50'] * 1e3:.1f}/{tpot['p99'] * 1e3:.1f} ms")
              + f"  SLO {r['slo_attainment']:.0%}  mean batch {r['mean_batch']:.2f}")
    if args.json:
        print(json.dumps(record), file=stdout)
    print(f"wrote {out}")
    return 0


def rows_record(args: argparse.Namespace, argv: list[str] | None, runtime: Runtime) -> dict:
    """The record of a batch or arrivals run (device, date, command, graphs), its ``rows`` still to come."""
    record = bench_record(device_label(**devices_from_args(args)), command(argv), {}, runtime.cuda_graphs)
    record.pop("results")
    return record


def partial_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def row_name(row: dict) -> str:
    """A batch or arrival row's part of its timeline's file name: ``b16_mixed``, ``r0.5_mixed``."""
    schedule = row.get("prefill_schedule", "prefill-first").split(",")[0]  # "mixed, chunks of N" is mixed
    which = f"b{row['max_batch']}" if "arrival_rate" not in row else f"r{row['arrival_rate']:g}"
    return f"{which}_{schedule}"


def row_timelines(args: argparse.Namespace, out: Path, rows: list[dict]) -> Callable[[dict], Path] | None:
    """With ``--timelines DIR``: where each row's timeline goes (``DIR/<--out stem>_<policy>_<row_name>.parquet``),
    that of every row to come (``rows``, each policy's) checked writable before the model loads; else None."""
    if not args.timelines:
        return None

    def path(row: dict) -> Path:
        return Path(args.timelines) / f"{out.stem}_{row['policy']}_{row_name(row)}.parquet"
    for policy in args.policies.split(","):
        for row in rows:
            check_writable(path({**row, "policy": policy}), args.force, "--timelines")
    return path


@contextlib.contextmanager
def partial_rows(out: Path, record: dict, timeline_path: Callable[[dict], Path] | None = None):
    """Yield ``on_row``, which writes the rows measured so far beside ``out`` (``NAME.partial.json``,
    ``"partial": true``, atomically) after each one. Why: a batch sweep or an arrivals run takes minutes
    per row, and the GPU runs live under a wall-clock limit (``timeout``'s SIGTERM); a run stopped by it
    keeps the rows it finished, and says so. The file goes once ``out`` is written, on an error and on
    Ctrl-C (which writes nothing). ``timeline_path``: where a row's ``timeline`` goes (``row_timelines``); it is
    written as its row finishes and taken out of the row, kept or removed with the rows."""
    path = partial_path(out)
    done: list[int] = []
    written: list[Path] = []

    def on_row(rows: list[dict]) -> None:
        row = rows[-1]
        if "timeline" in row:
            written.append(timeline_path(row))
            _write_timelines({"row": written[-1]}, {"row": row.pop("timeline")})
        atomic_write_json(path, {**record, "partial": True, "rows": rows})
        done[:] = [len(rows)]

    try:
        yield on_row
    except BaseException as exc:
        if isinstance(exc, Terminated) and done:
            exc.written = f"the {done[0]} finished rows kept in {path}" + (" with their timelines" if written else "")
        else:
            for finished in [path, *written]:
                finished.unlink(missing_ok=True)
        raise
    path.unlink(missing_ok=True)


def _write_timelines(paths: dict[str, Path], timelines: dict[str, list[dict]]) -> None:
    """Each measured policy's timeline to its path of :func:`timeline_paths` (skipped policies have none)."""
    if not paths:
        return
    import pandas as pd

    from ..timeline import COLUMNS

    for name, rows in timelines.items():
        buf = io.BytesIO()
        pd.DataFrame(rows, columns=COLUMNS).to_parquet(buf, index=False)
        atomic_write_bytes(paths[name], buf.getvalue())


def _write_trace(path: str | None, runtime, recorder: TraceRecorder | None, force: bool) -> None:
    """The routing of the first measured policy's warm-up run: every policy's (tokens never change).
    ``compare`` checked the path before measuring; ``force`` again here, so a file that appeared since is kept."""
    if not path or recorder is None:
        return
    c = runtime.config
    meta = TraceMeta(runtime.source.name, c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok)
    write_trace(path, recorder.dataframe(), meta, overwrite=force)


if __name__ == "__main__":
    raise SystemExit(main())

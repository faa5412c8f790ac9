"""Where each run's decode steps spent their time, one line per run, from bench result files.

    python benchmarks/step_split_table.py benchmarks/results/gap_h200_*.json
    python benchmarks/step_split_table.py --runs benchmarks/results/bench_h200_*_follow.json

Reads the ``decode_split`` every bench run records (``timeline.step_split``): a plain ``bench`` file gives
one line per policy (``generate``, one request), a ``--max-batch`` or ``--arrival-rate`` file one per
row. Per decode step: its mean time, the copies, the copy and compute streams' busy time (the latter also by
kind: attention, router, experts), the rest of the step, which the copy stream spent idle (host work,
syncs, waits on compute), the CPU lane's busy time and time per expert where the run used it, the longest
step and the time a step lost to stalls (beyond twice the median step; ``timeline.step_split``). Why: the
simulator matched duoserve's single-request decode on the H200 within 0.6% but its batched decode steps only
within 7-20%, with the same copies; this says which of the three the GPU spent the difference on. And the
CPU lane's experts took 2.9 ms each through ``generate`` and 4.8 ms through the batched loop at batch 1 on the
H200 (2026-12-02, the same decisions): the per-expert column of the ``gap`` stage's two files says it again.
``--runs``: every measured run of a plain bench file (``repeats_decode_split``, fastest first), with its
E2E, lane time per expert, longest step, stall and longest garbage collection, since a lane run's E2E spread up to 1.28x over three
where the median alone hides whether a slow run was slow throughout or stalled once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def lines(path: Path) -> list[dict]:
    """One entry per run in a bench result file: its label and its decode step's parts (seconds)."""
    record = json.loads(path.read_text())
    out = []
    for name, r in (record.get("results") or {}).items():
        split = r.get("decode_split")
        if split and r.get("tpot_s"):
            out.append({"file": path.name, "run": f"{name}, generate", "step_s": r["tpot_s"], **split,
                        "lane_experts_per_step": r.get("host_computes", 0) / max(len(r.get("tokens") or [0, 0]) - 1, 1)})
    for r in record.get("rows") or []:
        split = r.get("decode_split")
        if not split or not r.get("decode_steps"):
            continue
        where = f"B {r['max_batch']}" if "arrival_rate" not in r else f"{r['arrival_rate']:g}/s"
        out.append({"file": path.name, "run": f"{r['policy']}, {where}", "step_s": r["decode_s"] / r["decode_steps"],
                    **split, "lane_experts_per_step": r.get("host_computes", 0) / r["decode_steps"]})
    return out


def ms(e: dict, key: str) -> str:
    """``e[key]`` seconds in ms; '-' where a file from before that figure lacks it."""
    return "-" if e.get(key) is None else f"{e[key] * 1e3:.1f}"


def run_lines(path: Path) -> list[dict]:
    """One entry per measured run of each policy in a plain bench file (fastest first): its E2E and split."""
    out = []
    for name, r in (json.loads(path.read_text()).get("results") or {}).items():
        repeats = list(zip(r.get("repeats_e2e_s") or [], r.get("repeats_decode_split") or []))
        pauses = r.get("repeats_gc_longest_pause_s") or [None] * len(repeats)  # files before 2026-12-02's sixth runs lack it
        out += [{"file": path.name, "run": f"{name}, run {i + 1} of {len(repeats)}", "e2e_s": e2e, **split,
                 "gc_longest_pause_s": pause} for i, ((e2e, split), pause) in enumerate(zip(repeats, pauses))]
    return out


def runs_table(entries: list[dict]) -> str:
    rows = ["| file | run (fastest first) | E2E s | lane ms per expert | longest step ms | stall ms a step "
            "| longest GC ms |", "|---|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {e['file']} | {e['run']} | {e['e2e_s']:.2f} | {lane_per_expert(e)} | {e['longest_step_s'] * 1e3:.1f} "
             f"| {e['stall_s'] * 1e3:.1f} | {ms(e, 'gc_longest_pause_s')} |" for e in entries]
    return "\n".join(rows)


def table(entries: list[dict]) -> str:
    rows = ["| file | run | step ms | copies | copy busy ms | compute busy ms | attention ms | router ms "
            "| experts ms | copy stream idle ms | CPU lane busy ms | lane ms per expert | longest step ms | stall ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    for e in entries:
        rows.append(f"| {e['file']} | {e['run']} | {e['step_s'] * 1e3:.1f} | {e['copies_per_step']:.1f} "
                    f"| {e['copy_busy_s'] * 1e3:.1f} | {e['compute_busy_s'] * 1e3:.1f} | {ms(e, 'attention_busy_s')} "
                    f"| {ms(e, 'router_busy_s')} | {ms(e, 'expert_busy_s')} "
                    f"| {(e['step_s'] - e['copy_busy_s']) * 1e3:.1f} | {ms(e, 'cpu_busy_s')} | {lane_per_expert(e)} "
                    f"| {ms(e, 'longest_step_s')} | {ms(e, 'stall_s')} |")
    return "\n".join(rows)


def lane_per_expert(e: dict) -> str:
    """The lane's busy time a step over its jobs a step, both from the decode's timeline; files from
    before the split counted the jobs (``cpu_jobs_per_step``) divide by the run's lane experts a step
    instead (the prompt's counted in too: a small error, as ``auto`` gives prompt experts to the lane
    rarely); '-' without the lane."""
    experts = e.get("cpu_jobs_per_step") or e.get("lane_experts_per_step") or 0
    return f"{e['cpu_busy_s'] / experts * 1e3:.2f}" if experts and e.get("cpu_busy_s") else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="bench result JSON files")
    p.add_argument("--runs", action="store_true", help="every measured run of a plain bench file, not each median")
    args = p.parse_args(argv)
    entries = []
    for path in args.files:
        try:
            entries += run_lines(path) if args.runs else lines(path)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {path} is not a bench result with decode_split ({exc})", file=sys.stderr)
            return 2
    if not entries:
        what = ("every run's split (repeats_decode_split: bench results of 2026-12-02 or later)" if args.runs
                else "a decode_split (bench results of 2026-12-01 or later have it)")
        print(f"error: none of the files has {what}", file=sys.stderr)
        return 2
    print(runs_table(entries) if args.runs else table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())

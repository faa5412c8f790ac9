"""Policies side by side in one process, each against the bounds of its own run.

    python -m duoserve_core.bench --model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 \\
        --memory-budget 15% --prompt-len 512 --gen 128 \\
        --policies duoserve,uniform,on-demand,lru-speculative,resident --json

For every policy: TTFT, TPOT, E2E, peak GPU memory, bytes moved, hit rate, prefetch accuracy, and
three bounds computed from the run itself:

- transfer floor: the bytes of the experts the prefill uses (none is resident at the start),
  over the H2D bandwidth the run's own copies achieved;
- compute floor: the compute stream's busy time (attention, routers, experts), per phase;
- oracle (decode): Belady's loads over the routing the run took, at the same number of slots,
  every copy overlapped: max(oracle bytes / bandwidth, decode compute) per token.

Belady's count is a lower bound on copies for the whole run (prefill + decode), not for decode
alone: a policy that loads experts during prefill which the prompt never routes to (the prefill
window loads layers whole) can carry them into decode and copy fewer there than Belady's decode
loads. ``oracle_total_loads`` is the whole run's bound; ``oracle_decode_loads`` times the decode.

TTFT is compared with max(transfer floor, prefill compute floor), TPOT with the oracle bound.
A policy that does not fit the budget (``resident``, usually) is reported as skipped. Results go
to ``benchmarks/results/bench_<device>_<date>.json`` with the device, date and command;
``--peer`` adds the accelerate peer's figures (``benchmarks/accelerate_peer.py``) and duoserve's
speed-up over it, ``--timelines DIR`` each policy's timeline, ``--record-trace`` the routing taken.

The model is loaded once; each policy, budget and knob setting is applied with
``Runtime.configure``. The sweep, the second command of the issue:

    python -m duoserve_core.bench --sweep ... --prompt-lens 128,512,2048 --budgets 2slots,15%,all \
        --depths 1,2,3 --thresholds 0.2,0.5,0.8

writes ``benchmarks/results/sweep_<device>_<date>.json``, one row per measurement.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import re
import shlex
import sys
from pathlib import Path

import torch

from .engine import load
from .errors import BudgetError, DuoServeError
from .io import atomic_write_bytes, atomic_write_json
from .oracle import belady_loads, expert_groups
from .traces import TraceMeta, TraceRecorder, write_trace
from .units import format_bytes

REPEATS = 3


def bounds(rows: list[dict], num_slots: int, expert_bytes: int, decode_tokens: int) -> dict:
    """The three bounds of one run, from its timeline rows (times in seconds)."""
    copies = [r for r in rows if r["kind"] == "h2d"]
    copy_s = sum(r["duration_ms"] for r in copies) / 1e3
    bandwidth = sum(r["nbytes"] for r in copies) / copy_s if copy_s > 0 else None
    compute = {phase: sum(r["duration_ms"] for r in rows if r["stream"] == "compute" and r["phase"] == phase) / 1e3
               for phase in ("prefill", "decode")}
    prefill_experts = {(r["layer"], r["expert"]) for r in rows if r["kind"] == "expert" and r["phase"] == "prefill"}
    # Prefill experts are computed one after another, so each is its own step; decode pins a layer's set.
    prefill_steps = [{key} for key in sorted(prefill_experts)]
    decode_steps = expert_groups(rows, "decode")
    oracle_loads = belady_loads(prefill_steps + decode_steps, num_slots, count_from=len(prefill_steps))
    out = {"h2d_bandwidth_Bps": bandwidth, "compute_prefill_s": compute["prefill"],
           "compute_decode_s": compute["decode"], "oracle_decode_loads": oracle_loads,
           # each prefill expert is used once: Belady loads each once, then the decode loads above
           "oracle_total_loads": len(prefill_steps) + oracle_loads}
    if bandwidth:
        out["transfer_floor_s"] = len(prefill_experts) * expert_bytes / bandwidth
        out["ttft_floor_s"] = max(out["transfer_floor_s"], compute["prefill"])
        if decode_tokens:
            out["oracle_tpot_s"] = max(oracle_loads * expert_bytes / bandwidth, compute["decode"]) / decode_tokens
    return out


def open_runtime(args: argparse.Namespace, max_context: int):
    """One runtime for every configuration of a command: ``configure`` swaps budget and policy."""
    return load(args.model, device=args.device, quant=args.quant, attention_quant=args.quant_attention,
                memory_budget=args.memory_budget, policy="on-demand", num_layers=args.num_layers,
                max_context=max_context, routing_trace=args.routing_trace)


def run_policy(runtime, args: argparse.Namespace, policy: str, prompt_ids: list[int], *, gen: int | None = None,
               memory_budget=None, prefetch_depth: int | None = None, predictor_threshold: float | None = None,
               recorder=None) -> dict:
    """Configure ``runtime`` for ``policy`` and measure it: one warm-up, then the median of the repeats."""
    gen = gen or args.gen
    predicts = policy in ("duoserve", "uniform")
    runtime.configure(policy=policy, memory_budget=memory_budget or args.memory_budget,
                      predictor=args.predictor if predicts else None,
                      prefetch_depth=prefetch_depth or args.prefetch_depth,
                      predictor_threshold=predictor_threshold if predictor_threshold is not None
                      else args.predictor_threshold,
                      speculative_gate=args.speculative_gate and predicts)
    prompt_ids = [t % runtime.config.vocab_size for t in prompt_ids]
    runs = []
    for attempt in range(args.repeats + 1):  # the first run warms kernels, the allocator and the clocks
        if policy != "resident":
            empty_cache(runtime)
        result = runtime.generate(prompt_ids=prompt_ids, max_new_tokens=gen, stop_at_eos=False,
                                  recorder=recorder if attempt == 0 else None)
        runs.append((result, runtime.timeline.rows()))
    runs = sorted(runs[1:], key=lambda r: r[0].e2e_s)
    result, rows = runs[len(runs) // 2]
    plan = runtime.plan
    b = bounds(rows, plan.num_slots, plan.expert_bytes, len(result.tokens) - 1)
    uses = result.expert_hits + result.expert_misses
    decode = result.phases["decode"]
    decode_uses = decode["hits"] + decode["misses"]
    out = {**result.as_dict(), "runtime": runtime.describe(), "bounds": b,
           "hit_rate": result.expert_hits / uses if uses else None,
           "prefetch_precision": decode["prefetch_hits"] / decode["prefetches"] if decode["prefetches"] else None,
           "prefetch_recall": decode["prefetch_hits"] / decode_uses if decode_uses else None,
           "within_budget": None if result.peak_gpu_bytes is None else result.peak_gpu_bytes <= plan.budget_bytes,
           "repeats_e2e_s": [r.e2e_s for r, _ in runs], "timeline": rows}
    if "ttft_floor_s" in b:
        out["ttft_over_floor"] = result.ttft_s / b["ttft_floor_s"]
    if "oracle_tpot_s" in b and result.tpot_s:
        out["tpot_over_oracle"] = result.tpot_s / b["oracle_tpot_s"]
    return out


def empty_cache(runtime) -> None:
    """Start a measured request with no expert on the device, as the transfer floor assumes.

    Without this the warm-up would leave the cache full for the measured run. ``resident`` keeps
    its experts: its steady state is the compute reference.
    """
    runtime.empty_expert_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m duoserve_core.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:mixtral-8x7b")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--quant-attention", default="none")
    p.add_argument("--memory-budget", default="15%")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--policies", default="duoserve,uniform,on-demand,lru-speculative,resident")
    p.add_argument("--predictor", default=None)
    p.add_argument("--prefetch-depth", type=int, default=2)
    p.add_argument("--predictor-threshold", type=float, default=0.3)
    p.add_argument("--speculative-gate", action="store_true")
    p.add_argument("--routing-trace", default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--peer", default=None, help="a benchmarks/accelerate_peer.py result: duoserve's speed-up over it")
    p.add_argument("--timelines", default=None, help="folder for each policy's timeline (Parquet)")
    p.add_argument("--record-trace", default=None, help="write the routing the runs took (a trace) here")
    sweep = p.add_argument_group("sweep (--sweep): each list is swept with the other knobs at their defaults")
    sweep.add_argument("--sweep", action="store_true", help="sweep prompt lengths, budgets, depth and threshold")
    sweep.add_argument("--prompt-lens", default="128,256,512,1024,2048")
    sweep.add_argument("--budgets", default="2slots,8slots,15%,30%,50%,all",
                       help="budgets as bytes, %% of the model, Nslots (fixed memory + N experts) or all")
    sweep.add_argument("--depths", default="1,2,3")
    sweep.add_argument("--thresholds", default="0.2,0.4,0.6,0.8")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/bench_<device>_<date>.json)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return (sweep if args.sweep else compare)(args, argv)
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def make_prompt(length: int) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(0)).tolist()


def compare(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Every policy at one budget and prompt: the table of the issue, with the bounds."""
    if args.peer and not Path(args.peer).is_file():  # before minutes of measuring, not after
        raise DuoServeError(f"--peer {args.peer} does not exist; run benchmarks/accelerate_peer.py --out {args.peer}")
    runtime = open_runtime(args, args.prompt_len + args.gen)
    prompt = make_prompt(args.prompt_len)
    recorder = TraceRecorder() if args.record_trace else None
    results, skipped = {}, {}
    for policy in args.policies.split(","):
        try:
            results[policy] = run_policy(runtime, args, policy, prompt,
                                         recorder=recorder if len(results) == 0 else None)
        except BudgetError as exc:
            skipped[policy] = str(exc)
    if not results:
        print("error: no policy fits this budget: " + "; ".join(skipped.values()), file=sys.stderr)
        return 2
    timelines = {name: r.pop("timeline") for name, r in results.items()}
    if "duoserve" in results:
        mine = results["duoserve"]["e2e_s"]
        for name, r in results.items():
            r["duoserve_speedup_e2e"] = r["e2e_s"] / mine
    record = _record(args, argv, results)
    record["skipped"] = skipped
    if args.peer:
        record["peer"] = peer_comparison(args.peer, args.prompt_len, args.gen, results.get("duoserve"))
    if "duoserve" in results:
        record["targets"] = targets(record)
    out = _out_path(args, record, "bench")
    atomic_write_json(out, record)
    _write_timelines(args.timelines, out.stem, timelines)
    _write_trace(args.record_trace, runtime, recorder)
    _print_table(results, skipped)
    if "peer" in record:
        peer = record["peer"]
        print(f"{'accelerate peer':<16} {peer['ttft_s'] * 1e3:>9.1f} {'':>7} {peer['tpot_s'] * 1e3:>9.2f} {'':>8} "
              f"{peer['e2e_s']:>7.2f}   ({peer['note']}; duoserve {peer.get('duoserve_speedup_e2e', 0):.1f}x faster)")
    if args.json:
        print(json.dumps(record))
    print(f"wrote {out}")
    return 0


def sweep(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Prompt lengths, then budgets, then depth x threshold, on one loaded runtime."""
    lens = [int(x) for x in args.prompt_lens.split(",")]
    runtime = open_runtime(args, max(lens + [args.prompt_len]) + args.gen)
    policies = [p for p in args.policies.split(",") if p != "resident"]
    rows = []

    def measure(sweep_name: str, policy: str, prompt_len: int, **knobs) -> None:
        try:
            r = run_policy(runtime, args, policy, make_prompt(prompt_len), **knobs)
        except BudgetError as exc:
            rows.append({"sweep": sweep_name, "policy": policy, "prompt_len": prompt_len, "skipped": str(exc)})
            return
        r.pop("timeline")
        rows.append({"sweep": sweep_name, "policy": policy, "prompt_len": prompt_len, **_summary(r)})
        last = rows[-1]
        print(f"{sweep_name:<10} {policy:<16} prompt {prompt_len:>5}  slots {last['slots']:>4}  "
              f"depth {last['prefetch_depth'] or '-'}  thr {last['predictor_threshold'] or '-'}  "
              f"TTFT {last['ttft_s'] * 1e3:8.1f} ms ({last['ttft_over_floor'] or 0:.2f}x floor)  "
              f"TPOT {(last['tpot_s'] or 0) * 1e3:7.2f} ms ({last['tpot_over_oracle'] or 0:.2f}x oracle)", flush=True)

    for n in lens:
        for policy in policies:
            measure("prompt", policy, n)
    for budget in args.budgets.split(","):
        for policy in policies + (["resident"] if budget == "all" else []):
            measure("budget", policy, args.prompt_len, memory_budget=budget)
    for depth in (int(x) for x in args.depths.split(",")):
        for threshold in (float(x) for x in args.thresholds.split(",")):
            measure("knobs", "duoserve", args.prompt_len, prefetch_depth=depth, predictor_threshold=threshold)
    record = _record(args, argv, {})
    record.pop("results")
    record["rows"] = rows
    out = _out_path(args, record, "sweep")
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


def _summary(r: dict) -> dict:
    rt = r["runtime"]
    return {"slots": rt["memory_plan"]["num_slots"], "budget_bytes": rt["memory_plan"]["budget_bytes"],
            "prefetch_depth": rt.get("prefetch_depth"), "predictor_threshold": rt.get("predictor_threshold"),
            "speculative_gate": rt.get("speculative_gate"), "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"],
            "e2e_s": r["e2e_s"], "peak_gpu_bytes": r["peak_gpu_bytes"], "within_budget": r["within_budget"],
            "h2d_bytes": r["h2d_bytes"], "hit_rate": r["hit_rate"], "prefetch_precision": r["prefetch_precision"],
            "prefetch_recall": r["prefetch_recall"], "ttft_floor_s": r["bounds"].get("ttft_floor_s"),
            "oracle_tpot_s": r["bounds"].get("oracle_tpot_s"), "ttft_over_floor": r.get("ttft_over_floor"),
            "tpot_over_oracle": r.get("tpot_over_oracle"), "decode": r["phases"]["decode"]}


# The schedulers issue's targets for duoserve: ratio ceilings, and "fastest end to end".
TARGETS = {"ttft_over_floor": 1.10, "tpot_over_oracle": 1.15}


def targets(record: dict, mine: str = "duoserve") -> dict:
    """Each target for ``mine`` in a bench record: the figure, the limit, met or not, and for decode
    where the time goes (copies per token against Belady's, and the copying's share of a token)."""
    r, results = record["results"][mine], record["results"]
    b, plan = r["bounds"], r["runtime"]["memory_plan"]
    out = {"peak_within_budget": {"peak_bytes": r["peak_gpu_bytes"], "budget_bytes": plan["budget_bytes"],
                                  "met": r["within_budget"]}}
    for key, limit in TARGETS.items():
        value = r.get(key)
        out[key] = {"value": value, "limit": limit, "met": None if value is None else value <= limit}
    others = {name: x["e2e_s"] for name, x in results.items() if name != mine}
    out["fastest_e2e"] = {"e2e_s": r["e2e_s"], "others_e2e_s": others, "met": all(r["e2e_s"] < v for v in others.values())}
    if record.get("peer"):
        out["fastest_e2e"]["peer_speedup"] = record["peer"].get("duoserve_speedup_e2e")
    decode_tokens = len(r["tokens"]) - 1
    if decode_tokens and b.get("h2d_bandwidth_Bps"):
        copies = r["phases"]["decode"]["h2d_copies"] / decode_tokens
        oracle = b["oracle_decode_loads"] / decode_tokens
        copy_s = copies * plan["expert_bytes"] / b["h2d_bandwidth_Bps"]
        out["decode_time"] = {"copies_per_token": copies, "oracle_copies_per_token": oracle,
                              "copies_over_oracle": copies / oracle if oracle else None,
                              "copy_s_per_token": copy_s, "tpot_s": r["tpot_s"],
                              "tpot_over_copy_time": r["tpot_s"] / copy_s if copy_s else None}
    return out


def peer_comparison(path: str, prompt_len: int, gen: int, duoserve: dict | None) -> dict:
    """The accelerate peer's E2E for this prompt and generation length, from its own result file."""
    peer = json.loads(Path(path).read_text())
    ttft, tpot = peer["ttft_s_scaled_to_full_depth"], peer["tpot_s_scaled_to_full_depth"]
    out = {"file": str(path), "device": peer["device"], "date": peer["date"], "ttft_s": ttft, "tpot_s": tpot,
           "e2e_s": ttft + (gen - 1) * tpot, "note": peer["scaling_note"], "prompt_len": peer["prompt_len"]}
    if peer["prompt_len"] != prompt_len:
        out["note"] += f"; the peer's prompt had {peer['prompt_len']} tokens, not {prompt_len}"
    if duoserve is not None:
        out["duoserve_speedup_e2e"] = out["e2e_s"] / duoserve["e2e_s"]
    return out


def _record(args: argparse.Namespace, argv: list[str] | None, results: dict) -> dict:
    device = next(iter(results.values()))["device"] if results else _device_label(args.device)
    return {"device": device, "date": datetime.date.today().isoformat(),
            "command": "python -m duoserve_core.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "torch": torch.__version__, "results": results}


def _device_label(device: str) -> str:
    from .engine import _device_name, resolve_device

    return _device_name(resolve_device(device))


def _out_path(args: argparse.Namespace, record: dict, kind: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", record["device"])
    return Path(args.out or f"benchmarks/results/{kind}_{slug}_{record['date']}.json")


def _write_timelines(folder: str | None, stem: str, timelines: dict[str, list[dict]]) -> None:
    if not folder:
        return
    import pandas as pd

    from .timeline import COLUMNS

    for name, rows in timelines.items():
        buf = io.BytesIO()
        pd.DataFrame(rows, columns=COLUMNS).to_parquet(buf, index=False)
        atomic_write_bytes(Path(folder) / f"{stem}_{name}.parquet", buf.getvalue())


def _write_trace(path: str | None, runtime, recorder: TraceRecorder | None) -> None:
    """The routing of the first measured policy's warm-up run: every policy's (tokens never change)."""
    if not path or recorder is None:
        return
    c = runtime.config
    meta = TraceMeta(runtime.source.name, c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok)
    write_trace(path, recorder.dataframe(), meta, overwrite=True)


def _print_table(results: dict, skipped: dict) -> None:
    print(f"{'policy':<16} {'TTFT ms':>9} {'/floor':>7} {'TPOT ms':>9} {'/oracle':>8} {'E2E s':>7} "
          f"{'peak':>11} {'H2D':>11} {'hit':>6} {'pf prec':>8}")
    for name, r in results.items():
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        print(f"{name:<16} {r['ttft_s'] * 1e3:>9.1f} {fmt(r.get('ttft_over_floor'), '>7.2f')} "
              f"{fmt(r['tpot_s'] and r['tpot_s'] * 1e3, '>9.2f')} {fmt(r.get('tpot_over_oracle'), '>8.2f')} "
              f"{r['e2e_s']:>7.2f} {fmt(r['peak_gpu_bytes'] and format_bytes(r['peak_gpu_bytes']), '>11')} "
              f"{format_bytes(r['h2d_bytes']):>11} {fmt(r['hit_rate'], '>6.2f')} {fmt(r['prefetch_precision'], '>8.2f')}")
    for name, why in skipped.items():
        print(f"{name:<16} skipped: {why}")


if __name__ == "__main__":
    raise SystemExit(main())

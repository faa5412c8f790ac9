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

TTFT is compared with max(transfer floor, prefill compute floor), TPOT with the oracle bound.
A policy that does not fit the budget (``resident``, usually) is reported as skipped. Results go
to ``benchmarks/results/bench_<device>_<date>.json`` with the device, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
from pathlib import Path

import torch

from .engine import load
from .errors import BudgetError, DuoServeError
from .io import atomic_write_json
from .oracle import belady_loads, expert_groups
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
           "compute_decode_s": compute["decode"], "oracle_decode_loads": oracle_loads}
    if bandwidth:
        out["transfer_floor_s"] = len(prefill_experts) * expert_bytes / bandwidth
        out["ttft_floor_s"] = max(out["transfer_floor_s"], compute["prefill"])
        if decode_tokens:
            out["oracle_tpot_s"] = max(oracle_loads * expert_bytes / bandwidth, compute["decode"]) / decode_tokens
    return out


def run_policy(args: argparse.Namespace, policy: str, prompt_ids: list[int]) -> dict:
    runtime = load(args.model, device=args.device, quant=args.quant, attention_quant=args.quant_attention,
                   memory_budget=args.memory_budget, policy=policy, num_layers=args.num_layers,
                   max_context=args.prompt_len + args.gen, predictor=args.predictor if policy in ("duoserve", "uniform")
                   else None, prefetch_depth=args.prefetch_depth, predictor_threshold=args.predictor_threshold,
                   speculative_gate=args.speculative_gate and policy in ("duoserve", "uniform"),
                   routing_trace=args.routing_trace)
    prompt_ids = [t % runtime.config.vocab_size for t in prompt_ids]
    runs = []
    for _ in range(args.repeats + 1):  # the first run warms kernels, the allocator and the clocks
        if policy != "resident":
            empty_cache(runtime)
        result = runtime.generate(prompt_ids=prompt_ids, max_new_tokens=args.gen, stop_at_eos=False)
        runs.append((result, runtime.timeline.rows()))
    runs = sorted(runs[1:], key=lambda r: r[0].e2e_s)
    result, rows = runs[len(runs) // 2]
    plan = runtime.plan
    b = bounds(rows, plan.num_slots, plan.expert_bytes, len(result.tokens) - 1)
    uses = result.expert_hits + result.expert_misses
    decode = result.phases["decode"]
    out = {**result.as_dict(), "runtime": runtime.describe(), "bounds": b,
           "hit_rate": result.expert_hits / uses if uses else None,
           "prefetch_precision": decode["prefetch_hits"] / decode["prefetches"] if decode["prefetches"] else None,
           "within_budget": None if result.peak_gpu_bytes is None else result.peak_gpu_bytes <= plan.budget_bytes}
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
    for key in list(runtime.cache.resident()):
        runtime.cache.release(key)


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/bench_<device>_<date>.json)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = p.parse_args(argv)
    prompt = torch.randint(3, 1000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    results, skipped = {}, {}
    for policy in args.policies.split(","):
        try:
            results[policy] = run_policy(args, policy, prompt)
        except BudgetError as exc:
            skipped[policy] = str(exc)
        except DuoServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not results:
        print("error: no policy fits this budget: " + "; ".join(skipped.values()), file=sys.stderr)
        return 2
    device = next(iter(results.values()))["device"]
    if "duoserve" in results:
        mine = results["duoserve"]["e2e_s"]
        for name, r in results.items():
            r["duoserve_speedup_e2e"] = r["e2e_s"] / mine
    record = {"device": device, "date": datetime.date.today().isoformat(),
              "command": "python -m duoserve_core.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "torch": torch.__version__, "results": results, "skipped": skipped}
    out = Path(args.out or f"benchmarks/results/bench_{re.sub(r'[^A-Za-z0-9]+', '_', device)}_{record['date']}.json")
    atomic_write_json(out, record)
    _print_table(results, skipped)
    if args.json:
        import json

        print(json.dumps(record))
    print(f"wrote {out}")
    return 0


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

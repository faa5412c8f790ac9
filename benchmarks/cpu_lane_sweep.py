"""The CPU lane swept: threads x budgets x policies, lane off and auto, at Mixtral-8x7B size.

    .venv/bin/python benchmarks/cpu_lane_sweep.py --out benchmarks/results/cpu_lane_sweep_sim_h200.json
    python benchmarks/cpu_lane_sweep.py --measure --out ...   (on the GPU: the same rows measured)

Issue 13's sweep (CPU threads 4, 8, 16; budgets 8 slots, 15% = 21 slots, 64 slots), simulated with
the committed int4 calibration of the H200 (``data/calibration/h200_mixtral-8x7b_int4.json``: its
CPU-lane curve was measured while copies ran) on mixtral-like routing. Each row: the split the lane
chose (the share of decode experts it computed), decode TPOT, and the gain over the same policy
without the lane. The simulator charges every lane expert the calibration's time; it does not model
the GIL the lane's job shares with a host thread running Python, nor a host that computes the lane's
experts slower in some stretches of a run than in others (both measured on the H200: docs/cpu_lane.md,
fifth runs): read its rows as what the overlap alone would give.

``--measure`` measures the same rows on this machine's device (the GPU): synthesized Mixtral-8x7B, int4 experts, NF4
attention, CUDA graphs, the same routing replayed from a trace, each cell one warm-up and one run
(the bench's ``run_policy``); the file is rewritten after every row, so a cut run keeps its rows.

``--compare SIMULATED MEASURED`` prints the two files' rows side by side (auto TPOT, CPU share, the
simulator's error) and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duoserve_core.atomic import atomic_write_json, check_writable  # noqa: E402
from duoserve_core.bench import make_prompt, run_policy  # noqa: E402
from duoserve_core.policy import PolicyKnobs  # noqa: E402
from duoserve_core.sim import build_model, load_calibration, simulate  # noqa: E402
from duoserve_core.sim.decode_routing import mixtral_replay, preset_routing  # noqa: E402
from duoserve_core.traces import Trace, write_trace  # noqa: E402

CALIBRATION = ROOT / "data" / "calibration" / "h200_mixtral-8x7b_int4.json"


class Simulated:
    """Each cell simulated with the committed calibration."""

    def __init__(self, routing: Trace, prompt_len: int, gen: int):
        self.cal, self.replay, self.prompt_len, self.gen = load_calibration(CALIBRATION), mixtral_replay(routing), prompt_len, gen
        self.model = None

    def budget(self, budget: str) -> int:
        self.model = build_model("mixtral-8x7b", quant="int4", attention_quant="nf4", memory_budget=budget,
                                 max_context=self.prompt_len + self.gen, device_type="cuda")
        return self.model.plan.num_slots

    def run(self, knobs: PolicyKnobs) -> dict:
        return simulate(self.model, self.cal, self.replay, knobs, self.prompt_len, self.gen, warmup=0, policy_time=False)


class Measured:
    """Each cell measured on the GPU: one runtime, configured per cell (``bench.run_policy``)."""

    def __init__(self, model: str, routing: Trace, prompt_len: int, gen: int, budgets: list[str]):
        from duoserve_core.bench import BenchSetup, open_runtime

        self._trace = tempfile.NamedTemporaryFile(suffix=".parquet")
        write_trace(self._trace.name, routing.df, routing.meta, overwrite=True)
        self.runtime = open_runtime(BenchSetup(model, quant="int4", attention_quant="nf4", routing_trace=self._trace.name,
                                               cuda_graphs=True), budgets[0], prompt_len + gen)
        self.prompt, self.gen, self.memory_budget = make_prompt(prompt_len), gen, budgets[0]

    def budget(self, budget: str) -> int:
        self.memory_budget = budget
        self.runtime.configure(memory_budget=budget)
        return self.runtime.plan.num_slots

    def run(self, knobs: PolicyKnobs) -> dict:
        return run_policy(self.runtime, knobs, self.prompt, self.gen, memory_budget=self.memory_budget, repeats=1)


def run(lab, budgets: list[str], threads: list[int], policies: list[str], on_row=lambda rows: None) -> list[dict]:
    rows = []
    for budget in budgets:
        slots = lab.budget(budget)
        for policy in policies:
            base = lab.run(PolicyKnobs(policy=policy))
            for n in threads:
                lane = lab.run(PolicyKnobs(policy=policy, cpu_experts="auto", cpu_threads=n))
                decode = lane["phases"]["decode"]
                needed = decode["hits"] + decode["misses"] + decode["host_computes"]
                rows.append({"budget": budget, "slots": slots, "policy": policy, "cpu_threads": n,
                             "tpot_off_ms": base["tpot_s"] * 1e3, "tpot_auto_ms": lane["tpot_s"] * 1e3,
                             "auto_over_off": lane["tpot_s"] / base["tpot_s"],
                             "cpu_share": decode["host_computes"] / needed if needed else 0.0,
                             "ttft_off_ms": base["ttft_s"] * 1e3, "ttft_auto_ms": lane["ttft_s"] * 1e3})
                print(f"{budget:>7} ({slots:>3} slots) {policy:>9} {n:>2} threads: off "
                      f"{rows[-1]['tpot_off_ms']:6.1f} ms, auto {rows[-1]['tpot_auto_ms']:6.1f} ms "
                      f"(x{rows[-1]['auto_over_off']:.3f}), CPU share {rows[-1]['cpu_share']:.2f}", flush=True)
                on_row(rows)
    return rows


def compare(simulated: dict, measured: dict) -> str:
    """A markdown table: each measured cell beside the simulated one of the same budget, policy and threads."""
    sim = {(r["budget"], r["policy"], r["cpu_threads"]): r for r in simulated["rows"]}
    lines = [f"measured: {measured['device']}, {measured['date']}, {measured['gen']} tokens; simulated: {simulated['device']}",
             "", "| budget | policy | threads | off ms (sim) | auto ms (sim) | auto/off (sim) | CPU share (sim) | sim error, auto |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in measured["rows"]:
        s = sim.get((r["budget"], r["policy"], r["cpu_threads"]))
        if s is None:
            continue
        lines.append(f"| {r['budget']} ({r['slots']} slots) | {r['policy']} | {r['cpu_threads']} | {r['tpot_off_ms']:.1f} "
                     f"({s['tpot_off_ms']:.1f}) | {r['tpot_auto_ms']:.1f} ({s['tpot_auto_ms']:.1f}) | "
                     f"{r['auto_over_off']:.3f} ({s['auto_over_off']:.3f}) | {r['cpu_share']:.2f} ({s['cpu_share']:.2f}) | "
                     f"{s['tpot_auto_ms'] / r['tpot_auto_ms'] - 1:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="8slots,15%,64slots")
    p.add_argument("--threads", default="4,8,16")
    p.add_argument("--policies", default="on-demand,lru,duoserve")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--measure", action="store_true", help="measure on this machine's device instead of simulating")
    p.add_argument("--model", default="synthetic:mixtral-8x7b", help="what --measure loads")
    p.add_argument("--compare", nargs=2, metavar=("SIMULATED", "MEASURED"), help="print two sweep files side by side")
    p.add_argument("--out")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    if a.compare:
        print(compare(*(json.loads(Path(f).read_text()) for f in a.compare)))
        return 0
    if not a.out:
        p.error("--out is required (or --compare)")
    check_writable(a.out, a.force, "--out")
    budgets = a.budgets.split(",")
    routing = Trace(*preset_routing("mixtral-like", seed=1, requests=2, tokens=a.gen, prompt_len=a.prompt_len))
    if not a.measure:
        lab, device = Simulated(routing, a.prompt_len, a.gen), f"simulated NVIDIA H200 ({CALIBRATION.relative_to(ROOT)})"
    else:
        lab = Measured(a.model, routing, a.prompt_len, a.gen, budgets)
        device = lab.runtime.device_names()
    head = {"device": device, "date": datetime.date.today().isoformat(), "routing": "mixtral-like, seed 1",
            "command": "python benchmarks/cpu_lane_sweep.py " + " ".join(argv or sys.argv[1:]),
            "prompt_len": a.prompt_len, "gen": a.gen}
    run(lab, budgets, [int(t) for t in a.threads.split(",")], a.policies.split(","),
        on_row=lambda rows: atomic_write_json(a.out, {**head, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

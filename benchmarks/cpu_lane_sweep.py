"""The CPU lane in the simulator: threads x budgets x policies, lane off and auto, at Mixtral-8x7B size.

    .venv/bin/python benchmarks/cpu_lane_sweep.py --out benchmarks/results/cpu_lane_sweep_sim_h200.json

Issue 13's sweep (CPU threads 4, 8, 16; budgets 8 slots, 15% = 21 slots, 64 slots), simulated with
the committed int4 calibration of the H200 (``data/calibration/h200_mixtral-8x7b_int4.json``: its
CPU-lane curve was measured while copies ran) on mixtral-like routing. Each row: the split the lane
chose (the share of decode experts it computed), decode TPOT, and the gain over the same policy
without the lane. The simulator does not model the host contention that made the lane lose on the
H200 (docs/cpu_lane.md): read these as what the overlap alone would give.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duoserve_core.atomic import atomic_write_json, check_writable  # noqa: E402
from duoserve_core.policy import PolicyKnobs  # noqa: E402
from duoserve_core.sim import build_model, load_calibration, simulate  # noqa: E402
from duoserve_core.sim.decode_routing import mixtral_replay, preset_routing  # noqa: E402
from duoserve_core.traces import Trace  # noqa: E402

CALIBRATION = ROOT / "data" / "calibration" / "h200_mixtral-8x7b_int4.json"


def run(budgets: list[str], threads: list[int], policies: list[str], prompt_len: int, gen: int) -> list[dict]:
    cal = load_calibration(CALIBRATION)
    df, meta = preset_routing("mixtral-like", seed=1, requests=2, tokens=gen, prompt_len=prompt_len)
    replay = mixtral_replay(Trace(df, meta))
    rows = []
    for budget in budgets:
        model = build_model("mixtral-8x7b", quant="int4", attention_quant="nf4", memory_budget=budget,
                            max_context=prompt_len + gen, device_type="cuda")
        for policy in policies:
            base = simulate(model, cal, replay, PolicyKnobs(policy=policy), prompt_len, gen, warmup=0, policy_time=False)
            for n in threads:
                knobs = PolicyKnobs(policy=policy, cpu_experts="auto", cpu_threads=n)
                lane = simulate(model, cal, replay, knobs, prompt_len, gen, warmup=0, policy_time=False)
                decode = lane["phases"]["decode"]
                needed = decode["hits"] + decode["misses"] + decode["host_computes"]
                rows.append({"budget": budget, "slots": model.plan.num_slots, "policy": policy, "cpu_threads": n,
                             "tpot_off_ms": base["tpot_s"] * 1e3, "tpot_auto_ms": lane["tpot_s"] * 1e3,
                             "auto_over_off": lane["tpot_s"] / base["tpot_s"],
                             "cpu_share": decode["host_computes"] / needed if needed else 0.0})
                print(f"{budget:>7} ({model.plan.num_slots:>3} slots) {policy:>9} {n:>2} threads: off "
                      f"{rows[-1]['tpot_off_ms']:6.1f} ms, auto {rows[-1]['tpot_auto_ms']:6.1f} ms "
                      f"(x{rows[-1]['auto_over_off']:.3f}), CPU share {rows[-1]['cpu_share']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="8slots,15%,64slots")
    p.add_argument("--threads", default="4,8,16")
    p.add_argument("--policies", default="on-demand,lru,duoserve")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    check_writable(a.out, a.force, "--out")
    rows = run(a.budgets.split(","), [int(t) for t in a.threads.split(",")], a.policies.split(","), a.prompt_len, a.gen)
    atomic_write_json(a.out, {"device": "simulated NVIDIA H200 (data/calibration/h200_mixtral-8x7b_int4.json)",
                              "date": datetime.date.today().isoformat(), "routing": "mixtral-like, seed 1",
                              "command": "python benchmarks/cpu_lane_sweep.py " + " ".join(argv or sys.argv[1:]),
                              "prompt_len": a.prompt_len, "gen": a.gen, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

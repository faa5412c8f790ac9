"""The real benchmark's figures from a simulated run, measured the way ``bench.run_policy`` measures.

Same habits as the bench: warm-up runs first (the policy's state carries over, as it does on the
GPU), the expert cache emptied before every run but ``resident``'s, and the bounds computed by
``bench.bounds`` from the (simulated) timeline, so sim and GPU results read the same and compare
field by field.
"""

from __future__ import annotations

from ..bench import bounds
from ..memory import activation_bytes, kv_cache_bytes
from ..traces import RoutingReplay
from .calibration import Calibration
from .engine import Simulator, SimRun
from .model import SimModel


def simulate(model: SimModel, calibration: Calibration, replay: RoutingReplay, policy: str, prompt_len: int,
             gen: int, *, request_id: int = 0, warmup: int = 1, predictor: str | None = None,
             prefetch_depth: int = 2, predictor_threshold: float = 0.3, speculative_gate: bool = False,
             routing_trace: str | None = None, policy_time: bool = True) -> dict:
    """One policy at one budget, as a ``bench.run_policy`` result (plus ``timeline`` rows)."""
    predicts = policy in ("duoserve", "uniform")
    sim = Simulator(model, calibration, replay, policy, predictor=predictor if predicts else None,
                    prefetch_depth=prefetch_depth, predictor_threshold=predictor_threshold,
                    speculative_gate=speculative_gate and predicts, policy_time=policy_time)
    run = None
    for _ in range(warmup + 1):
        if policy != "resident":
            sim.empty_cache()
        run = sim.generate(prompt_len, gen, request_id)
    return result(sim, run, routing_trace)


def result(sim: Simulator, run: SimRun, routing_trace: str | None = None) -> dict:
    """The bench's record of one run."""
    model, plan = sim.model, sim.model.plan
    total = run.phases["total"]
    copies = [r for r in run.rows if r["kind"] == "h2d"]
    copy_ms = sum(r["duration_ms"] for r in copies)
    b = bounds(run.rows, plan.num_slots, plan.expert_bytes, run.new_tokens - 1)
    decode = run.phases["decode"]
    uses, decode_uses = total["hits"] + total["misses"], decode["hits"] + decode["misses"]
    context = run.prompt_tokens + run.new_tokens
    peak = (plan.dense_bytes + plan.slot_bytes + kv_cache_bytes(model.config, context, model.dtype)
            + activation_bytes(model.config, run.prompt_tokens, model.dtype) + plan.workspace_bytes)
    out = {
        "prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens,
        "ttft_s": run.ttft_s, "tpot_s": run.tpot_s, "e2e_s": run.e2e_s,
        "peak_gpu_bytes": peak, "peak_expert_bytes": run.peak_resident * plan.expert_bytes,
        "h2d_bytes": total["h2d_bytes"], "h2d_copies": total["h2d_copies"],
        "h2d_bandwidth_gbps": sum(r["nbytes"] for r in copies) / copy_ms / 1e6 if copy_ms > 0 else None,
        "expert_hits": total["hits"], "expert_misses": total["misses"],
        "device": f"simulated {sim.cal.device}", "policy": sim.policy.describe(),
        "phases": {"prefill": run.phases["prefill"], "decode": decode},
        "runtime": {**model.describe(), "device": f"simulated {sim.cal.device}", "calibration": sim.cal.where,
                    "routing_trace": routing_trace, **sim.policy.describe()},
        "bounds": b,
        "hit_rate": total["hits"] / uses if uses else None,
        "prefetch_precision": decode["prefetch_hits"] / decode["prefetches"] if decode["prefetches"] else None,
        "prefetch_recall": decode["prefetch_hits"] / decode_uses if decode_uses else None,
        "within_budget": plan.budget_bytes is None or peak <= plan.budget_bytes,
        "timeline": run.rows,
    }
    if "ttft_floor_s" in b:
        out["ttft_over_floor"] = run.ttft_s / b["ttft_floor_s"]
    if "oracle_tpot_s" in b and run.tpot_s:
        out["tpot_over_oracle"] = run.tpot_s / b["oracle_tpot_s"]
    return out

"""The real benchmark's figures from a simulated run, measured the way ``bench.run_policy`` measures.

Same habits as the bench: warm-up runs first (discarded: they warm Python for the policy's timed
decisions), then the measured run with a fresh policy and an empty cache, as each bench run starts
(a policy that holds every expert is measured loaded); and the record's derived figures (bounds,
hit rate, ratios) computed by the bench's own ``bench.derived`` from the (simulated) timeline, so
sim and GPU results read the same and compare field by field.
"""

from __future__ import annotations

from ..bench import derived
from ..memory import activation_bytes, kv_cache_bytes
from ..policy import PolicyKnobs
from ..traces import RoutingReplay
from .calibration import Calibration
from .simulator import SimRun, Simulator
from .sim_model import SimModel


def simulate(model: SimModel, calibration: Calibration, replay: RoutingReplay, knobs: PolicyKnobs | str,
             prompt_len: int, gen: int, *, request_id: int = 0, warmup: int = 1, routing_trace: str | None = None,
             policy_time: bool = True, device_routing: bool = True, **knob_values) -> dict:
    """One policy at one budget, as a ``bench.run_policy`` result (plus ``timeline`` rows). ``knobs``:
    a ``PolicyKnobs`` or a policy name, ``knob_values`` changes to it (``PolicyKnobs.changed``); knobs
    its policy does not use are ignored. ``device_routing``: as ``load``'s (``Simulator``)."""
    knobs = (knobs if isinstance(knobs, PolicyKnobs) else PolicyKnobs(policy=knobs)).changed(**knob_values).effective()
    for _ in range(warmup):  # discarded runs: the policy's decisions are timed, and Python's first calls are slow
        Simulator(model, calibration, replay, knobs, policy_time=policy_time,
                  device_routing=device_routing).generate(prompt_len, gen, request_id)
    # a fresh policy, as each bench run's
    sim = Simulator(model, calibration, replay, knobs, policy_time=policy_time, device_routing=device_routing)
    if sim.policy.holds_every_expert:  # measured loaded, as the bench measures it (bench._run_once)
        sim.generate(1, 1, request_id)
    return result(sim, sim.generate(prompt_len, gen, request_id), routing_trace)


def result(sim: Simulator, run: SimRun, routing_trace: str | None = None) -> dict:
    """The bench's record of one run."""
    model, plan = sim.model, sim.model.plan
    total = run.phases["total"]
    copies = [r for r in run.rows if r["kind"] == "h2d"]
    copy_ms = sum(r["duration_ms"] for r in copies)
    context = run.prompt_tokens + run.new_tokens
    # each device: its slots, the activations and an expert's workspace; the first also the dense part and KV cache
    slots = plan.device_slots or [plan.num_slots]
    working = activation_bytes(model.config, run.prompt_tokens, model.dtype) + plan.workspace_bytes
    peaks = [n * plan.expert_bytes + working for n in slots]
    peaks[0] += plan.dense_bytes + kv_cache_bytes(model.config, context, model.dtype)
    peak, by_device = peaks[0], (peaks if len(peaks) > 1 else None)
    device = "simulated " + ", ".join([sim.cal.device] * len(slots))
    return {
        "prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens,
        "ttft_s": run.ttft_s, "tpot_s": run.tpot_s, "e2e_s": run.e2e_s,
        "peak_gpu_bytes": peak, "peak_gpu_bytes_by_device": by_device, "peak_expert_bytes": run.peak_resident * plan.expert_bytes,
        "h2d_bytes": total["h2d_bytes"], "h2d_copies": total["h2d_copies"],
        "h2d_bandwidth_gbps": sum(r["nbytes"] for r in copies) / copy_ms / 1e6 if copy_ms > 0 else None,
        "expert_hits": total["hits"], "expert_misses": total["misses"],
        "device": device, "policy": sim.policy.describe(),
        "phases": {"prefill": run.phases["prefill"], "decode": run.phases["decode"]},
        "runtime": {**model.describe(), "device": device, "calibration": sim.cal.where,
                    "decode_routing": sim.decode_routing,
                    "routing_trace": routing_trace, "memory_plan_by_device": plan.describe_devices(),
                    **sim.policy.describe()},
        "assumptions": sim.assumptions,
        **derived(ttft_s=run.ttft_s, tpot_s=run.tpot_s, decode_tokens=run.new_tokens - 1, phases=run.phases,
                  rows=run.rows, plan=plan, peak_gpu_bytes=peak, peak_gpu_bytes_by_device=by_device),
        "timeline": run.rows,
    }

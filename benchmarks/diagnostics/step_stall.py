"""Where a batched decode step loses time the single-request path does not: host clock at each event.

On the H200 (2026-12-01, ``GEN=128 bash benchmarks/batch_gpu.sh gap``) duoserve's decode steps through
``generate_many`` at batch 1 took 181.7 ms against 127.7 ms through ``generate`` on the same request,
and the timeline put the difference in layer 0's attention span (40-65 ms a step, 0.1 ms at every
other layer and for on-demand). This script runs both paths for both policies and prints, per run,
TPOT and the host's time (perf_counter at each event's emission) from layer 0's ``layer_started`` to
its attention's end and from one step's start to the next, then repeats the slow run with Python's
garbage collector off, and profiles a few of its steps.

What it showed (``benchmarks/results/logs/step_stall_h200.log``): no stall on either path, with the
collector on or off, because each run's warm-up had already met every key length of the measured run.
The stall was cuDNN's SDPA building an execution plan for each new key length, once per process: the
bench's batch rows warm up on 4 tokens only, and on-demand, measured after duoserve in the same process,
found the plans built. ``mixtral.attend`` no longer uses cuDNN (``GPU_ATTENTION_BACKENDS``).

    python benchmarks/diagnostics/step_stall.py --routing-trace T --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import duoserve_core
from duoserve_core.bench import make_prompt
from duoserve_core.events import SpanEvent, StepEvent


class HostClock:
    """Host time of the events that bound layer 0's attention and the step, per decode step."""

    def __init__(self):
        self.marks: list[dict[str, float]] = []

    def __call__(self, event) -> None:
        now = time.perf_counter()
        if isinstance(event, StepEvent) and event.kind == "step_started":
            self.marks.append({"step_started": now, "phase": event.phase})
        elif not self.marks:
            return
        elif isinstance(event, StepEvent) and event.kind == "layer_started" and event.layer == 0:
            self.marks[-1]["layer0_started"] = now
        elif isinstance(event, SpanEvent) and event.kind == "attention" and event.layer == 0:
            self.marks[-1]["attention0_" + event.edge] = now

    def summary(self) -> dict[str, float]:
        steps = [dict(m, next_started=n["step_started"]) for m, n in zip(self.marks, self.marks[1:])]
        decode = [m for m in steps if m["phase"] == "decode" and "attention0_end" in m]
        med = lambda xs: statistics.median(xs) * 1e3 if xs else float("nan")  # noqa: E731
        return {"steps": len(decode),
                "start_to_layer0_ms": med([m["layer0_started"] - m["step_started"] for m in decode]),
                "layer0_to_attention_begin_ms": med([m["attention0_begin"] - m["layer0_started"] for m in decode]),
                "attention0_host_ms": med([m["attention0_end"] - m["attention0_begin"] for m in decode]),
                "step_period_ms": med([m["next_started"] - m["step_started"] for m in decode])}


def gpu_layer0_attention_ms(rt) -> float:
    rows = [r for r in rt.timeline.rows() if r["phase"] == "decode" and r["kind"] == "attention" and r["layer"] == 0]
    return statistics.median(r["duration_ms"] for r in rows) if rows else float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:mixtral-8x7b")
    p.add_argument("--routing-trace", required=True)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=24)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", default="15%")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rt = duoserve_core.load(a.model, device=a.device, quant="nf4", attention_quant="nf4", memory_budget=a.budget,
                            max_context=a.prompt_len + 128, routing_trace=a.routing_trace, policy="duoserve")
    prompt = [t % rt.config.vocab_size for t in make_prompt(a.prompt_len, seed=0)]
    clock = HostClock()
    rt.events.subscribe(clock)
    paths = {"generate": lambda: rt.generate(prompt_ids=prompt, max_new_tokens=a.gen, stop_at_eos=False),
             "generate_many B1": lambda: rt.generate_many([prompt], max_batch=1, max_new_tokens=a.gen, stop_at_eos=False)}
    runs = [(policy, path, False) for policy in ("duoserve", "on-demand") for path in paths] + \
           [("duoserve", "generate_many B1", True)]
    print("| policy | path | gc off | TPOT ms | GPU attention0 ms | host: start->layer0 | layer0->attn begin | "
          "attn0 host | step period |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for policy, path, gc_off in runs:
        rt.configure(policy=policy)
        paths[path]()  # warm-up, untimed
        rt.empty_expert_cache()
        clock.marks.clear()
        if gc_off:
            gc.collect()
            gc.disable()
        t0 = time.perf_counter()
        out = paths[path]()
        e2e = time.perf_counter() - t0
        if gc_off:
            gc.enable()
        tpot = out.tpot_s * 1e3 if hasattr(out, "tpot_s") else out.decode_s / out.decode_steps * 1e3
        s = clock.summary()
        print(f"| {policy} | {path} | {gc_off} | {tpot:.1f} | {gpu_layer0_attention_ms(rt):.2f} | "
              f"{s['start_to_layer0_ms']:.2f} | {s['layer0_to_attention_begin_ms']:.2f} | {s['attention0_host_ms']:.2f} | "
              f"{s['step_period_ms']:.1f} |  (e2e {e2e:.2f} s, {s['steps']} steps)", flush=True)
    rt.configure(policy="duoserve")
    paths["generate_many B1"]()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rt.generate_many([prompt], max_batch=1, max_new_tokens=6, stop_at_eos=False)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    if a.out:
        prof.export_chrome_trace(f"{a.out}/step_stall_duoserve_many.json")


if __name__ == "__main__":
    main()

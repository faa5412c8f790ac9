"""Where a CPU-lane run on the GPU stops: the lane's counters while it runs, and the layer step's order.

    python benchmarks/diagnostics/lane_stall.py --mode half --order new      (on the GPU machine)

Two GPU runs with the lane hung on 2026-12-02 (notebook 05's live timeline, forced half, batch 1;
a batch-16 bench row with auto). This runs notebook 05's live configuration (Mixtral-size int4
experts, 8 layers; ``lab.cpu_lane_view.live_token``) once, or ``--batch N`` requests through
``generate_many``, with a watchdog thread that prints, every ``--every`` seconds, the jobs
submitted, finished (posted) and held, the semaphore's value and the main thread's stack; ``--order
old`` runs the layer step's order before 2026-12-02 (the policy hears ``router_done`` first).
Counts that stop moving with holds ahead of posts are a deadlock; counts that move slowly are a
slowdown.

What it showed on the H200 (2026-12-02, ``bash benchmarks/cpu_lane_gpu.sh stall``): forced half at
batch 1 and 4 hung in the prompt's first layer with 4 jobs submitted and held and 1 (then, on a
second run, 2) finished, in both orders; ``auto`` at batch 1 (one lane expert a layer) finished.
The lane's thread, past its last finished job, was where the job's tensors are dropped, the pinned
output buffer among them, whose free is a CUDA call (``HostLaneWorker.release_spent``).
A diagnostic: nothing here is imported by the package.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from duoserve_core.experts import host_lane, layer_step  # noqa: E402

COUNTS = {"submitted": 0, "posted": 0, "held": 0}


def count_lane() -> None:
    """Wrap the worker's submit, job and hold with counters."""
    worker = host_lane.HostLaneWorker
    submit, run, hold = worker.submit, worker._run, worker.hold

    def counted_submit(self, *a):
        COUNTS["submitted"] += 1
        return submit(self, *a)

    def counted_run(self, *a):
        try:
            return run(self, *a)
        finally:
            COUNTS["posted"] += 1

    def counted_hold(self, stream):
        COUNTS["held"] += 1
        return hold(self, stream)

    worker.submit, worker._run, worker.hold = counted_submit, counted_run, counted_hold


def old_order() -> None:
    """The layer step's order before 2026-12-02: the policy hears ``router_done`` before the lane chooses."""
    step = layer_step.LayerStep
    new_run = step.run

    def run(self, layer, topk, probs, speculation, device):
        policy = self.policy
        held = [policy.router_done(layer, topk, probs)]
        if speculation is not None and policy.wants_speculation:
            held.append(policy.speculated(layer + 1, speculation))
        plans = iter(held)
        real_router_done, real_speculated = policy.router_done, policy.speculated
        policy.router_done = lambda *a: next(plans)  # the new order calls them again: hand back the plans made
        policy.speculated = lambda *a: next(plans)
        try:
            new_run(self, layer, topk, probs, speculation, device)
        finally:
            policy.router_done, policy.speculated = real_router_done, real_speculated

    step.run = run


def sem_value(runtime) -> int | None:
    worker = getattr(runtime, "host_worker", None)
    gate = getattr(worker, "gate", None)
    if gate is None or getattr(gate, "_libc", None) is None:
        return None
    value = ctypes.c_int()
    gate._libc.sem_getvalue(gate._sem, ctypes.byref(value))
    return value.value


def watchdog(holder: dict, every: float, main: int, stop: threading.Event) -> None:
    t0 = time.perf_counter()
    last = None
    while not stop.wait(every):
        now = dict(COUNTS)
        runtime = holder.get("runtime")
        print(f"[{time.perf_counter() - t0:6.1f} s] {now} sem={sem_value(runtime) if runtime else None} "
              f"unheld={getattr(getattr(runtime, 'host_worker', None), 'unheld', None)}", flush=True)
        if now == last and now["submitted"]:
            frame = sys._current_frames().get(main)
            print("no progress; main thread:\n" + "".join(traceback.format_stack(frame)[-8:]), flush=True)
        last = now


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="half", choices=["off", "auto", "half", "all"])
    p.add_argument("--order", default="new", choices=["new", "old"])
    p.add_argument("--batch", type=int, default=1, help="requests through generate_many (1: notebook 05's live run)")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--every", type=float, default=5.0)
    args = p.parse_args()
    import torch

    from lab import cpu_lane_view as cv
    from lab import runs

    count_lane()
    if args.order == "old":
        old_order()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    holder, stop = {}, threading.Event()
    real_shared = runs.shared_runtime

    def remembered(*a, **k):
        holder["runtime"] = real_shared(*a, **k)
        return holder["runtime"]

    runs.shared_runtime = remembered
    threading.Thread(target=watchdog, args=(holder, args.every, threading.get_ident(), stop), daemon=True).start()
    t0 = time.perf_counter()
    threads = None if args.mode == "off" else args.threads
    if args.batch == 1:
        _, run = cv.live_token(device, "duoserve", args.mode, threads, new_tokens=args.tokens)
        result = run.result
        print(f"batch 1: TPOT {result.tpot_s * 1e3:.1f} ms, host computes {result.host_computes}, tokens {result.tokens[:6]}")
    else:
        run = runs.live_run(cv.live_model(device), policy="duoserve", slots=cv.LIVE_SLOTS, new_tokens=1, device=device,
                            cpu_experts=args.mode, cpu_threads=threads)
        prompts = [runs.prompt_ids(32, offset) for offset in range(args.batch)]
        run.runtime.configure(max_batch=args.batch)
        batch = run.runtime.generate_many(prompts, max_batch=args.batch, max_new_tokens=args.tokens, stop_at_eos=False)
        print(f"batch {args.batch}: {batch.decode_tokens_per_s:.2f} tokens/s in decode, host computes {batch.host_computes}, "
              f"first tokens {[r.tokens[:3] for r in batch.requests]}")
    stop.set()
    print(f"done in {time.perf_counter() - t0:.1f} s; counts {COUNTS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

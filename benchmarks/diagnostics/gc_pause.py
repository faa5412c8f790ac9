"""What one full garbage collection costs the host thread outside a generation and inside one.

    .venv/bin/python benchmarks/diagnostics/gc_pause.py                  # 600k long-lived objects, as the H200's bench held
    .venv/bin/python benchmarks/diagnostics/gc_pause.py --objects 50000 --json

Why: on the H200 (2026-12-02, sixth runs, docs/cpu_lane.md) a bench process held 500-700k objects and
each full collection stopped its host thread for 250-515 ms, about as long as the host stood still in
the decode steps of 420-720 ms that one run in two had. ``duoserve_core.collector`` now freezes every
object older than a ``generate`` call for its length. This builds a heap of ``--objects`` long-lived
containers beside the bundled model (``data/small-moe``, on the CPU), then forces one full collection
outside any generation and one in the middle of a generation (at a layer's end, from an event), and
prints what each walked (tracked objects outside the permanent generation) and how long it took (the
second from the result's own ``gc_longest_pause_s``). The collector is the same on any host, so this
measures the mechanism; whether the GPU runs' long steps go with it is the GPU's to say.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import duoserve_core  # noqa: E402
from duoserve_core.events import StepEvent  # noqa: E402

MODEL = ROOT / "data" / "small-moe"


def measure(objects: int, new_tokens: int = 8) -> dict:
    heap = [[i] for i in range(objects)]  # long-lived containers the collector tracks (a list always is)
    runtime = duoserve_core.load(str(MODEL), device="cpu", quant="none")
    prompt = list(range(3, 19))
    runtime.generate(prompt_ids=prompt, max_new_tokens=2, stop_at_eos=False)  # first calls out of the way
    gc.collect()

    walked_outside = len(gc.get_objects())
    start = time.perf_counter()
    gc.collect()
    outside_s = time.perf_counter() - start

    inside: dict = {}

    def collect_once(event) -> None:
        if isinstance(event, StepEvent) and event.kind == "layer_done" and event.step == 1 and not inside:
            inside["walked"] = len(gc.get_objects())
            gc.collect()
    runtime.events.subscribe(collect_once)
    result = runtime.generate(prompt_ids=prompt, max_new_tokens=new_tokens, stop_at_eos=False)
    del heap
    return {"objects": objects, "walked_outside": walked_outside, "outside_ms": outside_s * 1e3,
            "walked_inside": inside["walked"], "inside_ms": result.gc_longest_pause_s * 1e3,
            "gc_pause_ms": result.gc_pause_s * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=600_000, help="long-lived objects to build first (default 600000)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON alone")
    args = p.parse_args(argv)
    if args.objects < 0:
        print("error: --objects must be 0 or more", file=sys.stderr)
        return 2
    r = measure(args.objects)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['objects']} long-lived objects beside the bundled model on the CPU; one full collection:")
    print(f"  outside a generation: walks {r['walked_outside']:>9,} objects, {r['outside_ms']:8.2f} ms")
    print(f"  inside one (frozen):  walks {r['walked_inside']:>9,} objects, {r['inside_ms']:8.2f} ms"
          f" (all collections in that call: {r['gc_pause_ms']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

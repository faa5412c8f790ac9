"""Where an int4 copy's relayout goes on the GPU: the copy, ``k_pairs``, the CUDA converter, fused variants.

    python benchmarks/diagnostics/relayout_cost.py [--hidden 4096 --intermediate 14336] [--json OUT]

Every int4 record lands on the GPU in the CPU kernel's layout and is relaid in place on the relayout
stream (``Int4Format.arrive``: ``int4.k_pairs`` then ``aten._convert_weight_to_int4pack``) before the
compute stream may read it. The runtime's measured copy with its relayout (2.64-2.70 ms for one
Mixtral-8x7B expert on the H200, 2026-12-02) is about 1 ms over the copy alone (1.71 ms), and a layer's
last copy pays it in full. This times each piece with CUDA events (median of ``--repeats``, one warm-up):
the host-to-device copy, ``k_pairs`` per matrix eagerly and as the runtime runs it (compiled, ``int4._FusedOnCuda``), the
converter per matrix, and the whole ``arrive``, so the fix goes where the time is. GPU only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from duoserve_core.atomic import atomic_write_json  # noqa: E402
from duoserve_core.checkpoint import ExpertTensors  # noqa: E402
from duoserve_core.experts import int4  # noqa: E402
from duoserve_core.experts.formats import make_format  # noqa: E402


def gpu_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` on the current stream, by CUDA events, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("relayout_cost.py: needs a CUDA GPU")
    dev = torch.device("cuda")
    h, i = args.hidden, args.intermediate
    fmt = make_format("int4", h, i, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    tensors = ExpertTensors(*(torch.randn(shape, generator=g) * 0.02 for shape in ((i, h), (i, h), (h, i))))
    host = torch.empty(fmt.nbytes, dtype=torch.uint8).pin_memory()
    fmt.pack(tensors, host, dev)
    slot = torch.empty(fmt.nbytes, dtype=torch.uint8, device=dev)
    rows = {}

    rows["copy (pinned -> slot)"] = gpu_ms(lambda: slot.copy_(host, non_blocking=True), args.repeats)
    slot.copy_(host)
    for name, tiles in zip(("w13", "w2"), fmt.cuda_tiles):
        q = fmt.segments[f"{name}.q"].view(slot)
        rows[f"k_pairs eager {name}"] = gpu_ms(lambda: int4._half_k_pairs(q, fmt.layout.block_n), args.repeats)
        rows[f"k_pairs as run {name}"] = gpu_ms(lambda: int4.k_pairs(q, fmt.layout), args.repeats)
        paired = int4.k_pairs(q, fmt.layout)
        rows[f"convert {name}"] = gpu_ms(lambda: torch.ops.aten._convert_weight_to_int4pack(paired, tiles), args.repeats)
    fresh = slot.clone()

    def arrive() -> None:
        slot.copy_(fresh)
        fmt.arrive(slot)
    rows["copy d2d (reset)"] = gpu_ms(lambda: slot.copy_(fresh), args.repeats)
    rows["arrive + reset"] = gpu_ms(arrive, args.repeats)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, expert {h}x{i}, {fmt.nbytes / 2**20:.1f} MiB")
    for k, v in rows.items():
        print(f"  {k:<28} {v:8.3f}")
    if args.json:
        atomic_write_json(args.json, {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                      "torch": torch.__version__, "hidden": h, "intermediate": i, "ms": rows})


if __name__ == "__main__":
    main()

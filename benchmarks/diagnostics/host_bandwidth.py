"""Whether the CPU lane and the copy stream share one budget: host memory bandwidth.

    python3 benchmarks/diagnostics/host_bandwidth.py --json out.json       # on the GPU machine
    .venv/bin/python benchmarks/diagnostics/host_bandwidth.py --hidden 512 --intermediate 1024  # the lane alone, CPU

Why: on the H200 (2026-12-02, docs/cpu_lane.md, "A shared expert") the lane's job on 85% of an expert
took 2.37 ms at the median while the copy path moved a whole expert and a 15% tail, where a whole
expert beside one copy took 2.41 ms: the work shrank and the time did not. Both read the host's DRAM
(the copy by DMA, the lane by its 16 threads), so if their sum is capped, splitting bytes between
them cannot shorten a layer. This measures, on one Mixtral-8x7B-size int4 expert (pinned record,
one token, the lane's TorchScript job at ``--threads``): the copy alone (GB/s), the lane alone on the
whole expert and on its head (``--share``), and each lane job beside back-to-back copies, with the
copies' GB/s meanwhile; the last column is what both read from host memory together. On the CPU
(no CUDA) only the lane-alone rows run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from duoserve_core.atomic import atomic_write_json  # noqa: E402
from duoserve_core.checkpoint import ExpertTensors  # noqa: E402
from duoserve_core.experts.host_lane import BackgroundCopies, HostLaneWorker  # noqa: E402
from duoserve_core.experts.formats import SplitInt4Format  # noqa: E402


def packed_record(fmt: SplitInt4Format, pin: bool) -> torch.Tensor:
    """One random expert in ``fmt`` (quantized on the GPU where there is one: seconds, not minutes)."""
    work = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=work).manual_seed(0)
    h, i = fmt.hidden, fmt.intermediate
    tensors = ExpertTensors(*(torch.randn(shape, generator=g, device=work, dtype=torch.bfloat16) * 0.02
                              for shape in [(i, h), (i, h), (h, i)]))
    record = torch.empty(fmt.nbytes, dtype=torch.uint8, pin_memory=pin)
    fmt.pack(tensors, record, work)
    return record


def copy_rate(copies: BackgroundCopies, nbytes: int, seconds: float) -> float:
    """GB/s of the running copies over ``seconds``."""
    start, t0 = copies.copies, time.perf_counter()
    time.sleep(seconds)
    return (copies.copies - start) * nbytes / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--share", type=float, default=0.85, help="the head's share of the expert (--cpu-split)")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    fmt = SplitInt4Format(args.hidden, args.intermediate, args.share)
    record = packed_record(fmt, pin=cuda)
    worker = HostLaneWorker(fmt, args.threads)
    x = torch.randn(1, args.hidden, dtype=torch.bfloat16)
    out, weights = torch.empty_like(x), torch.ones(1, dtype=torch.bfloat16)
    jobs = {"whole expert": (lambda: fmt.host_job(record, x, weights, out), fmt.nbytes),
            f"head ({fmt.fraction:.0%})": (lambda: fmt.head_job(record, x, out), fmt.tail_offset)}
    rows = []
    if cuda:
        into = torch.empty(fmt.nbytes, dtype=torch.uint8, device="cuda")
        with BackgroundCopies(record, into) as copies:
            rows.append({"case": "copies alone", "copy_GBps": copy_rate(copies, fmt.nbytes, 1.0)})
    for name, (job, nbytes) in jobs.items():
        ms = statistics.median(worker.time_job(job, args.repeats)) * 1e3
        rows.append({"case": f"lane alone: {name}", "lane_ms": ms, "lane_GBps": nbytes / ms / 1e6})
        if cuda:
            with BackgroundCopies(record, into) as copies:
                start, t0 = copies.copies, time.perf_counter()
                times = worker.time_job(job, args.repeats)
                rate = (copies.copies - start) * fmt.nbytes / (time.perf_counter() - t0) / 1e9
            ms = statistics.median(times) * 1e3
            rows.append({"case": f"lane beside copies: {name}", "lane_ms": ms, "lane_GBps": nbytes / ms / 1e6,
                         "copy_GBps": rate, "together_GBps": nbytes / ms / 1e6 + rate})
    worker.close()
    print(f"{'case':<40}{'lane ms':>9}{'lane GB/s':>11}{'copy GB/s':>11}{'together':>10}")
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("lane_ms", "lane_GBps", "copy_GBps", "together_GBps")]
        print(f"{r['case']:<40}{cells[0]:>9}{cells[1]:>11}{cells[2]:>11}{cells[3]:>10}")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(sys.argv), "threads": args.threads, "record_bytes": fmt.nbytes,
                "head_bytes": fmt.tail_offset, "rows": rows}
        atomic_write_json(args.json, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much one CPU-lane job slows while another thread runs Python: the GIL between the lane and the host thread.

    .venv/bin/python benchmarks/diagnostics/lane_gil.py                       # Mixtral-8x7B's expert shape
    .venv/bin/python benchmarks/diagnostics/lane_gil.py --hidden 1024 --intermediate 3584 --threads 1

Since the stream hand-off (``experts/stream_gate.py``) the host thread runs on while the lane computes, so
the two now run Python at the same time. The lane's thread takes the GIL back each time it returns to
Python (after every op of a job run op by op; a few times a job since an int4 job is one TorchScript call,
``int4.cpu_expert_into``), and a thread that wants the GIL while another runs Python waits for the switch
interval (``sys.getswitchinterval()``, 5 ms) before the holder is made to drop it.
This times the lane's own job (``HostLaneWorker`` on an int4 record of the given shape, one warm-up, the
median of ``--repeats``), as the lane runs it and op by op, with nothing else running, beside another
process spinning on one core (a core taken, no GIL: as a host thread spinning in a CUDA sync takes one),
and beside a thread that runs pure Python the whole time, at a few switch intervals (the lane now runs
at ``host_lane.LANE_SWITCH_INTERVAL_S``). The host thread is not busy all the time in a real run (it waits for
each layer's router, without the GIL), so this is the worst case; it says how far a long stretch of host
Python (a batched step's bookkeeping) can delay the lane. On a 2-core machine, Mixtral-8x7B's shape, one
lane thread, 2026-12-02, and on the H200's host at 16 and 15 threads (a spinning process: 1.0x; a thread
running Python: 1.5x and 1.1x): see docs/cpu_lane.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from duoserve_core.checkpoint import ExpertTensors  # noqa: E402
from duoserve_core.experts.formats import ExpertFormat, Int4Format, make_format  # noqa: E402
from duoserve_core.experts.host_lane import HostLaneWorker  # noqa: E402
from duoserve_core.experts.host_store import HostExpertStore  # noqa: E402


class BusyPython:
    """A thread that runs pure Python (holding the GIL but for the interpreter's switches) until stopped."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sum(range(1000))

    def __enter__(self) -> "BusyPython":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def job_s(worker: HostLaneWorker, record: torch.Tensor, tokens: int, repeats: int) -> float:
    """Median seconds of one lane job (submit to its end, as the host sees it through the semaphore)."""
    x = torch.randn(tokens, worker.fmt.hidden, dtype=torch.bfloat16)
    weights, out = torch.ones(tokens), torch.empty(tokens, worker.fmt.hidden, dtype=torch.bfloat16)
    times = []
    for _ in range(repeats + 1):
        future = worker.submit(record, x, weights, out)
        worker.hold(None)
        start, end = future.result()
        times.append(end - start)
    return statistics.median(times[1:])


class BusyProcess:
    """Another process spinning on one core: it takes a core from the lane's threads but not the GIL, so
    the lane's slowdown beside it is the cores' share alone (a host thread spinning in a CUDA sync is
    such a core, and holds no GIL while it spins)."""

    def __enter__(self) -> "BusyProcess":
        self._process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc) -> None:
        self._process.kill()
        self._process.wait()


class OpByOp(Int4Format):
    """The int4 format with the lane's job run op by op (the base class's ``host_job``), as before the
    job became one TorchScript call: for the comparison."""

    host_job = ExpertFormat.host_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--threads", type=int, default=1, help="the lane's threads")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--intervals", default="0.005,0.0005,0.0001", help="switch intervals to try, seconds")
    a = p.parse_args(argv)
    fmt = make_format("int4", a.hidden, a.intermediate, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    tensors = ExpertTensors(*(torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16)
                              for shape in ((a.intermediate, a.hidden),) * 2 + ((a.hidden, a.intermediate),)))
    store = HostExpertStore(1, 1, fmt.nbytes, pin=False)
    fmt.pack(tensors, store.record(0, 0), torch.device("cpu"))
    default = sys.getswitchinterval()  # before the worker lowers it (``host_lane.SWITCH_INTERVAL``)
    print(f"one int4 expert ({a.hidden} x {a.intermediate}), {a.tokens} token(s), {a.threads} lane thread(s), "
          f"{torch.get_num_threads()} cores' worth of torch threads here")
    for name, job_format in (("one TorchScript call (the lane's job)", fmt),
                             ("op by op", OpByOp(a.hidden, a.intermediate, fmt.layout))):
        worker = HostLaneWorker(job_format, a.threads)
        try:
            alone = job_s(worker, store.record(0, 0), a.tokens, a.repeats)
            print(f"{name}\n  alone: {alone * 1e3:8.2f} ms")
            with BusyProcess():
                spun = job_s(worker, store.record(0, 0), a.tokens, a.repeats)
            print(f"  beside a process spinning on one core (no GIL): {spun * 1e3:8.2f} ms ({spun / alone:.1f}x)")
            for interval in (float(v) for v in a.intervals.split(",")):
                sys.setswitchinterval(interval)
                with BusyPython():
                    beside = job_s(worker, store.record(0, 0), a.tokens, a.repeats)
                print(f"  beside a thread running Python, switch interval {interval * 1e3:g} ms: {beside * 1e3:8.2f} ms "
                      f"({beside / alone:.1f}x)")
        finally:
            sys.setswitchinterval(default)
            worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

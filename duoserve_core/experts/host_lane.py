"""The CPU lane's worker: experts computed on the host, from their host-store records, beside the GPU.

One worker thread (``concurrent.futures``), so the lane's experts run one after another at the
lane's thread count while the main thread keeps queueing the GPU's work: torch's CPU kernels
release the GIL, so the two overlap. ``cpu_threads`` sets the worker thread's intra-op threads
(OpenMP's thread count is per calling thread, so the main thread keeps its own); ``None`` keeps
torch's default.

Each job writes the expert's weighted output into a buffer the host allocated when it submitted
the job (pinned, on a GPU, so the copy that reads it is queued at once), then posts the worker's
``StreamGate``: the host queues, per job, a hold on the compute stream and that copy, and goes on
to the next layer while the lane computes (``experts.stream_gate``). The job's future gives the
host times it ran between, so the executor puts the span on the timeline's ``cpu`` lane from the
main thread (the event bus is not shared across threads), and raises the job's error there. The
job's tensors are freed on the host thread, not the lane's, which makes no CUDA call
(``HostLaneWorker.release_spent``).

``measure_costs`` gives the auto decision (``policy.host_lane``) its costs on this machine: one
expert on the lane at 1, 4 and 16 tokens (the format's host kernel, the lane's threads; on a GPU
while copies run, since the two share the host's memory bandwidth), one record's copy into a
device slot, and the same expert computed from that slot, each the median of ``COST_REPEATS`` runs, taken
when the runtime is built (a few tens of ms at Mixtral-8x7B size).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..policy.host_lane import LaneCosts
from .formats import ExpertFormat
from .host_store import HostExpertStore
from .stream_gate import StreamGate
from .transfer import TransferEngine, TransferEngines

COST_TOKENS = (1, 4, 16)
# Runs per cost at load (their median): the auto rule compares one host expert with one copy, and
# where the two are close one slow sample flips the run's decisions (the H200's host timed the same
# 1-token expert under copies at 2.57-3.80 ms across runs with 3 samples, 2026-12-02); 9 cost about
# 0.3 s at Mixtral-8x7B size.
COST_REPEATS = 9


LANE_SWITCH_INTERVAL_S = 1e-4  # how soon the lane's thread gets the GIL back from a host thread running Python


class _SwitchInterval:
    """Python's GIL switch interval lowered while any lane worker lives, restored after the last one.

    Why: the lane's thread must take the GIL back each time it returns to Python: after each op of a
    job run op by op (about 25), and still a few times a job when the job is one TorchScript call
    (``Int4Format.host_job``: its start, its return, the post). Since the host thread runs on beside
    the lane (``stream_gate``), it may be running Python then, and a thread that wants the GIL waits
    the switch interval (5 ms by default) for it: one int4 Mixtral-8x7B expert at 16 threads on the
    H200's host took 1.78 ms alone and, beside a thread running Python, 34 ms at 5 ms and 3.4 ms at
    0.1 ms as one TorchScript call (op by op: 236 and 5.8 ms; ``benchmarks/diagnostics/lane_gil.py``,
    2026-12-02). Process-wide, as the interval is: restored when the last worker closes (a runtime
    closes its own when the lane goes off)."""

    def __init__(self):
        self.workers, self.saved = 0, None

    def acquire(self) -> None:
        if self.workers == 0:
            self.saved = sys.getswitchinterval()
            sys.setswitchinterval(min(self.saved, LANE_SWITCH_INTERVAL_S))
        self.workers += 1

    def release(self) -> None:
        self.workers -= 1
        if self.workers == 0:
            sys.setswitchinterval(self.saved)


SWITCH_INTERVAL = _SwitchInterval()


class HostLaneWorker:
    """Runs expert computations on a dedicated host thread."""

    def __init__(self, fmt: ExpertFormat, threads: int | None = None):
        self.fmt, self.threads = fmt, threads
        fmt.prepare_host_job()  # compiled here, on the caller's thread, not inside the first job
        self.gate = StreamGate()
        SWITCH_INTERVAL.acquire()
        self._closed = False
        self.unheld = 0  # jobs submitted whose post no hold has taken yet (the main thread counts both)
        self._spent: deque[list[torch.Tensor]] = deque()  # finished jobs' tensors, freed by the host thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duoserve-cpu-lane",
                                        initializer=self._init_thread)

    def _init_thread(self) -> None:
        """The lane thread's torch settings: its thread count, and TorchScript's graph executor without
        its profiling and optimizing passes (a thread-local switch). Why: the profiling executor
        instruments a scripted graph's first calls and re-specializes it for new token counts inside
        the job (a Mixtral-size job's first call: 92 ms with them, 35 ms without, on a 2-core host;
        later calls the same); the job is a handful of ATen calls with nothing to fuse on the CPU."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        torch._C._set_graph_executor_optimize(False)

    def submit(self, record: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
               head_only: bool = False) -> Future:
        """Start ``record``'s expert on ``x [T, H]`` (host tensors), its weighted output to go into
        ``out`` (``head_only``: a shared expert's head, unweighted: ``SplitInt4Format.head_job``); the
        future gives ``(start, end)`` in ``time.perf_counter`` times. Take its post with ``hold``, in
        submission order, before reading ``out``."""
        future = self._pool.submit(self._run, [record, x, weights, out], head_only)
        self.unheld += 1  # counted once queued: a refused submit leaves no post to wait for
        return future

    def hold(self, stream: torch.cuda.Stream | None) -> None:
        """The next job's result is ready for what ``stream`` queues after this (``None``: here, now)."""
        self.gate.hold(stream)
        self.unheld -= 1
        self.release_spent()

    def release_spent(self) -> None:
        """Drop, on the calling (host) thread, the tensors of the jobs done so far.

        Why not where the job ends: the lane's thread must make no CUDA call, since the compute stream
        may be holding for its next post, and freeing the pinned output buffer is one (torch's host
        allocator records an event on the streams that read the block). On the H200 on 2026-12-02
        every run with several lane experts in a layer (a prompt with the lane forced, a batch-16
        decode with ``auto``) hung with job n posted and job n+1 never finished, the lane's thread past
        job n, where its only CUDA call was that free (``benchmarks/diagnostics/lane_stall.py``); one
        lane expert a layer (``auto`` at batch 1) never hung. The host thread frees such buffers
        throughout a run (the router's pinned copies) without stalling."""
        while self._spent:
            self._spent.popleft()

    def settle(self) -> None:
        """Take the posts of jobs whose hold was never queued (a run stopped between a layer's
        submits and its holds: Ctrl-C in a notebook), so the next holds pair with their own jobs."""
        while self.unheld:
            self.hold(None)

    def _run(self, job: list[torch.Tensor], head_only: bool) -> tuple[float, float]:
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                if head_only:
                    record, x, _, out = job
                    self.fmt.head_job(record, x, out)
                else:
                    self.fmt.host_job(*job)
        finally:  # a failed job posts too, so no stream waits forever; its future raises on the host
            self.gate.post()
            # the tensors move to the host thread's queue (``release_spent``); the job's own list is
            # emptied, not handed over, as the pool's work item holds it until this thread moves on
            self._spent.append(job.copy())
            job.clear()
        return start, time.perf_counter()

    def time_job(self, job, repeats: int) -> list[float]:
        """Seconds of each of ``repeats`` calls of ``job()`` on this lane's thread, after one untimed call
        (first-call allocations and kernel selection)."""
        def run() -> list[float]:
            with torch.inference_mode():
                job()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    job()
                    times.append(time.perf_counter() - t0)
            return times
        return self._pool.submit(run).result()

    def time_expert(self, record: torch.Tensor, tokens: int, dtype: torch.dtype, repeats: int = 3) -> float:
        """Median seconds of one expert on this lane for ``tokens`` tokens (on the worker's thread)."""
        x = torch.randn(tokens, self.fmt.hidden, dtype=dtype)
        weights, out = torch.ones(tokens), torch.empty_like(x)
        return statistics.median(self.time_job(lambda: self.fmt.host_job(record, x, weights, out), repeats))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.release_spent()
        if not self._closed:
            self._closed = True
            SWITCH_INTERVAL.release()


class BackgroundCopies:
    """Copies ``record`` into ``into`` (a device buffer) on a side stream, back to back, until stopped:
    the copy stream of a copy-bound decode, for timing what runs beside it."""

    def __init__(self, record: torch.Tensor, into: torch.Tensor):
        self.record, self.buffer = record, into
        self.stream = torch.cuda.Stream(into.device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.copies = 0

    def _run(self) -> None:
        with torch.cuda.stream(self.stream):
            while not self._stop.is_set():
                for _ in range(4):
                    self.buffer.copy_(self.record, non_blocking=True)
                self.stream.synchronize()
                self.copies += 4

    def __enter__(self) -> "BackgroundCopies":
        self._thread.start()
        time.sleep(0.05)  # the copies are running before the first timed call
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure_copy_s(engine: TransferEngine | TransferEngines, repeats: int = 3) -> float:
    """Median seconds of one record's copy into slot 0 (the first device's), relayout included (call
    before the slot holds anything)."""
    store = engine.store
    src, dst = store.record(0, 0), engine.slot(0)
    times = []
    for _ in range(repeats + 1):
        if engine.cuda:
            torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=engine.cuda)
        if engine.arrive is not None:
            engine.arrive(dst)  # a copy is not usable before its relayout (``ExpertFormat.arrive``)
        if engine.cuda:
            torch.cuda.synchronize(engine.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _piecewise(points: list[tuple[int, float]]):
    """Linear between the measured token counts, the last segment's slope beyond, never below the first."""
    def at(tokens: int) -> float:
        for (t0, s0), (t1, s1) in zip(points, points[1:]):
            if tokens <= t1 or (t1, s1) == points[-1]:
                return max(s0 + (s1 - s0) * (tokens - t0) / (t1 - t0), points[0][1])
        return points[0][1]
    return at


def time_device_expert(fmt: ExpertFormat, slot: torch.Tensor, tokens: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Median seconds of one expert computed from a device slot (queued and finished)."""
    x = torch.randn(tokens, fmt.hidden, dtype=dtype, device=slot.device)
    sync = torch.cuda.synchronize if slot.device.type == "cuda" else (lambda *a: None)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            sync(slot.device)
            t0 = time.perf_counter()
            fmt.forward(slot, x)
            sync(slot.device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def measure_costs(worker: HostLaneWorker, store: HostExpertStore, engine: TransferEngine | TransferEngines,
                  dtype: torch.dtype) -> LaneCosts:
    """The lane's costs on this machine (see the module doc); slot 0 is used and left holding nothing
    (the copies running beside the host's timing write into it)."""
    record = store.record(0, 0)
    beside = BackgroundCopies(record, engine.slot(0)) if engine.cuda else contextlib.nullcontext()
    with beside:
        host = [(t, worker.time_expert(record, t, dtype, COST_REPEATS)) for t in COST_TOKENS]
    copy_s = measure_copy_s(engine, COST_REPEATS)  # slot 0 now holds expert (0, 0), relaid for the device
    device = [(t, time_device_expert(worker.fmt, engine.slot(0), t, dtype, COST_REPEATS)) for t in COST_TOKENS]
    return LaneCosts(copy_s=copy_s, host_s=_piecewise(host), device_s=_piecewise(device),
                     threads=worker.threads or torch.get_num_threads(),
                     source=f"measured when the runtime was built (host{' under copies' if engine.cuda else ''} "
                            + ", ".join(f"{t} tok {s * 1e3:.2f} ms" for t, s in host) + ")")

"""The CPU lane's figures: one expert computed on the host, by thread count and token count.

Measured the way the lane runs it: the runtime's own ``HostLaneWorker`` (a dedicated thread at the
given intra-op thread count) computes the format's expert from a host record, the median of a
few calls after a warm-up. Two conditions per thread count:

- ``idle``: nothing else runs;
- ``copying`` (on a GPU): pinned host->device copies of expert records run back to back on a side
  stream the whole time, as the copy stream does in a copy-bound decode. The host lane and the
  copies share the host's memory bandwidth, so this is the figure the simulator uses and the one
  the cost model should believe; ``idle`` is kept to say what the sharing costs.

The result is the calibration file's ``host_lane`` section (``sim.calibration``).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..experts.formats import ExpertFormat
from ..experts.host_lane import BackgroundCopies, HostLaneWorker

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32)


def measure_host_lane(fmt: ExpertFormat, record: torch.Tensor, threads: list[int], dtype: torch.dtype,
                      device: torch.device, tokens: tuple[int, ...] = DEFAULT_TOKENS, repeats: int = 5) -> dict:
    """``{"default_threads", "expert": {format: {threads: [[tokens, s]...]}}, "idle": {...}, "copy_gbps"}``.

    ``expert`` holds the figures under copies where the device can copy (a GPU), else idle ones.
    """
    busy = device.type == "cuda"
    idle: dict[str, list[list[float]]] = {}
    loaded: dict[str, list[list[float]]] = {}
    copy_gbps = []
    for n in threads:
        worker = HostLaneWorker(fmt, n)
        try:
            idle[str(n)] = [[t, worker.time_expert(record, t, dtype, repeats)] for t in tokens]
            if busy:
                with BackgroundCopies(record, torch.empty_like(record, device=device)) as copies:
                    t0 = time.perf_counter()
                    loaded[str(n)] = [[t, worker.time_expert(record, t, dtype, repeats)] for t in tokens]
                    elapsed = time.perf_counter() - t0
                copy_gbps.append(copies.copies * record.numel() / elapsed / 1e9)
        finally:
            worker.close()
    out = {"default_threads": max(threads), "expert": {fmt.name: loaded if busy else idle},
           "idle": {fmt.name: idle}, "measured_under_copies": busy}
    if copy_gbps:
        out["copy_gbps_meanwhile"] = statistics.median(copy_gbps)
    return out

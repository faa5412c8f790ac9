"""The one side stream per GPU that graph warm-ups and captures run on, and the capture itself.

cuBLAS keeps a workspace (32 MiB on an H200) for every stream it has run a matmul on, for the life
of the process, whichever runtime made the stream. A fresh ``torch.cuda.Stream()`` per capture drew
a new stream from torch's pool each time (up to 32 of them: 1 GiB of workspaces outside every memory
plan; measured by ``benchmarks/diagnostics/peak_memory.py``, 4 x 32 MiB left by a tiny model's
graphs). With this stream shared, the process holds two workspaces per GPU whatever it captures: the
compute stream's and this one's, which the plan's CUDA margin (``memory.CUDA_ALLOCATOR_MARGIN``) holds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """This process's side stream on ``device`` (a CUDA device)."""
    return _stream(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)


def capture(fn: Callable[[], Any], device: torch.device, pool=None, error_mode: str = "global"
            ) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn``'s kernels as a CUDA graph, and what ``fn`` returned while captured (the graph's outputs).
    ``fn`` runs once on the side stream first (bitsandbytes' tables, the allocator), as torch's graph
    notes ask, then is captured there into ``pool`` (``None``: a new one; graphs that replay one at a
    time on one stream can share one, ``graph.pool()``). ``error_mode`` is torch's
    ``capture_error_mode``: ``thread_local`` where another thread may call CUDA meanwhile."""
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode=error_mode):
        out = fn()
    return graph, out

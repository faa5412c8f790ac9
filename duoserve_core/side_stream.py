"""The one side stream per GPU that graph warm-ups and captures run on.

cuBLAS keeps a workspace (32 MiB on an H200) for every stream it has run a matmul on, for the life
of the process, whichever runtime made the stream. A fresh ``torch.cuda.Stream()`` per capture drew
a new stream from torch's pool each time (up to 32 of them: 1 GiB of workspaces outside every memory
plan; measured by ``benchmarks/diagnostics/peak_memory.py``, 4 x 32 MiB left by a tiny model's
graphs). With this stream shared, the process holds two workspaces per GPU whatever it captures: the
compute stream's and this one's, which the plan's CUDA margin (``memory.CUDA_ALLOCATOR_MARGIN``) holds.
"""

from __future__ import annotations

from functools import cache

import torch


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """This process's side stream on ``device`` (a CUDA device)."""
    return _stream(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)

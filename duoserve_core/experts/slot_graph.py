"""A one-token expert call as a CUDA graph per slot: its SwiGLU from the slot's bytes and its router
weight, one launch.

Why: with the dense part of a decode layer replayed from graphs (``decode_graph``), a resident decode
token on the H200 still took 48 ms for about 14 ms of GPU work (2026-12-01, ``docs/cpu_lane.md``),
about 1.1 ms of host time a layer, most of it the experts' eager path: two 4-bit GEMMs through
bitsandbytes' Python wrapper (about 80 us of host time each), the SiLU and product, the weight's
multiply and cast, about ten launches an expert. A slot's bytes sit at a fixed address, so one capture
per slot serves every expert that lands in it: the host queues the token's gather, one replay and the
scatter into the layer's rows.

Only one-token calls are captured (every expert of a batch-1 decode step, most of a small batch's),
and only for formats whose one-token call reads the weights where they lie
(``ExpertFormat.computes_in_place``): a call that dequantizes a weight-sized temporary would keep it
in the graphs' memory pool, outside the memory plan. Everything else runs eagerly, as before. Where
there is no CUDA (``capture=False``) the same static function runs eagerly, which the CPU tests
compare with the eager path.
"""

from __future__ import annotations

import torch

from ..side_stream import capture
from .formats import ExpertFormat


class SlotGraphs:
    """One-token expert calls of a device's slots (``slot(index)`` gives a slot's record), replayed
    from one CUDA graph per slot (``capture=True``) or run eagerly as the same static function."""

    def __init__(self, fmt: ExpertFormat, slot, device: torch.device, capture: bool):
        self.fmt, self.slot, self.device, self.capture = fmt, slot, device, capture
        self.x = self.weight = self.out = None  # the token's MoE input, its router weight, weight x expert(x)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None  # one memory pool for every slot's graph: they replay one at a time, on one stream
        self.calls = 0     # expert calls served, replayed or (without capture) run as the static function

    def __call__(self, index: int, x: torch.Tensor, token: torch.Tensor, weights: torch.Tensor,
                 row: torch.Tensor) -> torch.Tensor:
        """``weights[row] * expert(x[token])`` in ``x``'s dtype for one token (``token`` and ``row``: one-element
        index tensors) and the expert in slot ``index``; with capture the result is the graphs' output
        buffer: consume it (on this stream) before the next call."""
        if self.x is None:  # the buffers take the dtypes of the first call, which every later one shares
            self.x, self.weight = torch.zeros_like(x[:1]), torch.zeros_like(weights[:1])
            self.out = torch.zeros_like(self.x)
        torch.index_select(x, 0, token, out=self.x)  # gathered straight into the graphs' inputs
        torch.index_select(weights, 0, row, out=self.weight)
        self.calls += 1
        if not self.capture:
            self._static(index)
            return self.out
        if index not in self._graphs:
            # thread_local: the CPU lane's worker may call CUDA (pinned buffers) while this thread captures
            self._graphs[index], _ = capture(lambda: self._static(index), self.device, self._pool, "thread_local")
            self._pool = self._graphs[index].pool()
        self._graphs[index].replay()
        return self.out

    def _static(self, index: int) -> None:
        """What ``_TorchLayer.compute`` does for one token, on the static buffers."""
        y = self.fmt.forward(self.slot(index), self.x)
        self.out.copy_((y * self.weight[:, None]).to(self.out.dtype))

    def captured(self) -> int:
        """How many slots have a graph."""
        return len(self._graphs)

"""How one expert is laid out as bytes, and how it is computed from those bytes.

An expert is stored as a single flat ``uint8`` record so that moving it to the GPU is one
contiguous copy, host slot to GPU slot, whatever the format. A format knows the record's
segments (offsets, dtypes, shapes), how to pack an expert into a record, and how to compute
the expert's SwiGLU MLP straight from a record on the compute device.

- ``DenseFormat``: gate and up fused as ``w13 [2I, H]`` (transformers' ``gate_up_proj``),
  then ``w2 [H, I]``, in bf16 or the checkpoint's dtype.
- ``NF4Format``: the same two matrices in bitsandbytes NF4 (blocksize 64, fp32 absmax, not
  nested): 0.5625 bytes per parameter. Computed with ``bnb.matmul_4bit`` on CUDA and by
  dequantize + linear on the CPU (bitsandbytes' CPU matmul is the same arithmetic, slower).
"""

from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import nf4
from ..checkpoint import ExpertTensors

_ALIGN = 64  # bytes; keeps every segment aligned for any dtype view and for vector loads


@dataclass(frozen=True)
class Segment:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def view(self, record: torch.Tensor) -> torch.Tensor:
        return record[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


def _layout(parts: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[dict[str, Segment], int]:
    segments, offset = {}, 0
    for name, dtype, shape in parts:
        seg = Segment(name, dtype, shape, offset)
        segments[name] = seg
        offset += -(-seg.nbytes // _ALIGN) * _ALIGN
    return segments, offset


class ExpertFormat(ABC):
    """Byte layout and arithmetic of one expert record."""

    name: str
    segments: dict[str, Segment]
    nbytes: int

    def __init__(self, hidden: int, intermediate: int):
        self.hidden, self.intermediate = hidden, intermediate

    @property
    def params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def pack(self, tensors: ExpertTensors, out: torch.Tensor, work_device: torch.device) -> None:
        """Write ``tensors`` into the record ``out`` (uint8, host), computing on ``work_device``."""
        raise NotImplementedError

    def forward(self, record: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert MLP of ``x [T, H]`` with the weights in ``record`` (same device)."""
        w13, w2 = self.weights(record, x.dtype)
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(w13, w2)`` in ``dtype``: what the record computes with."""
        raise NotImplementedError


class DenseFormat(ExpertFormat):
    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__(hidden, intermediate)
        self.dtype = dtype
        self.name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
        self.segments, self.nbytes = _layout([
            ("w13", dtype, (2 * intermediate, hidden)),
            ("w2", dtype, (hidden, intermediate)),
        ])

    def pack(self, tensors: ExpertTensors, out: torch.Tensor, work_device: torch.device) -> None:
        self.segments["w13"].view(out).copy_(torch.cat([tensors.w1, tensors.w3], dim=0))
        self.segments["w2"].view(out).copy_(tensors.w2)

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.segments["w13"].view(record).to(dtype), self.segments["w2"].view(record).to(dtype))


class NF4Format(ExpertFormat):
    name = "nf4"

    def __init__(self, hidden: int, intermediate: int):
        super().__init__(hidden, intermediate)
        self.shapes = {"w13": (2 * intermediate, hidden), "w2": (hidden, intermediate)}
        parts = []
        for name, (rows, cols) in self.shapes.items():
            q_shape, absmax_shape = nf4.packed_shapes(rows * cols)
            parts += [(f"{name}.q", torch.uint8, q_shape), (f"{name}.absmax", torch.float32, absmax_shape)]
        self.segments, self.nbytes = _layout(parts)

    def pack(self, tensors: ExpertTensors, out: torch.Tensor, work_device: torch.device) -> None:
        for name, w in (("w13", torch.cat([tensors.w1, tensors.w3], dim=0)), ("w2", tensors.w2)):
            q, absmax = nf4.quantize(w.to(work_device))
            self.segments[f"{name}.q"].view(out).copy_(q)
            self.segments[f"{name}.absmax"].view(out).copy_(absmax)

    def _parts(self, record: torch.Tensor, name: str):
        return self.segments[f"{name}.q"].view(record), self.segments[f"{name}.absmax"].view(record), self.shapes[name]

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(nf4.dequantize(*self._parts(record, n), dtype) for n in ("w13", "w2"))

    def forward(self, record: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if record.device.type != "cuda":
            return super().forward(record, x)
        gate, up = nf4.linear(x, *self._parts(record, "w13")).chunk(2, dim=-1)
        return nf4.linear(F.silu(gate) * up, *self._parts(record, "w2"))


QUANT_CHOICES = ("none", "bf16", "nf4")


def make_format(quant: str, hidden: int, intermediate: int, checkpoint_dtype: torch.dtype) -> ExpertFormat:
    """``none`` keeps the checkpoint's dtype; ``bf16`` and ``nf4`` convert."""
    if quant == "none":
        return DenseFormat(hidden, intermediate, checkpoint_dtype)
    if quant == "bf16":
        return DenseFormat(hidden, intermediate, torch.bfloat16)
    if quant == "nf4":
        return NF4Format(hidden, intermediate)
    raise ValueError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")

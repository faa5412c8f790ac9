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

import logging
import math
from abc import ABC
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checkpoint import ExpertTensors

_ALIGN = 64  # bytes; keeps every segment aligned for any dtype view and for vector loads

# On CPUs with AVX512-BF16, importing bitsandbytes warns that an optional kernel hub package is
# missing; the lab computes CPU experts by dequantize + linear and never needs it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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
    blocksize = 64

    def __init__(self, hidden: int, intermediate: int):
        super().__init__(hidden, intermediate)
        n13, n2 = 2 * intermediate * hidden, hidden * intermediate
        self.shapes = {"w13": (2 * intermediate, hidden), "w2": (hidden, intermediate)}
        self.segments, self.nbytes = _layout([
            ("w13.q", torch.uint8, ((n13 + 1) // 2, 1)),
            ("w13.absmax", torch.float32, (-(-n13 // self.blocksize),)),
            ("w2.q", torch.uint8, ((n2 + 1) // 2, 1)),
            ("w2.absmax", torch.float32, (-(-n2 // self.blocksize),)),
        ])
        self._codes: dict[torch.device, torch.Tensor] = {}

    def pack(self, tensors: ExpertTensors, out: torch.Tensor, work_device: torch.device) -> None:
        import bitsandbytes.functional as bnbf

        for name, w in (("w13", torch.cat([tensors.w1, tensors.w3], dim=0)), ("w2", tensors.w2)):
            q, state = bnbf.quantize_4bit(w.to(work_device), blocksize=self.blocksize, quant_type="nf4")
            self.segments[f"{name}.q"].view(out).copy_(q)
            self.segments[f"{name}.absmax"].view(out).copy_(state.absmax)

    def _state(self, record: torch.Tensor, name: str, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState, get_4bit_type

        dev = record.device
        if dev not in self._codes:
            self._codes[dev] = get_4bit_type("nf4", device=dev)
        return QuantState(absmax=self.segments[f"{name}.absmax"].view(record), shape=torch.Size(self.shapes[name]),
                          code=self._codes[dev], blocksize=self.blocksize, quant_type="nf4", dtype=dtype)

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        from bitsandbytes.functional import dequantize_4bit

        return tuple(dequantize_4bit(self.segments[f"{n}.q"].view(record), self._state(record, n, dtype))
                     for n in ("w13", "w2"))

    def forward(self, record: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if record.device.type != "cuda":
            return super().forward(record, x)
        import bitsandbytes as bnb

        q13, q2 = self.segments["w13.q"].view(record), self.segments["w2.q"].view(record)
        gate, up = bnb.matmul_4bit(x, q13.t(), quant_state=self._state(record, "w13", x.dtype)).chunk(2, dim=-1)
        return bnb.matmul_4bit(F.silu(gate) * up, q2.t(), quant_state=self._state(record, "w2", x.dtype))


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

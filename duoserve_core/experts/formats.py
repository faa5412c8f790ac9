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
- ``Int4Format``: the same two matrices in grouped affine int4 (``experts/int4.py``), group 128
  where the widths allow (else 64 or 32), bf16 scale and zero per group: 0.53125 bytes per
  parameter at group 128, 0.5625 at 64. The values are stored once, in the layout torch's CPU
  int4 kernel reads (``_weight_int4pack_mm_for_cpu``), and both lanes compute from those bytes:
  the host by that kernel (1.53 ms for one Mixtral-8x7B expert and token on the GPU host's
  16-core Xeon), the GPU by torch's CUDA int4 kernel once a landed record is relaid for it
  (``Int4Format.arrive``; by dequantize + linear where that kernel cannot take the shape).
- ``SplitInt4Format`` (``--cpu-split``): int4's values as a head and a tail record, so that the CPU
  lane can compute one expert's head while the copy path moves its tail.
"""

from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import nf4
from ..checkpoint import ExpertTensors
from ..errors import SettingError
from . import int4

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
    fraction = 0.0  # the share of an expert the CPU lane computes when it shares one (``SplitInt4Format``); 0: never
    tail_bytes = 0  # the bytes the copy path moves of a shared expert

    def __init__(self, hidden: int, intermediate: int):
        self.hidden, self.intermediate = hidden, intermediate

    @property
    def params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def pack(self, tensors: ExpertTensors, out: torch.Tensor, work_device: torch.device) -> None:
        """Write ``tensors`` into the record ``out`` (uint8, host), computing on ``work_device``."""
        raise NotImplementedError

    def arrive(self, record: torch.Tensor) -> None:
        """A record just copied to a device (a slot): put it in the layout that device's kernel reads,
        in place, on the current stream. Most formats compute from the host bytes as they are."""

    def relayouts_on(self, device: torch.device) -> bool:
        """Whether ``arrive`` does anything on ``device``: only then does a copy hop to the relayout stream
        (``TransferEngine``), whose extra wait, event and timeline span a copy would otherwise pay for nothing."""
        return False

    def forward(self, record: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert MLP of ``x [T, H]`` with the weights in ``record`` (same device)."""
        w13, w2 = self.weights(record, x.dtype)
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(w13, w2)`` in ``dtype``: what the record computes with."""
        raise NotImplementedError

    def host_job(self, record: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        """The CPU lane's job: ``out = forward(record, x) * weights[:, None]``, all on the host."""
        out.copy_(self.forward(record, x) * weights[:, None].to(x.dtype))

    def prepare_host_job(self) -> None:
        """Build whatever ``host_job`` compiles, before a lane's first job (which must not stall on it)."""

    def computes_in_place(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether ``forward`` of one token in ``dtype`` on ``device`` reads the weights where they lie,
        with no weight-sized temporary: only such a call may be captured in a CUDA graph
        (``experts/slot_graph.py``), whose memory pool would keep the temporary outside the plan."""
        return False

    def describe(self) -> dict:
        """The format as result files record it."""
        return {"name": self.name, "record_bytes": self.nbytes, "bytes_per_param": self.nbytes / self.params}


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

    def computes_in_place(self, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype == self.dtype  # else ``weights`` makes a converted copy


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

    def computes_in_place(self, device: torch.device, dtype: torch.dtype) -> bool:
        # one token on CUDA: bitsandbytes' matrix-vector kernel reads the packed bytes (where a width is
        # not a multiple of its block it dequantizes instead: a small model's temporary, not Mixtral's)
        return device.type == "cuda"

    def forward(self, record: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if record.device.type != "cuda":
            return super().forward(record, x)
        gate, up = nf4.linear(x, *self._parts(record, "w13")).chunk(2, dim=-1)
        return nf4.linear(F.silu(gate) * up, *self._parts(record, "w2"))


class Int4Format(ExpertFormat):
    """Grouped affine int4 in the CPU kernel's layout; one record, two lanes.

    Segments, per matrix ``W [N, K]`` (``w13``: ``N = 2I, K = H``; ``w2``: ``N = H, K = I``):
    ``{name}.q`` the kernel's ``[N, K/2]`` uint8 bytes in ``self.layout``, and ``{name}.sz`` the
    kernel's ``[K/G, N, 2]`` bf16 scales and zeros. ``forward`` on a CPU record runs the CPU kernel
    (activations in bf16, see ``int4.cpu_linear``) when the record's layout is this host's kernel
    layout; anywhere else (a CUDA slot, another host) it unpacks the same bytes with torch ops and
    computes dequantize + linear in the caller's dtype.
    """

    name = "int4"

    def __init__(self, hidden: int, intermediate: int, layout: int4.CpuLayout | None = None, group: int | None = None):
        super().__init__(hidden, intermediate)
        group = group or int4.group_size_for(hidden, intermediate)
        if group is None:
            raise SettingError(
                f"--quant int4 needs a group size of {', '.join(map(str, int4.GROUP_SIZES))} dividing both "
                f"hidden_size {hidden} and intermediate_size {intermediate}; none does. Use --quant nf4 "
                "(any width) or bf16 for this model")
        self.group = group
        host = int4.host_layout()
        self.layout = layout or host or int4.FALLBACK_LAYOUT
        self.shapes = {"w13": (2 * intermediate, hidden), "w2": (hidden, intermediate)}
        # The CPU kernel is used only where its converter packs both matrices exactly as the
        # record does (checked once here on a probe of each matrix's row count).
        self.cpu_kernel = self.layout == host and all(int4.kernel_agrees(rows, self.layout)
                                                      for rows, _ in self.shapes.values())
        # The CUDA kernel (tinygemm) wants N % 8 == 0 and K % (16 * innerKTiles) == 0 for each matrix.
        tiles = [int4.cuda_inner_k_tiles(cols) if rows % 8 == 0 else None for rows, cols in self.shapes.values()]
        self.cuda_tiles = None if None in tiles else tuple(tiles)
        parts = []
        for name, (rows, cols) in self.shapes.items():
            parts += [(f"{name}.q", torch.uint8, (rows, cols // 2)),
                      (f"{name}.sz", int4.SCALE_DTYPE, (cols // group, rows, 2))]
        self.segments, self.nbytes = _layout(parts)
        self._segment_spans = self.segment_spans()

    def segment_spans(self, offset: int = 0) -> list[list[int]]:
        """``[offset, bytes, dim 0, dim 1]`` of each segment (the record starting ``offset`` bytes into the
        buffer the lane reads), for ``int4.cpu_expert_into``."""
        return [[offset + self.segments[n].offset, self.segments[n].nbytes, *self.segments[n].shape[:2]]
                for n in ("w13.q", "w13.sz", "w2.q", "w2.sz")]

    def describe(self) -> dict:
        return {**super().describe(), "group_size": self.group, "cpu_layout": self.layout.name,
                "cpu_kernel": self.cpu_kernel, "cuda_kernel": self.cuda_tiles is not None, "scale_dtype": "bfloat16"}

    def pack(self, tensors: ExpertTensors, out: torch.Tensor, work_device: torch.device) -> None:
        for name, w in (("w13", torch.cat([tensors.w1, tensors.w3], dim=0)), ("w2", tensors.w2)):
            q, sz = int4.quantize(w.to(work_device).contiguous(), self.group)
            self.segments[f"{name}.q"].view(out).copy_(int4.pack(q, self.layout))
            self.segments[f"{name}.sz"].view(out).copy_(sz)

    def _parts(self, record: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.segments[f"{name}.q"].view(record), self.segments[f"{name}.sz"].view(record)

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(int4.weight(*self._parts(record, n), self.group, self.layout, dtype) for n in ("w13", "w2"))

    def arrive(self, record: torch.Tensor) -> None:
        """On CUDA, each matrix's bytes become the CUDA kernel's packing in place (a few kernels per copy,
        run where the copy ran): from then on the slot is computed by tinygemm, not dequantized per call.
        The scales and zeros are shared by both kernels and stay as they are."""
        if record.device.type != "cuda" or self.cuda_tiles is None:
            return
        for name, tiles in zip(("w13", "w2"), self.cuda_tiles):
            q = self.segments[f"{name}.q"].view(record)
            q.view(-1).copy_(int4.to_cuda_layout(q, self.layout, tiles).view(torch.uint8).view(-1))

    def relayouts_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.cuda_tiles is not None

    def host_job(self, record: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        """The lane's job as one TorchScript call (``int4.cpu_expert_into``: no GIL between its ops), the
        same ops as ``forward`` and the base class's weighting."""
        if record.device.type != "cpu" or not self.cpu_kernel:
            return super().host_job(record, x, weights, out)
        int4.cpu_expert_into()(record, record.view(int4.SCALE_DTYPE), [self._segment_spans], self.group, x, weights, out)

    def prepare_host_job(self) -> None:
        if self.cpu_kernel:
            int4.cpu_expert_into()

    def forward(self, record: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if record.device.type == "cuda" and self.cuda_tiles is not None:  # a slot ``arrive`` converted
            w13, w2 = self.cuda_tiles
            gate, up = int4.cuda_linear(x, *self._parts(record, "w13"), self.group, self.shapes["w13"], w13).chunk(2, -1)
            return int4.cuda_linear(F.silu(gate) * up, *self._parts(record, "w2"), self.group, self.shapes["w2"], w2)
        if record.device.type != "cpu" or not self.cpu_kernel:
            return super().forward(record, x)
        gate, up = int4.cpu_linear(x, *self._parts(record, "w13"), self.group).chunk(2, dim=-1)
        return int4.cpu_linear(F.silu(gate) * up, *self._parts(record, "w2"), self.group)


class SplitInt4Format(ExpertFormat):
    """``Int4Format``'s values as a head of ``split`` intermediate units and a tail of the rest
    (``--cpu-split``): the CPU lane and the copy path can share one expert.

    Why: at batch 1 a layer with two missed experts waits for the longer of one copy (1.91 ms with its
    relayout on the H200) and one expert on the CPU lane (2.84 ms): the lane's expert is the layer's
    longest path (docs/cpu_lane.md). An expert's output is a sum over its intermediate units,
    ``W2 (silu(W1 x) * W3 x) = W2[:, :a] h[:a] + W2[:, a:] h[a:]``, so one expert can be cut in two: the
    lane computes the first ``a`` units (the *head*) while the copy path moves the rest (the *tail*) and
    the GPU computes it; both paths end near ``2 / (1/copy + 1/lane)`` (2.28 ms) instead of 2.84.

    The record is the head then the tail, each a complete ``Int4Format`` record of intermediate ``a`` and
    ``I - a``, so the lane reads the head where it lies and the tail is one contiguous range of bytes at
    the record's end (a tail of ``w2``'s columns is not contiguous in an unsplit record). The values are
    the unsplit format's: ``w13``'s groups run along ``H`` within a row, ``w2``'s along ``I``, and ``a`` is a
    multiple of the group, which both parts keep.

    A whole record that lands in a GPU slot is reassembled there into the unsplit layout before its
    conversion for tinygemm (``arrive``: the same kernels as ``Int4Format.arrive`` plus a concatenation of
    each matrix's parts), so an expert computed whole on the GPU gives the unsplit format's bits. On the
    CPU (where records are read as they lie) a whole expert is its head plus its tail. A shared expert's
    output is also head plus tail, each rounded to the activations' dtype by its own kernel: on a GPU it
    differs from the whole expert's by that rounding, as a lane expert's output already does.
    """

    name = "int4"

    def __init__(self, hidden: int, intermediate: int, fraction: float, layout: int4.CpuLayout | None = None):
        super().__init__(hidden, intermediate)
        self.whole = whole = Int4Format(hidden, intermediate, layout)
        self.group, self.layout = whole.group, whole.layout
        units = intermediate // self.group
        head_units = round(fraction * units)
        if not 0 < head_units < units:
            raise SettingError(
                f"--cpu-split {fraction}: an expert of {intermediate} intermediate units in groups of {self.group} "
                f"cannot give the lane {fraction:.0%} of them and the copy path the rest; give a fraction between "
                f"{1 / units:.3g} and {1 - 1 / units:.3g}, or 0 for no shared expert")
        self.split = head_units * self.group
        self.fraction = self.split / intermediate  # what the lane computes of a shared expert, after rounding
        self.head = Int4Format(hidden, self.split, self.layout, self.group)
        self.tail = Int4Format(hidden, intermediate - self.split, self.layout, self.group)
        self.tail_offset = self.head.nbytes
        self.tail_bytes = self.tail.nbytes
        self.nbytes = max(self.tail_offset + self.tail_bytes, whole.nbytes)  # a slot is reassembled in place
        self.segments = {**{f"head.{n}": s for n, s in self.head.segments.items()},
                         **{f"tail.{n}": Segment(s.name, s.dtype, s.shape, s.offset + self.tail_offset)
                            for n, s in self.tail.segments.items()}}
        self.cpu_kernel = self.head.cpu_kernel and self.tail.cpu_kernel
        both = self.head.cuda_tiles is not None and self.tail.cuda_tiles is not None
        self.cuda_tiles = whole.cuda_tiles if both else None
        self._head_spans = self.head.segment_spans()
        self._tail_spans = self.tail.segment_spans(self.tail_offset)

    def describe(self) -> dict:
        return {**self.whole.describe(), "record_bytes": self.nbytes, "bytes_per_param": self.nbytes / self.params,
                "cpu_split": {"head_units": self.split, "tail_units": self.intermediate - self.split,
                              "fraction": self.fraction, "tail_bytes": self.tail_bytes}}

    def head_of(self, record: torch.Tensor) -> torch.Tensor:
        return record[:self.tail_offset]

    def tail_of(self, record: torch.Tensor) -> torch.Tensor:
        return record[self.tail_offset:self.tail_offset + self.tail_bytes]

    def pack(self, tensors: ExpertTensors, out: torch.Tensor, work_device: torch.device) -> None:
        a = self.split
        self.head.pack(ExpertTensors(tensors.w1[:a], tensors.w3[:a], tensors.w2[:, :a]), self.head_of(out), work_device)
        self.tail.pack(ExpertTensors(tensors.w1[a:], tensors.w3[a:], tensors.w2[:, a:]), self.tail_of(out), work_device)

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsplit ``(w13, w2)`` of a record as the host stores it."""
        (h13, h2), (t13, t2) = self.head.weights(self.head_of(record), dtype), self.tail.weights(self.tail_of(record), dtype)
        a, b = self.split, self.intermediate - self.split
        return torch.cat([h13[:a], t13[:b], h13[a:], t13[b:]]), torch.cat([h2, t2], dim=1)

    def whole_k_pairs(self, record: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unsplit record's matrices re-paired along ``K`` (what tinygemm's converter reads) and its
        scales, from a split record on any device: ``w13.q``, ``w13.sz``, ``w2.q``, ``w2.sz``."""
        head, tail, a, b = self.head_of(record), self.tail_of(record), self.split, self.intermediate - self.split
        hq2, hsz2 = self.head._parts(head, "w2")
        tq2, tsz2 = self.tail._parts(tail, "w2")
        out = {"w2.q": torch.cat([int4.k_pairs(hq2, self.layout), int4.k_pairs(tq2, self.layout)], dim=1),
               "w2.sz": torch.cat([hsz2, tsz2])}
        hq13, hsz13 = self.head._parts(head, "w13")
        tq13, tsz13 = self.tail._parts(tail, "w13")
        out["w13.sz"] = torch.cat([hsz13[:, :a], tsz13[:, :b], hsz13[:, a:], tsz13[:, b:]], dim=1)
        hk, tk = int4.k_pairs(hq13, self.layout), int4.k_pairs(tq13, self.layout)
        out["w13.q"] = torch.cat([hk[:a], tk[:b], hk[a:], tk[b:]])
        return out

    def arrive(self, record: torch.Tensor) -> None:
        """On CUDA, the record becomes the unsplit format's tinygemm layout in place (every part is read
        before anything is written)."""
        if record.device.type != "cuda" or self.cuda_tiles is None:
            return
        parts = self.whole_k_pairs(record)
        for name, tiles in zip(("w13", "w2"), self.cuda_tiles):
            parts[f"{name}.q"] = torch.ops.aten._convert_weight_to_int4pack(parts[f"{name}.q"], tiles)
        for name, value in parts.items():
            self.whole.segments[name].view(record).view(-1).copy_(value.view(torch.uint8).view(-1)
                                                                  if name.endswith(".q") else value.view(-1))

    def relayouts_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.cuda_tiles is not None

    def forward(self, record: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if record.device.type == "cuda" and self.cuda_tiles is not None:  # reassembled by ``arrive``
            return self.whole.forward(record, x)
        return self.head.forward(self.head_of(record), x) + self.tail.forward(self.tail_of(record), x)

    def computes_in_place(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and self.cuda_tiles is not None

    def host_job(self, record: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        """A whole expert on the lane: head plus tail, weighted, as ``forward`` computes it on the CPU."""
        if record.device.type != "cpu" or not self.cpu_kernel:
            return super().host_job(record, x, weights, out)
        int4.cpu_expert_into()(record, record.view(int4.SCALE_DTYPE), [self._head_spans, self._tail_spans],
                               self.group, x, weights, out)

    def head_job(self, record: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        """A shared expert's lane part: ``out = head(x)``, unweighted (the GPU adds the tail, then weights)."""
        if record.device.type != "cpu" or not self.cpu_kernel:
            out.copy_(self.head.forward(self.head_of(record), x))
            return
        ones = torch.ones(x.shape[0], dtype=x.dtype)
        int4.cpu_expert_into()(record, record.view(int4.SCALE_DTYPE), [self._head_spans], self.group, x, ones, out)

    def prepare_host_job(self) -> None:
        self.whole.prepare_host_job()


QUANT_CHOICES = ("none", "bf16", "nf4", "int4")


def make_format(quant: str, hidden: int, intermediate: int, checkpoint_dtype: torch.dtype,
                cpu_split: float = 0.0) -> ExpertFormat:
    """``none`` keeps the checkpoint's dtype; ``bf16``, ``nf4`` and ``int4`` convert. ``cpu_split`` (int4
    only): the share of an expert the CPU lane computes when it shares one with the copy path
    (``SplitInt4Format``; 0: records are not split)."""
    if cpu_split and quant != "int4":
        raise SettingError(f"--cpu-split {cpu_split} needs --quant int4 (the format both lanes compute from); "
                           f"--quant {quant} has no CPU-lane kernel to share an expert with")
    if quant == "none":
        return DenseFormat(hidden, intermediate, checkpoint_dtype)
    if quant == "bf16":
        return DenseFormat(hidden, intermediate, torch.bfloat16)
    if quant == "nf4":
        return NF4Format(hidden, intermediate)
    if quant == "int4" and cpu_split:
        return SplitInt4Format(hidden, intermediate, cpu_split)
    if quant == "int4":
        return Int4Format(hidden, intermediate)
    raise SettingError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")

"""Grouped affine int4, laid out as torch's CPU int4 kernel reads it: quantize, pack, unpack.

The arithmetic of the ``int4`` expert format (``formats.Int4Format``), as ``nf4.py`` is NF4's.

**Quantization.** A weight ``W [N, K]`` (``N`` outputs, ``K`` inputs) is cut into groups of
``G`` consecutive inputs per output row. Each group keeps its minimum and maximum; its values
become ``q`` in 0..15 and come back as ``(q - 8) * scale + zero``, ``scale = (max - min) / 15``,
``zero = min + 8 * scale``. That is the convention of ``aten._weight_int4pack_mm_for_cpu``
(its kernels read a nibble as ``q - 8`` and compute ``(q - 8) * scale + zero`` in fp32; checked
numerically in ``tests/test_int4_format.py``) and of the CUDA ``_weight_int4pack_mm``, so the
same scales serve either kernel. ``scale`` and ``zero`` are stored in bf16, the dtype of the
kernel's fast path; ``q`` is chosen against the rounded values, so the stored parameters are
the ones the error is minimised for. Error: at most ``scale / 2`` per weight, plus the bf16
rounding of ``zero`` (``|zero| / 256``), which only matters for a group far from zero compared
with its width (then bf16 itself would lose as much).

**Layout, and why it is machine-dependent.** The values are stored once, as the bytes
``aten._convert_weight_to_int4pack_for_cpu`` produces: ``[N, K/2]`` uint8, but not plain
nibble pairs. The kernel (``aten/src/ATen/native/cpu/int4mm_kernel.cpp``) cuts ``N`` into
blocks of ``BLOCK_N = 4 * Vectorized<float>::size()`` rows, stores each block ``K``-major
(``[K, BLOCK_N/2]`` bytes) and pairs two rows per byte as its vector unpacking wants:

- AVX512 (``BLOCK_N`` 64): byte ``j`` of a ``k`` holds row ``j`` (low nibble) and row ``j+32``
  (high nibble) -- lanes 0|2 and 1|3, so one 256-bit load unpacks 64 rows;
- AVX2 (``BLOCK_N`` 32): row ``j`` and row ``j+16``;
- no vector unit (and any block shorter than ``BLOCK_N``, at the end of ``N``): adjacent rows
  ``2j`` and ``2j+1``.

So the bytes differ between an AVX512 and an AVX2 host (measured here: the same weights pack to
different bytes under ``ATEN_CPU_CAPABILITY=avx512``, ``avx2`` and ``default``). Storing plain
nibbles instead and converting per call is not an option: the converter takes ``int32 [N, K]``
(470 MB for one Mixtral ``w13``) and would cost far more than the 1.5 ms matmul it feeds, and a
second, converted copy per expert would double host memory. The decision: the record holds the
layout of *this host's* kernel, named (``CpuLayout``) and detected by packing a probe through the
kernel's own converter and matching it against the known layouts. The layout is part of the
format (``Int4Format.describe()``), so a record is the same bytes for the same weights, layout
and group; the GPU lane unpacks whichever layout the record names, with plain torch indexing
ops on any device. A host whose kernel layout matches none of the known ones still gets correct
records (AVX512 layout) and computes them by dequantize + linear, as the GPU lane does.

**Speed of the CPU kernel** (Mixtral-8x7B ``w1`` shape, ``14336 x 4096``, group 128, 1 token,
this 2-core AVX512 host): 1.6 ms with bf16 activations, 50 ms with fp32 activations (the fp32
path is the kernel's scalar fallback). So the CPU lane computes in bf16 whatever the caller's
dtype, and rounds activations to bf16 on the way in and the result on the way out.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import List

import torch

GROUP_SIZES = (128, 64, 32)  # largest first; the CPU kernel also takes 256, the CUDA kernel 32..256
SCALE_DTYPE = torch.bfloat16  # the dtype the CPU kernel's fast path reads scales and zeros in
_TINY_SCALE = 1e-12  # a constant group still gets a finite scale (its values land on q = 0)


def group_size_for(hidden: int, intermediate: int) -> int | None:
    """The largest of ``GROUP_SIZES`` dividing both input widths (``H`` for w13, ``I`` for w2)."""
    return next((g for g in GROUP_SIZES if hidden % g == 0 and intermediate % g == 0), None)


@dataclass(frozen=True)
class CpuLayout:
    """How the CPU kernel orders nibbles: blocks of ``block_n`` rows, each ``K``-major; within a full
    block byte ``j`` pairs rows ``j`` and ``j + block_n/2`` (``half``) or ``2j`` and ``2j+1``
    (``adjacent``); a shorter last block always pairs adjacent rows."""

    name: str
    block_n: int
    pairing: str  # "half" or "adjacent"


LAYOUTS = (
    CpuLayout("avx512", 64, "half"),
    CpuLayout("avx2", 32, "half"),
    CpuLayout("scalar32", 32, "adjacent"),  # ATEN_CPU_CAPABILITY=default on x86
    CpuLayout("scalar16", 16, "adjacent"),
    CpuLayout("scalar64", 64, "adjacent"),
)
LAYOUT_BY_NAME = {layout.name: layout for layout in LAYOUTS}
FALLBACK_LAYOUT = LAYOUT_BY_NAME["avx512"]  # the serving hosts' layout, for hosts whose kernel matches none


@functools.lru_cache(maxsize=None)
def _pairs(n: int, layout: CpuLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, hi, inverse)``: for each packed byte row (block-major), the rows in its low and high
    nibbles; ``inverse`` maps ``cat([lo, hi])`` order back to row order."""
    b = layout.block_n
    full, tail = divmod(n, b)
    j = torch.arange(b // 2)
    lo_in, hi_in = (j, j + b // 2) if layout.pairing == "half" else (2 * j, 2 * j + 1)
    starts = torch.arange(full) * b
    t = torch.arange(tail // 2) * 2 + full * b
    lo = torch.cat([(starts[:, None] + lo_in).flatten(), t])
    hi = torch.cat([(starts[:, None] + hi_in).flatten(), t + 1])
    inverse = torch.argsort(torch.cat([lo, hi]))
    return lo.to(device), hi.to(device), inverse.to(device)


def _blocks(n: int, layout: CpuLayout) -> tuple[int, int]:
    """Full blocks in ``n`` rows, and the byte rows they fill."""
    full = n // layout.block_n
    return full, full * layout.block_n // 2


def pack(q: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """Nibbles ``q [N, K]`` (uint8, 0..15) to the kernel's ``[N, K/2]`` bytes, on ``q``'s device."""
    n, k = q.shape
    lo, hi, _ = _pairs(n, layout, q.device)
    pairs = q.index_select(0, lo) | (q.index_select(0, hi) << 4)  # [N/2, K], byte rows in block order
    full, f = _blocks(n, layout)
    head = pairs[:f].view(full, layout.block_n // 2, k).transpose(1, 2).reshape(-1)
    tail = pairs[f:].t().reshape(-1)
    return torch.cat([head, tail]).view(n, k // 2)


def unpack(packed: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """The kernel's ``[N, K/2]`` bytes back to nibbles ``[N, K]`` (uint8), on ``packed``'s device."""
    n, k = packed.shape[0], packed.shape[1] * 2
    _, _, inverse = _pairs(n, layout, packed.device)
    flat = packed.reshape(-1)
    full, f = _blocks(n, layout)
    head = flat[:f * k].view(full, k, layout.block_n // 2).transpose(1, 2).reshape(f, k)
    tail = flat[f * k:].view(k, n // 2 - f).t()
    pairs = torch.cat([head, tail])  # [N/2, K]
    return torch.cat([pairs & 0xF, pairs >> 4]).index_select(0, inverse)


def quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] uint8 in 0..15, scales_and_zeros [K/G, N, 2] bf16)`` on the weight's device."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(_TINY_SCALE).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((w - z) / s + 8).clamp_(0, 15).to(torch.uint8).view(n, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def dequantize(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``(q - 8) * scale + zero`` in fp32 (as the kernels compute it), returned in ``dtype``."""
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1).contiguous()  # [N, K/G, 2]
    centered = q.view(n, k // group, group).float() - 8
    w = torch.addcmul(sz[..., 1:], centered, sz[..., :1])
    return w.reshape(n, k).to(dtype)


def weight(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, layout: CpuLayout,
           dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight a record segment computes with, on its device."""
    return dequantize(unpack(packed, layout), scales_and_zeros, group, dtype)


def cpu_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """``x @ W.T`` by the CPU kernel: activations rounded to bf16, fp32 accumulation, bf16 result in
    ``x``'s dtype. ``packed`` must be in this host's kernel layout (``host_layout()``)."""
    # bf16 spelled out, not ``SCALE_DTYPE``: TorchScript (``cpu_expert_into``) cannot read a dtype global
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, group, scales_and_zeros)
    return y.to(x.dtype)


def cuda_inner_k_tiles(k: int) -> int | None:
    """The CUDA kernel's ``innerKTiles`` for ``k`` inputs (largest of 8, 4, 2 with ``k % (16 t) == 0``)."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def k_pairs(packed: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """The CPU kernel's bytes ``[N, K/2]`` re-paired along ``K``: byte ``(n, m)`` holds input ``2m`` of
    row ``n`` in its high nibble and ``2m+1`` in its low one (what ``_convert_weight_to_int4pack`` reads).

    For a "half" layout whose blocks fill ``N`` this is a handful of elementwise ops on views
    (``_half_k_pairs``), fused into one kernel on CUDA (``_FUSED_HALF_K_PAIRS``); it runs on every
    copy into a GPU slot, where the general unpack (an index gather over twice the bytes) took about
    2 ms for a Mixtral expert. Other layouts take the general path."""
    n, _ = packed.shape
    if layout.pairing != "half" or n % layout.block_n:
        q = unpack(packed, layout)
        return ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()
    if packed.is_cuda:
        return _FUSED_HALF_K_PAIRS(packed, layout.block_n)
    return _half_k_pairs(packed, layout.block_n)


def _half_k_pairs(packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """``k_pairs`` of a "half" layout whose blocks fill ``N``: a block is ``[K, B/2]`` bytes, row ``j``
    in the low nibble and row ``j + B/2`` in the high one."""
    n, half_k = packed.shape
    blocks = packed.reshape(n // block_n, half_k, 2, block_n // 2)  # [block, m, input 2m or 2m+1, byte j]
    even, odd = blocks[:, :, 0], blocks[:, :, 1]
    first = ((even & 0xF) << 4) | (odd & 0xF)  # rows j of each block
    second = (even & 0xF0) | (odd >> 4)        # rows j + B/2
    return torch.stack([first, second], dim=1).permute(0, 1, 3, 2).reshape(n, half_k)


class _FusedOnCuda:
    """``_half_k_pairs`` compiled by ``torch.compile`` into one kernel, for CUDA tensors.

    Why: eagerly its eight elementwise passes and a transposing copy took 0.83 ms of the 0.98 ms
    relayout of one Mixtral-8x7B int4 expert on the H200 (the converter itself 0.14 ms), and the
    relayout of a layer's last copy delays that layer by all of it; compiled, 0.24 ms, and the whole
    relayout 0.33 ms (``benchmarks/diagnostics/relayout_cost.py``, 2026-12-02). The bytes are the
    same (tested on the GPU). Compiled at the first call per shape (a few seconds, once per process;
    ``TransferEngine`` makes that call when it is built); where compiling fails (no Triton, an old
    GPU), a warning says why and the eager ops run from then on. Only a compiler's failure does
    that: an error of the kernel's own run (out of memory, say) is raised as any op's would be."""

    def __init__(self):
        self._compiled, self.failed = None, None

    def __call__(self, packed: torch.Tensor, block_n: int) -> torch.Tensor:
        if self.failed is None:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(_half_k_pairs, dynamic=False)
                return self._compiled(packed, block_n)
            except Exception as exc:  # noqa: BLE001 -- torch.compile refusing, or dynamo/inductor failing
                if self._compiled is not None and not isinstance(exc, torch._dynamo.exc.TorchDynamoException):
                    raise
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
                warnings.warn(f"int4 relayout: torch.compile failed ({self.failed}); relaying copies with "
                              "eager torch ops (same bytes, about 0.7 ms more per Mixtral-size expert)", stacklevel=2)
        return _half_k_pairs(packed, block_n)


_FUSED_HALF_K_PAIRS = _FusedOnCuda()


def _cpu_part(record: torch.Tensor, halves: torch.Tensor, segments: List[List[int]], group: int,
              x: torch.Tensor) -> torch.Tensor:
    """One record part's SwiGLU output by the CPU kernel: ``segments`` are ``[offset, bytes, dim 0, dim 1]``
    of its ``w13.q``, ``w13.sz``, ``w2.q``, ``w2.sz`` (``halves``: the record's bytes viewed as bf16, as
    TorchScript cannot reinterpret a dtype)."""
    o, b, r, c = segments[0]
    w13 = record.narrow(0, o, b).view(r, c)
    o, b, r, c = segments[1]
    sz13 = halves.narrow(0, o // 2, b // 2).view(r, c, 2)
    o, b, r, c = segments[2]
    w2 = record.narrow(0, o, b).view(r, c)
    o, b, r, c = segments[3]
    sz2 = halves.narrow(0, o // 2, b // 2).view(r, c, 2)
    gate, up = cpu_linear(x, w13, sz13, group).chunk(2, -1)
    return cpu_linear(torch.nn.functional.silu(gate) * up, w2, sz2, group)


def _cpu_expert_into(record: torch.Tensor, halves: torch.Tensor, parts: List[List[List[int]]], group: int,
                     x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """``out = expert(x) * weights[:, None]`` by the CPU kernel from an int4 record whose expert is the sum
    of ``parts`` (one for a whole record; a split record's head and tail, ``SplitInt4Format``), summed in
    their order: the same ops, in the same order, as the format's ``forward`` on the CPU and the lane's
    weighting."""
    y = _cpu_part(record, halves, parts[0], group, x)
    for i in range(1, len(parts)):
        y = y + _cpu_part(record, halves, parts[i], group, x)
    out.copy_(y * weights[:, None].to(x.dtype))


@functools.lru_cache(maxsize=None)
def cpu_expert_into():
    """``_cpu_expert_into`` under TorchScript, which runs the whole graph without taking the GIL.

    Why TorchScript (deprecated since torch 2.13, and still the one torch mechanism that runs a graph
    of ops with the GIL released throughout): the CPU lane's thread runs beside the host thread, which
    runs Python while the lane computes (``stream_gate``). Called op by op, the job takes the GIL back
    after each of its ~25 ops, waiting up to the switch interval each time the host thread holds it:
    one int4 Mixtral-8x7B expert took 2.71 ms alone and 5.78 ms beside a thread running Python on the
    H200's 16-core host at a 0.1 ms interval; as one TorchScript call, 1.78 and 3.44 ms (2026-12-02,
    ``benchmarks/diagnostics/lane_gil.py``). Where scripting fails, the plain function runs (same
    ops, same bytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_cpu_expert_into)
    except Exception as exc:  # noqa: BLE001 -- TorchScript removed or refusing: the eager function is the same math
        warnings.warn(f"CPU lane: TorchScript unavailable ({type(exc).__name__}); lane jobs run op by op, "
                      "slower while the host thread runs Python", stacklevel=2)
        return _cpu_expert_into


def to_cuda_layout(packed: torch.Tensor, layout: CpuLayout, inner_k_tiles: int) -> torch.Tensor:
    """A record segment's CPU-kernel bytes ``[N, K/2]`` (on a CUDA device) as the CUDA kernel's packed
    ``int32 [N/8, K/(16 t), 32, t/2]`` (the same number of bytes): re-paired along ``K``, converted."""
    return torch.ops.aten._convert_weight_to_int4pack(k_pairs(packed, layout), inner_k_tiles)


def cuda_linear(x: torch.Tensor, converted: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                shape: tuple[int, int], inner_k_tiles: int) -> torch.Tensor:
    """``x @ W.T`` by torch's CUDA int4 kernel (tinygemm) from a segment ``to_cuda_layout`` wrote in
    place (``converted``: its ``uint8`` bytes); bf16 activations, result in ``x``'s dtype."""
    n, k = shape
    w = converted.view(torch.int32).view(n // 8, k // (16 * inner_k_tiles), 32, inner_k_tiles // 2)
    y = torch.ops.aten._weight_int4pack_mm(x.to(SCALE_DTYPE).contiguous(), w, group, scales_and_zeros)
    return y.to(x.dtype)


def _kernel_pack(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


@functools.lru_cache(maxsize=None)
def host_layout() -> CpuLayout | None:
    """The layout this process's CPU kernel uses, found by packing a probe with the kernel's own
    converter; ``None`` when the op is missing or its bytes match none of ``LAYOUTS``.

    112 rows: a full block and a short one for every block size (64 + 48, 3 x 32 + 16, 7 x 16);
    4 inputs, so the ``K``-major order within a block is checked too.
    """
    probe = torch.randint(0, 16, (112, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    try:
        expected = _kernel_pack(probe)
    except (AttributeError, RuntimeError):
        return None
    return next((layout for layout in LAYOUTS if torch.equal(pack(probe, layout), expected)), None)


def kernel_agrees(rows: int, layout: CpuLayout) -> bool:
    """Whether the CPU kernel's converter packs ``rows`` rows as ``layout`` says (a probe of 4 inputs)."""
    probe = torch.randint(0, 16, (rows, 4), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    try:
        return torch.equal(pack(probe, layout), _kernel_pack(probe))
    except (AttributeError, RuntimeError):
        return False

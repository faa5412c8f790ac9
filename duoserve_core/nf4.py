"""NF4 through bitsandbytes' functional API: quantize, dequantize, matmul from raw tensors.

Blocksize 64, fp32 absmax, not nested: 0.5625 bytes per parameter. The functional API is used
rather than ``Linear4bit`` because the lab keeps the packed bytes in its own buffers (expert
records, slots) and builds the ``QuantState`` around views of them: ``QuantState.to()`` blocks
and ``Linear4bit`` repacks weights on the CPU.
"""

from __future__ import annotations

import logging

import torch

BLOCKSIZE = 64

# On CPUs with AVX512-BF16, importing bitsandbytes warns that an optional kernel hub package is
# missing; the lab computes on the CPU by dequantize + linear and never needs it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_codes: dict[torch.device, torch.Tensor] = {}


def packed_shapes(numel: int) -> tuple[tuple[int, int], tuple[int]]:
    """Shapes of the packed 4-bit data and of the absmax of a ``numel``-element tensor."""
    return ((numel + 1) // 2, 1), (-(-numel // BLOCKSIZE),)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8, absmax fp32)`` on the weight's device."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4")
    return q, state.absmax


def state(absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype):
    from bitsandbytes.functional import QuantState, get_4bit_type

    dev = absmax.device
    if dev not in _codes:
        _codes[dev] = get_4bit_type("nf4", device=dev)
    return QuantState(absmax=absmax, shape=torch.Size(shape), code=_codes[dev], blocksize=BLOCKSIZE,
                      quant_type="nf4", dtype=dtype)


def dequantize(q: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(q, state(absmax, shape, dtype))


def linear(x: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x @ W.T`` for the NF4 weight ``W [out, in]``: bitsandbytes' kernels on CUDA, dequantize + linear elsewhere."""
    if q.device.type != "cuda":
        return torch.nn.functional.linear(x, dequantize(q, absmax, shape, x.dtype))
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, q.t(), quant_state=state(absmax, shape, x.dtype))


class NF4Linear(torch.nn.Module):
    """A bias-free ``nn.Linear`` whose weight is stored in NF4 (attention projections)."""

    def __init__(self, out_features: int, in_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.shape = (out_features, in_features)
        q_shape, absmax_shape = packed_shapes(out_features * in_features)
        self.register_buffer("q", torch.empty(q_shape, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(absmax_shape, dtype=torch.float32, device=device))

    def load(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` on this module's device into its buffers."""
        q, absmax = quantize(weight.to(self.q.device))
        self.q.copy_(q)
        self.absmax.copy_(absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.q, self.absmax, self.shape)

    def extra_repr(self) -> str:
        return f"out_features={self.shape[0]}, in_features={self.shape[1]}, nf4"

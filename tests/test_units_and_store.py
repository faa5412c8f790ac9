"""Sizes, the pinned-chunk plan of the host store, and expert record formats."""

from __future__ import annotations

import pytest
import torch

from duoserve_core.checkpoint import ExpertTensors
from duoserve_core.experts.formats import DenseFormat, NF4Format, make_format
from duoserve_core.experts.host_store import HostExpertStore, plan_chunks
from duoserve_core.units import format_bytes, parse_bytes

MIB = 2**20


@pytest.mark.parametrize("text,expected", [("12GiB", 12 * 2**30), ("4.5GB", 4_500_000_000), ("800MiB", 800 * MIB),
                                           ("1e9", 10**9), (1234, 1234), ("15%", 150)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text, percent_of=1000) == expected


def test_parse_bytes_rejects_nonsense():
    with pytest.raises(ValueError, match="cannot read size"):
        parse_bytes("12 parsecs")
    with pytest.raises(ValueError, match="percentage"):
        parse_bytes("15%")
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_chunk_plan_for_mixtral_8x7b_nf4_wastes_little():
    record = int(94.5 * MIB)
    size, counts = plan_chunks(record, 256)
    assert sum(counts) == 256
    allocated = sum(1 << max(0, (c * record - 1).bit_length()) for c in counts)
    assert allocated / (256 * record) < 1.05          # vs 1.33 for one pinned allocation of everything
    assert len(counts) < 16                            # a few large buffers, not one per expert
    assert size & (size - 1) == 0


def test_host_store_records_are_disjoint_and_addressable():
    store = HostExpertStore(num_layers=3, num_experts=5, record_bytes=1000, pin=False)
    for l in range(3):
        for e in range(5):
            store.record(l, e).fill_(l * 5 + e)
    for l in range(3):
        for e in range(5):
            rec = store.record(l, e)
            assert rec.numel() == 1000 and bool((rec == l * 5 + e).all())
    assert store.nbytes == 15_000 and store.allocated_bytes >= store.nbytes


def _expert(h=64, i=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ExpertTensors(w1=torch.randn(i, h, generator=g), w3=torch.randn(i, h, generator=g),
                         w2=torch.randn(h, i, generator=g))


def test_dense_record_round_trip_and_forward():
    fmt = DenseFormat(64, 128, torch.float32)
    rec = torch.empty(fmt.nbytes, dtype=torch.uint8)
    t = _expert()
    fmt.pack(t, rec, torch.device("cpu"))
    x = torch.randn(5, 64)
    expected = (torch.nn.functional.silu(x @ t.w1.T) * (x @ t.w3.T)) @ t.w2.T
    torch.testing.assert_close(fmt.forward(rec, x), expected)


def test_nf4_record_holds_what_bitsandbytes_produces():
    import bitsandbytes.functional as bnbf

    fmt = NF4Format(64, 128)
    rec = torch.empty(fmt.nbytes, dtype=torch.uint8)
    t = _expert()
    fmt.pack(t, rec, torch.device("cpu"))
    q, state = bnbf.quantize_4bit(t.w2, blocksize=64, quant_type="nf4")
    assert torch.equal(fmt.segments["w2.q"].view(rec), q)
    w13, w2 = fmt.weights(rec, torch.float32)
    torch.testing.assert_close(w2, bnbf.dequantize_4bit(q, state))
    assert 0.5625 <= fmt.nbytes / fmt.params < 0.6


def test_make_format_rejects_unknown_quant():
    with pytest.raises(ValueError, match="unknown --quant"):
        make_format("int3", 64, 128, torch.float32)

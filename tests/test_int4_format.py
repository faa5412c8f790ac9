"""The int4 expert format: its arithmetic, its record layout, and both lanes computing from one record.

The CPU lane runs torch's int4 kernel on the record; the GPU lane unpacks the same bytes with torch
ops and computes dequantize + linear (``ExpertFormat.forward``), which is testable on the CPU: the
two must agree, and the kernel must read the bytes as the unpacking does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import duoserve_core
from duoserve_core.checkpoint import ExpertTensors
from duoserve_core.errors import SettingError
from duoserve_core.experts import int4
from duoserve_core.experts.formats import ExpertFormat, Int4Format, NF4Format, make_format

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "small-moe"
HOST = int4.host_layout()
needs_kernel = pytest.mark.skipif(HOST is None, reason="this host's torch has no recognised CPU int4 kernel layout")

# (hidden, intermediate): the bundled model's widths (group 64) and widths that get group 128.
SHAPES = [(256, 192), (512, 384)]


def _expert(hidden: int, intermediate: int, seed: int = 0) -> ExpertTensors:
    g = torch.Generator().manual_seed(seed)
    return ExpertTensors(*(torch.randn(shape, generator=g) * 0.02
                           for shape in [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]))


def _packed(fmt: ExpertFormat, tensors: ExpertTensors) -> torch.Tensor:
    record = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(tensors, record, torch.device("cpu"))
    return record


def test_group_size_is_the_largest_that_divides_both_widths():
    assert int4.group_size_for(4096, 14336) == 128  # Mixtral-8x7B
    assert int4.group_size_for(256, 192) == 64  # the bundled model
    assert int4.group_size_for(64, 96) == 32  # the tests' tiny checkpoint
    assert int4.group_size_for(100, 50) is None
    assert make_format("int4", 256, 192, torch.bfloat16).describe()["group_size"] == 64


def test_widths_no_group_divides_are_refused_with_the_fix():
    with pytest.raises(SettingError, match=r"hidden_size 48 and intermediate_size 80.*--quant nf4"):
        make_format("int4", 48, 80, torch.bfloat16)


def test_record_sizes():
    """Half a byte per value plus a bf16 scale and zero per group: 0.5 + 4/G bytes per parameter."""
    mixtral = make_format("int4", 4096, 14336, torch.bfloat16)
    assert mixtral.nbytes == 3 * 4096 * 14336 // 2 + 4 * (4096 // 128 * 2 * 14336 + 14336 // 128 * 4096)
    assert mixtral.nbytes / mixtral.params == 0.5 + 4 / 128  # every segment is already 64-byte aligned
    assert mixtral.nbytes < NF4Format(4096, 14336).nbytes  # 89.25 MiB against NF4's 94.5 MiB
    bundled = make_format("int4", 256, 192, torch.bfloat16)
    assert bundled.nbytes / bundled.params == 0.5 + 4 / 64


def test_round_trip_error_is_within_half_a_step():
    """Each weight comes back within half its group's step (range / 15), plus the bf16 roundings of
    scale and zero; and the quantizer really uses all 16 levels."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(384, 256, generator=g) * 0.02 + torch.randn(384, 1, generator=g) * 0.01  # rows off-centre
    q, sz = int4.quantize(w, 64)
    assert q.dtype == torch.uint8 and sz.shape == (256 // 64, 384, 2) and sz.dtype == torch.bfloat16
    err = (int4.dequantize(q, sz, 64, torch.float32) - w).abs().view(384, 4, 64).amax(-1)  # [N, groups]
    scale, zero = sz[..., 0].float().t(), sz[..., 1].float().t()
    assert torch.all(err <= 0.5 * scale + scale / 32 + zero.abs() / 256)
    rng = w.view(384, 4, 64).amax(-1) - w.view(384, 4, 64).amin(-1)
    assert err.max() <= rng.max() / 30 * 1.1
    assert q.min() == 0 and q.max() == 15


def test_a_constant_group_comes_back_unchanged():
    w = torch.full((16, 64), 0.125)
    q, sz = int4.quantize(w, 64)
    assert torch.equal(int4.dequantize(q, sz, 64, torch.float32), w)


@pytest.mark.parametrize("layout", int4.LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("rows", [16, 48, 112, 384])
def test_pack_and_unpack_are_inverse_for_every_layout(layout, rows):
    q = torch.randint(0, 16, (rows, 8), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    packed = int4.pack(q, layout)
    assert packed.shape == (rows, 4) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack(packed, layout), q)


@needs_kernel
@pytest.mark.parametrize("rows", [16, 48, 112, 256, 384, 28672])
def test_our_packing_is_the_kernels_packing(rows):
    """The record holds exactly the bytes torch's converter would produce for this host."""
    q = torch.randint(0, 16, (rows, 6), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    assert torch.equal(int4.pack(q, HOST), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


_OTHER_HOST = textwrap.dedent("""
    import torch
    from duoserve_core.checkpoint import ExpertTensors
    from duoserve_core.experts import int4
    from duoserve_core.experts.formats import ExpertFormat, Int4Format
    fmt = Int4Format(256, 192)
    g = torch.Generator().manual_seed(0)
    t = ExpertTensors(*(torch.randn(s, generator=g) * 0.02 for s in [(192, 256), (192, 256), (256, 192)]))
    rec = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(t, rec, torch.device("cpu"))
    q, sz = fmt._parts(rec, "w13")
    x = torch.randn(3, 256, generator=g)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, fmt.group, sz.float())
    ours = x @ fmt.weights(rec, torch.float32)[0].T
    print(int4.host_layout().name, fmt.cpu_kernel, float((kernel - ours).abs().max() / ours.abs().max()))
""")


@needs_kernel
@pytest.mark.parametrize("capability, layout", [("avx2", "avx2"), ("default", "scalar32")])
def test_other_hosts_layouts_are_recognised_and_read_back(capability, layout):
    """An AVX2 host or one without vectors packs differently; the format names that layout, and the
    kernel there reads the record as the GPU lane's unpacking does (torch is told to run as such a host)."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU cannot run the AVX2 kernel")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", _OTHER_HOST], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == [layout, "True"]
    assert float(out[2]) < 1e-5


@needs_kernel
@pytest.mark.parametrize("hidden, intermediate", SHAPES)
def test_kernel_reads_the_record_as_the_unpacking_does(hidden, intermediate):
    """In fp32 (the kernel's exact path: fp32 activations, scales and accumulation) the CPU kernel on
    the record's bytes equals the GPU lane's dequantize + linear to fp32 rounding."""
    fmt = Int4Format(hidden, intermediate)
    record = _packed(fmt, _expert(hidden, intermediate))
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(2))
    w13, w2 = fmt.weights(record, torch.float32)
    for name, inputs, w in (("w13", x, w13), ("w2", x[:, :intermediate].contiguous(), w2)):
        q, sz = fmt._parts(record, name)
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(inputs, q, fmt.group, sz.float())
        torch.testing.assert_close(kernel, F.linear(inputs, w), rtol=1e-5, atol=1e-5 * w.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 4, 16])
@pytest.mark.parametrize("hidden, intermediate", SHAPES)
def test_cpu_lane_agrees_with_the_gpu_lanes_arithmetic(hidden, intermediate, tokens):
    """The CPU lane (kernel, bf16 activations) against dequantize + linear in fp32 from the same
    record: they differ by the bf16 roundings of the input, the gate-up output and the result,
    a few parts in a thousand (norm-relative; 1e-2 allowed)."""
    fmt = Int4Format(hidden, intermediate)
    assert fmt.cpu_kernel
    record = _packed(fmt, _expert(hidden, intermediate))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16).float()
    got = fmt.forward(record, x)
    want = ExpertFormat.forward(fmt, record, x)  # what a CUDA record computes: unpack, dequantize, linear
    assert got.dtype == x.dtype and got.shape == (tokens, hidden)
    assert (got - want).norm() / want.norm() < 1e-2
    got_bf16 = fmt.forward(record, x.to(torch.bfloat16))
    assert got_bf16.dtype == torch.bfloat16 and (got_bf16.float() - want).norm() / want.norm() < 1e-2


def test_a_record_in_another_layout_computes_by_unpacking():
    """A format whose layout is not this host's kernel's still computes its own bytes correctly."""
    other = next(layout for layout in int4.LAYOUTS if layout != HOST)
    fmt, ours = Int4Format(256, 192, layout=other), Int4Format(256, 192)
    assert not fmt.cpu_kernel
    t = _expert(256, 192)
    a, b = _packed(fmt, t), _packed(ours, t)
    assert not torch.equal(a, b)  # other bytes...
    for wa, wb in zip(fmt.weights(a, torch.float32), ours.weights(b, torch.float32)):
        assert torch.equal(wa, wb)  # ...the same weights
    x = torch.randn(4, 256)
    torch.testing.assert_close(fmt.forward(a, x), ExpertFormat.forward(ours, b, x))


def test_pack_is_deterministic():
    fmt, t = Int4Format(256, 192), _expert(256, 192)
    assert torch.equal(_packed(fmt, t), _packed(fmt, t))
    assert torch.equal(_packed(fmt, t), _packed(fmt, ExpertTensors(*(w.clone() for w in (t.w1, t.w3, t.w2)))))


# -- end to end on the bundled model ---------------------------------------------------------------

PROMPT = "The following functions are available"


@pytest.fixture(scope="module")
def int4_resident():
    rt = duoserve_core.load(MODEL, device="cpu", quant="int4", policy="resident", max_context=128)
    return rt, rt.generate(PROMPT, max_new_tokens=10, stop_at_eos=False, return_logits=True)


@needs_kernel
def test_bundled_model_in_int4_schedules_do_not_change_tokens(int4_resident):
    rt, expected = int4_resident
    assert rt.format.describe()["group_size"] == 64 and rt.format.cpu_kernel
    tight = rt.plan.fixed_bytes + 2 * rt.format.nbytes
    small = duoserve_core.load(MODEL, device="cpu", quant="int4", memory_budget=tight, max_context=128)
    got = small.generate(PROMPT, max_new_tokens=10, stop_at_eos=False, return_logits=True)
    assert got.expert_misses > 0
    assert got.tokens == expected.tokens
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))


def test_bundled_model_in_int4_stays_close_to_bf16(int4_resident):
    """The prompt's next-token logits against bf16 experts: 3.7% norm-relative measured (NF4: 4.4%);
    10% allowed, and the same first token."""
    _, ours = int4_resident
    bf16 = duoserve_core.load(MODEL, device="cpu", quant="bf16", policy="resident", max_context=128)
    ref = bf16.generate(PROMPT, max_new_tokens=1, stop_at_eos=False, return_logits=True)
    assert ours.tokens[0] == ref.tokens[0]
    assert (ours.logits[0] - ref.logits[0]).norm() / ref.logits[0].norm() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(256, 512), (4096, 14336)])
def test_cuda_lane_after_arrival_matches_the_host_record(shape):
    """A record copied to the GPU and relaid for the CUDA kernel (``arrive``) computes what its host bytes
    say: tinygemm against dequantize + linear of the host record, bf16, 1 and 16 tokens."""
    hidden, intermediate = shape
    fmt = make_format("int4", hidden, intermediate, torch.bfloat16)
    assert fmt.cuda_tiles is not None
    record = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(_expert(hidden, intermediate), record, torch.device("cpu"))
    slot = record.to("cuda")
    fmt.arrive(slot)
    w13, w2 = (w.to("cuda", torch.float32) for w in fmt.weights(record, torch.float32))
    for tokens in (1, 16):
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to("cuda", torch.bfloat16)
        gate, up = F.linear(x.float(), w13).chunk(2, dim=-1)
        want = F.linear(F.silu(gate) * up, w2)
        got = fmt.forward(slot, x).float()
        assert (got - want).norm() / want.norm() < 0.02, tokens


@pytest.mark.parametrize("layout", int4.LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("rows", [128, 112])
def test_k_pairs_repairs_any_layout_along_k(layout, rows):
    """The GPU lane's relayout input: pairs along K from the CPU kernel's bytes, fast path or general."""
    q = torch.randint(0, 16, (rows, 8), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    want = (q[:, ::2] << 4) | q[:, 1::2]
    assert torch.equal(int4.k_pairs(int4.pack(q, layout), layout), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [layout for layout in int4.LAYOUTS if layout.pairing == "half"], ids=lambda l: l.name)
def test_k_pairs_fused_on_cuda_gives_the_eager_bytes(layout):
    """On CUDA the fast path runs compiled (``int4._FusedOnCuda``); its bytes are the eager ops', on
    Mixtral-8x7B's w2 shape and a small one, and it did compile (no fallback)."""
    for rows, cols in ((256, 512), (4096, 14336)):
        q = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
        packed = int4.pack(q, layout).cuda()
        assert torch.equal(int4.k_pairs(packed, layout).cpu(), int4._half_k_pairs(packed.cpu(), layout.block_n))
    assert int4._FUSED_HALF_K_PAIRS.failed is None


@needs_kernel
@pytest.mark.parametrize("dtype,tokens", [(torch.float32, 3), (torch.bfloat16, 1), (torch.float32, 16)])
def test_lane_job_in_torchscript_is_the_forward_bit_for_bit(dtype, tokens):
    """The CPU lane's job runs as one TorchScript call (no GIL between its ops); it computes exactly what
    ``forward`` and the weighting compute op by op, repeated calls included (TorchScript optimizes a graph
    after its first runs; a fusion there would change the bits)."""
    hidden, intermediate = 256, 512
    fmt = make_format("int4", hidden, intermediate, torch.float32)
    assert fmt.cpu_kernel
    record = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(_expert(hidden, intermediate), record, torch.device("cpu"))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    weights = torch.rand(tokens, generator=torch.Generator().manual_seed(1))
    want = fmt.forward(record, x) * weights[:, None].to(dtype)
    assert isinstance(int4.cpu_expert_into(), torch.jit.ScriptFunction)
    for _ in range(5):
        out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
        fmt.host_job(record, x, weights, out)
        assert torch.equal(out, want)


@needs_kernel
def test_the_lane_job_is_scripted_when_the_worker_is_built_not_in_its_first_job():
    """Compiling the job inside the lane's first job stalled a GPU run (the compute stream waited for that
    job's post, 2026-12-02): a worker builds it on the caller's thread."""
    from duoserve_core.experts.host_lane import HostLaneWorker
    int4.cpu_expert_into.cache_clear()
    worker = HostLaneWorker(make_format("int4", 256, 512, torch.float32), threads=1)
    try:
        assert int4.cpu_expert_into.cache_info().currsize == 1
    finally:
        worker.close()


def test_a_relayout_whose_compile_fails_warns_and_gives_the_eager_bytes(monkeypatch):
    """Where ``torch.compile`` cannot build the fused relayout (no Triton, an old GPU), the eager ops run,
    with a warning naming the failure, and the bytes are the same."""
    def refuse(fn, **kwargs):
        raise RuntimeError("no backend here")
    monkeypatch.setattr(torch, "compile", refuse)
    fused = int4._FusedOnCuda()
    layout = int4.LAYOUT_BY_NAME["avx512"]
    packed = int4.pack(torch.randint(0, 16, (128, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8), layout)
    with pytest.warns(UserWarning, match="no backend here"):
        got = fused(packed, layout.block_n)
    assert torch.equal(got, int4._half_k_pairs(packed, layout.block_n))
    assert fused.failed == "RuntimeError: no backend here"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert torch.equal(fused(packed, layout.block_n), got)


def test_a_fused_relayout_whose_run_fails_raises_and_stays_compiled():
    """Only a compiler's failure turns the fused relayout off; an error of the compiled kernel's run (out
    of memory, say) is raised as any op's would be, and the next call tries the compiled kernel again."""
    fused = int4._FusedOnCuda()
    def out_of_memory(packed, block_n):
        raise torch.OutOfMemoryError("no room for the relayout's temporaries")
    fused._compiled = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        fused(torch.zeros(64, 4, dtype=torch.uint8), 64)
    assert fused.failed is None and fused._compiled is out_of_memory


def test_only_a_format_that_relays_a_landed_record_gets_the_relayout_stream():
    """Int4 re-packs a landed record for tinygemm on a GPU; NF4, bf16 and int4 on the CPU compute the copied
    bytes as they are, so their copies skip the relayout stream's wait, event and timeline span (on the
    H200 every NF4 copy made that hop for a no-op ``arrive`` until 2026-12-01)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    int4_fmt = make_format("int4", 256, 512, torch.bfloat16)
    assert int4_fmt.relayouts_on(gpu) == (int4_fmt.cuda_tiles is not None) and not int4_fmt.relayouts_on(cpu)
    for quant in ("nf4", "bf16", "none"):
        assert not make_format(quant, 256, 512, torch.bfloat16).relayouts_on(gpu), quant
    rt = duoserve_core.load("synthetic:tiny", device="cpu", quant="int4", num_layers=2, memory_budget="4slots")
    assert rt.engine.arrive is None
    assert rt.generate(prompt_ids=[4, 5, 6], max_new_tokens=3, stop_at_eos=False).tokens

"""A shared expert (``--cpu-split``): int4 records laid out as a head and a tail
(``experts.formats.SplitInt4Format``), the lane computing the head while the copy path moves the tail.

On the CPU the split record is computed as head plus tail everywhere, so every schedule (lane off, all,
half; shared experts or not) gives the all-resident run's bits; on a GPU a whole record is reassembled
into the unsplit layout before tinygemm reads it (checked byte for byte on the CPU, and on the GPU where
there is one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import duoserve_core
from duoserve_core.checkpoint import ExpertTensors
from duoserve_core.errors import KnobError, SettingError
from duoserve_core.experts import int4
from duoserve_core.experts.formats import Int4Format, SplitInt4Format, make_format
from duoserve_core.memory import workspace_bytes
from duoserve_core.policy import PolicyKnobs
from duoserve_core.policy.host_lane import HostLane, LaneCosts

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "small-moe"
MS = 1e-3
needs_kernel = pytest.mark.skipif(int4.host_layout() is None, reason="no recognised CPU int4 kernel layout")


def _expert(hidden: int, intermediate: int, seed: int = 0) -> ExpertTensors:
    g = torch.Generator().manual_seed(seed)
    return ExpertTensors(*(torch.randn(shape, generator=g) * 0.02
                           for shape in [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]))


def _packed(fmt, tensors: ExpertTensors) -> torch.Tensor:
    record = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(tensors, record, torch.device("cpu"))
    return record


@pytest.mark.parametrize("hidden, intermediate, fraction, head", [(256, 384, 0.5, 256), (256, 384, 0.75, 256),
                                                                   (256, 192, 0.5, 128), (512, 1024, 0.8, 768)])
def test_the_head_is_a_whole_number_of_groups(hidden, intermediate, fraction, head):
    fmt = make_format("int4", hidden, intermediate, torch.float32, cpu_split=fraction)
    assert isinstance(fmt, SplitInt4Format) and fmt.split == head and fmt.split % fmt.group == 0
    assert fmt.fraction == head / intermediate and fmt.tail_bytes == fmt.tail.nbytes
    assert fmt.nbytes >= Int4Format(hidden, intermediate).nbytes  # a slot can hold the reassembled record


def test_a_split_that_leaves_a_part_empty_or_another_format_is_refused_with_the_fix():
    with pytest.raises(SettingError, match="between"):
        make_format("int4", 256, 192, torch.float32, cpu_split=0.1)  # 3 groups of 64: a head of 0
    with pytest.raises(SettingError, match="needs --quant int4"):
        make_format("nf4", 256, 192, torch.float32, cpu_split=0.5)
    with pytest.raises(KnobError, match="cpu split 1"):
        PolicyKnobs(cpu_split=1.0)


def test_the_split_keeps_the_unsplit_values():
    """Same quantized values: the dense weights agree exactly, and the reassembly (what ``arrive`` converts on
    a GPU) gives the unsplit record's re-paired bytes and scales."""
    tensors = _expert(256, 384)
    whole, split = Int4Format(256, 384), make_format("int4", 256, 384, torch.float32, cpu_split=0.5)
    a, b = _packed(whole, tensors), _packed(split, tensors)
    for got, want in zip(split.weights(b, torch.float32), whole.weights(a, torch.float32)):
        assert torch.equal(got, want)
    repaired = split.whole_k_pairs(b)
    for name in ("w13", "w2"):
        q, sz = whole._parts(a, name)
        assert torch.equal(repaired[f"{name}.q"], int4.k_pairs(q, whole.layout))
        assert torch.equal(repaired[f"{name}.sz"], sz)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 5])
def test_the_lane_jobs_and_the_forward_are_head_plus_tail(tokens):
    """A whole lane job, the forward, and a shared expert (head on the lane, tail from its own bytes, summed
    then weighted as the executor does) give the same bits; the unsplit expert differs by rounding only."""
    split = make_format("int4", 256, 384, torch.float32, cpu_split=0.5)
    record = _packed(split, _expert(256, 384, seed=tokens))
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(1))
    weights = torch.rand(tokens, generator=torch.Generator().manual_seed(2))
    whole_job, head = torch.empty(tokens, 256), torch.empty(tokens, 256)
    split.host_job(record, x, weights, whole_job)
    split.head_job(record, x, head)
    tail = split.tail.forward(split.tail_of(record), x)
    assert torch.equal(whole_job, split.forward(record, x) * weights[:, None])
    assert torch.equal((tail + head) * weights[:, None], whole_job)
    unsplit = Int4Format(256, 384)
    plain = unsplit.forward(_packed(unsplit, _expert(256, 384, seed=tokens)), x) * weights[:, None]
    assert (plain - whole_job).norm() / plain.norm() < 0.01


def test_the_plan_holds_the_tail_buffer_and_the_reassembly():
    split = make_format("int4", 4096, 14336, torch.bfloat16, cpu_split=0.75)
    plain = Int4Format(4096, 14336)
    w13 = plain.segments["w13.q"].nbytes
    assert workspace_bytes(split, torch.bfloat16, "cuda") == 5 * w13 // 2 + split.tail_bytes
    assert workspace_bytes(split, torch.float32, "cpu") == split.tail_bytes
    assert split.tail_bytes == pytest.approx(plain.nbytes / 4, rel=0.01)


# -- the decision -------------------------------------------------------------------------------
def _costs(host_ms: float, copy_ms: float) -> LaneCosts:
    return LaneCosts(copy_s=copy_ms * MS, host_s=lambda tokens: host_ms * MS * tokens)


def test_auto_shares_the_lanes_expert_when_the_layer_then_ends_sooner():
    """Two misses: one copied, one on the lane (2.8 ms against a 1.9 ms copy); sharing 80% of the lane's
    expert ends both paths near 2.3 ms, so it is shared; at 30% the copy path would end later: not shared."""
    misses, nothing_held = [(2, 1), (5, 1)], (lambda e: False)
    plain = HostLane("auto", _costs(2.8, 1.9)).choose(misses, nothing_held, queued=0)
    assert len(plain.host) == 1 and plain.shared is None
    shared = HostLane("auto", _costs(2.8, 1.9), split=0.8).choose(misses, nothing_held, queued=0)
    assert shared.host == set() and shared.shared in {2, 5}
    assert HostLane("auto", _costs(2.8, 1.9), split=0.3).choose(misses, nothing_held, queued=0).shared is None
    # one miss, copied: the lane has nothing to share
    assert HostLane("auto", _costs(2.8, 1.9), split=0.8).choose([(2, 1)], nothing_held, 0).shared is None


def test_forced_modes_share_their_lowest_expert():
    needed = [(e, 1) for e in range(4)]
    choice = HostLane("all", split=0.5).choose(needed, lambda e: False, 0)
    assert choice.shared == 0 and choice.host == {1, 2, 3}
    assert HostLane("all").choose(needed, lambda e: False, 0).shared is None


# -- tokens never change ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime():
    return duoserve_core.load(MODEL, device="cpu", quant="int4", memory_budget="6slots", max_context=64, cpu_split=0.5)


@needs_kernel
@pytest.mark.parametrize("policy", ["on-demand", "lru"])
@pytest.mark.parametrize("mode", ["all", "half"])
def test_shared_experts_do_not_change_tokens_or_logits(runtime, policy, mode):
    ids = runtime.encode("Once upon a time there was", None)
    runtime.configure(policy="resident", memory_budget="all", cpu_experts="off")
    reference = runtime.generate(prompt_ids=ids, max_new_tokens=8, stop_at_eos=False, return_logits=True)
    runtime.configure(policy=policy, memory_budget="6slots", cpu_experts=mode)
    out = runtime.generate(prompt_ids=ids, max_new_tokens=8, stop_at_eos=False, return_logits=True)
    assert out.tokens == reference.tokens
    assert all(bool((a == b).all()) for a, b in zip(out.logits, reference.logits))
    shared = out.phases["prefill"]["shared_computes"] + out.phases["decode"]["shared_computes"]
    assert shared > 0
    lane_rows = [r for r in runtime.timeline.rows() if r["stream"] == "cpu"]
    assert len(lane_rows) == out.host_computes + shared
    tails = [r for r in runtime.timeline.rows() if r["stream"] == "copy" and r["nbytes"] == runtime.format.tail_bytes]
    assert len(tails) == shared


def test_the_split_is_fixed_when_the_runtime_is_built(runtime):
    with pytest.raises(KnobError, match="build a new runtime"):
        runtime.configure(cpu_split=0.0)
    assert runtime.describe()["cpu_split"] == pytest.approx(runtime.format.fraction)


@needs_kernel
def test_unsplit_and_split_runtimes_agree_within_rounding():
    ids = [5, 6, 7, 8, 9]
    split = duoserve_core.load(MODEL, device="cpu", quant="int4", memory_budget="all", max_context=64,
                               policy="resident", cpu_split=0.5)
    plain = duoserve_core.load(MODEL, device="cpu", quant="int4", memory_budget="all", max_context=64, policy="resident")
    a = split.generate(prompt_ids=ids, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    b = plain.generate(prompt_ids=ids, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    assert a.tokens == b.tokens
    assert max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a.logits, b.logits)) < 0.02


# -- on a GPU -----------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("shape", [(256, 512), (4096, 14336)])
def test_a_reassembled_slot_is_the_unsplit_slot_byte_for_byte(shape):
    hidden, intermediate = shape
    tensors = _expert(hidden, intermediate)
    plain, split = Int4Format(hidden, intermediate), make_format("int4", hidden, intermediate, torch.bfloat16, cpu_split=0.75)
    a, b = _packed(plain, tensors).to("cuda"), _packed(split, tensors).to("cuda")
    plain.arrive(a)
    split.arrive(b)
    assert torch.equal(a, b[:plain.nbytes])
    x = torch.randn(3, hidden, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(plain.forward(a, x), split.forward(b, x))


@cuda
@pytest.mark.parametrize("mode", ["all", "half"])
def test_shared_experts_on_the_gpu_stay_within_rounding(mode):
    ids = [5, 6, 7, 8, 9]
    gpu = duoserve_core.load(MODEL, device="cuda", quant="int4", memory_budget="6slots", max_context=64,
                             cpu_split=0.5, policy="on-demand")
    reference = gpu.generate(prompt_ids=ids, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    gpu.configure(cpu_experts=mode)
    out = gpu.generate(prompt_ids=ids, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    assert out.phases["decode"]["shared_computes"] > 0
    assert max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(out.logits, reference.logits)) < 0.05


@needs_kernel
def test_the_bandwidth_diagnostic_times_both_lane_jobs_on_the_cpu(tmp_path):
    """``benchmarks/diagnostics/host_bandwidth.py`` on the CPU: the lane-alone rows, whole and head, in its JSON."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("host_bandwidth", ROOT / "benchmarks" / "diagnostics" / "host_bandwidth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bw.json"
    assert module.main(["--hidden", "256", "--intermediate", "384", "--share", "0.5", "--threads", "1",
                        "--repeats", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["case"] for r in result["rows"]] == ["lane alone: whole expert", "lane alone: head (67%)"]
    assert all(r["lane_ms"] > 0 for r in result["rows"]) and result["head_bytes"] < result["record_bytes"]

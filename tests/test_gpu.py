"""GPU behaviour: the same tokens as on the CPU and as transformers, and the budget is a ceiling.

These skip cleanly where CUDA is absent (CI); they run on the lent H100 through
``benchmarks/foundation_gpu.sh``.
"""

from __future__ import annotations

import gc

import pytest
import torch

import duoserve_core
from conftest import hf_greedy, requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]
PROMPT = [5, 17, 33, 2, 71, 40, 12, 90, 3, 64]


@pytest.fixture
def held_before() -> list[int]:
    """What each GPU holds before the test's runtimes: a run's peak is the device's (torch counts every
    tensor in the process, and cuBLAS keeps a workspace per stream for the process's life, whichever
    runtime made it), so the budget checks below compare the peak above this with the budget. Runtimes
    earlier tests left in reference cycles are collected first."""
    gc.collect()
    return [torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count())]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_cpu_and_gpu_generate_the_same_tokens(quant):
    kw = dict(num_layers=3, quant=quant, dtype=torch.float32, synth_device="cpu")
    cpu = duoserve_core.load("synthetic:tiny", device="cpu", **kw).generate(prompt_ids=PROMPT, max_new_tokens=16)
    gpu = duoserve_core.load("synthetic:tiny", device="cuda", **kw).generate(prompt_ids=PROMPT, max_new_tokens=16)
    assert cpu.tokens == gpu.tokens


def test_gpu_logits_match_transformers(tiny_checkpoint, reference_model):
    ref_tokens, ref_logits = hf_greedy(reference_model, PROMPT, 8)
    rt = duoserve_core.load(tiny_checkpoint, device="cuda", quant="none", dtype=torch.float32)
    r = rt.generate(prompt_ids=PROMPT, max_new_tokens=8, return_logits=True)
    assert r.tokens == ref_tokens
    for ours, theirs in zip(r.logits, ref_logits):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_gpu_tokens_identical_across_policies_and_peak_within_budget(tiny_checkpoint, held_before):
    base = duoserve_core.load(tiny_checkpoint, device="cuda", quant="nf4", policy="resident", max_context=64)
    expected = base.generate(prompt_ids=PROMPT, max_new_tokens=12, return_logits=True)
    budget = base.plan.fixed_bytes + 2 * base.format.nbytes
    small = duoserve_core.load(tiny_checkpoint, device="cuda", quant="nf4", policy="on-demand", memory_budget=budget,
                               max_context=64)
    got = small.generate(prompt_ids=PROMPT, max_new_tokens=12, return_logits=True)
    assert got.tokens == expected.tokens
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
    assert small.plan.num_slots == 2 and got.expert_misses > 0
    assert got.peak_gpu_bytes - held_before[0] <= budget


def test_gpu_timeline_has_both_streams(tiny_checkpoint):
    rt = duoserve_core.load(tiny_checkpoint, device="cuda", quant="nf4")
    rt.generate(prompt_ids=PROMPT, max_new_tokens=4)
    df = rt.timeline.to_dataframe()
    assert set(df["stream"]) == {"compute", "copy"}
    assert (df["duration_ms"] >= 0).all() and df["end_ms"].max() > 0


def test_gpu_attention_builds_no_cudnn_plan_per_key_length():
    """In bf16 SDPA would pick cuDNN, which builds a plan for every new key length (one per decode token:
    40-65 ms each on the H200); ``mixtral.attend`` runs the memory-efficient kernel instead."""
    from torch.profiler import ProfilerActivity, profile

    rt = duoserve_core.load("synthetic:tiny", device="cuda", quant="nf4", dtype=torch.bfloat16, num_layers=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rt.generate(prompt_ids=PROMPT, max_new_tokens=6, stop_at_eos=False)
    ops = {e.key for e in prof.key_averages()}
    assert not any("cudnn_attention" in op for op in ops), sorted(op for op in ops if "attention" in op)
    assert any("efficient_attention" in op for op in ops), sorted(op for op in ops if "attention" in op)


def test_gpu_nf4_attention_and_routing_replay(tiny_checkpoint, tmp_path):
    from duoserve_core.traces import record, write_trace

    kw = dict(device="cuda", quant="nf4", attention_quant="nf4", max_context=64)
    resident = duoserve_core.load(tiny_checkpoint, policy="resident", **kw)
    expected = resident.generate(prompt_ids=PROMPT, max_new_tokens=8, return_logits=True)
    small = duoserve_core.load(tiny_checkpoint, memory_budget=resident.plan.fixed_bytes + 2 * resident.format.nbytes,
                               **kw)
    got = small.generate(prompt_ids=PROMPT, max_new_tokens=8, return_logits=True)
    assert got.tokens == expected.tokens and all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
    df, meta = record(resident, [PROMPT], max_new_tokens=4)
    write_trace(tmp_path / "t.parquet", df, meta)
    replayed = duoserve_core.load(tiny_checkpoint, routing_trace=tmp_path / "t.parquet", **kw)
    again, _ = record(replayed, [PROMPT], max_new_tokens=4)
    assert again["experts"].map(list).tolist() == df["experts"].map(list).tolist()


def test_warm_up_leaves_the_tokens_and_an_empty_cache():
    kw = dict(num_layers=3, quant="nf4", dtype=torch.float32, synth_device="cpu")
    rt = duoserve_core.load("synthetic:tiny", device="cuda", policy="duoserve", **kw)
    before = rt.generate(prompt_ids=PROMPT, max_new_tokens=8).tokens
    rt.empty_expert_cache()
    rt.warm_up()
    assert not rt.cache.resident()
    assert rt.generate(prompt_ids=PROMPT, max_new_tokens=8).tokens == before


@pytest.mark.parametrize("policy,schedule", [("on-demand", "prefill-first"), ("duoserve", "prefill-first"),
                                             ("duoserve", "mixed")])
def test_gpu_batched_requests_equal_alone(tiny_checkpoint, policy, schedule, held_before):
    """Continuous batching on the GPU (row KV cache, one attention call per layer, the MoE over the batch):
    each request's tokens equal its solo run's, near-ties told apart as in tests/test_batching.py."""
    from test_batching import _prompts, assert_same_as_alone

    rt = duoserve_core.load(tiny_checkpoint, device="cuda", quant="nf4", dtype=torch.float32, policy=policy,
                            memory_budget="4slots", max_context=64, max_batch=4)
    prompts = _prompts(rt.config.vocab_size, 6, seed=11)
    alone = [rt.generate(prompt_ids=p, max_new_tokens=8, stop_at_eos=False, return_logits=True, request_id=i)
             for i, p in enumerate(prompts)]
    run = rt.generate_many(prompts, max_batch=4, max_new_tokens=8, stop_at_eos=False, return_logits=True,
                           prefill_schedule=schedule)
    assert_same_as_alone(run, alone)
    assert run.mean_batch > 1 and run.peak_gpu_bytes - held_before[0] <= rt.plan.budget_bytes


requires_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                       reason="needs two CUDA GPUs")


@requires_two_gpus
@pytest.mark.parametrize("policy", ["on-demand", "lru", "duoserve"])
def test_two_gpus_give_the_one_gpu_tokens_and_logits(tiny_checkpoint, policy, held_before):
    """Experts on two GPUs (computed where their slots are, hidden states across NVLink and back): the
    tokens and logits of the one-GPU run, bit for bit; each GPU within the budget; copies on both links."""
    kw = dict(quant="nf4", policy=policy, memory_budget="4slots", max_context=64, max_batch=3)
    one = duoserve_core.load(tiny_checkpoint, device="cuda:0", **kw)
    two = duoserve_core.load(tiny_checkpoint, devices="cuda:0,cuda:1", **kw)
    a = one.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False, return_logits=True)
    b = two.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False, return_logits=True)
    assert a.tokens == b.tokens
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    df = two.timeline.to_dataframe()
    assert set(df[df["kind"] == "h2d"]["device"]) == {0, 1} and set(df[df["kind"] == "expert"]["device"]) == {0, 1}
    assert all(peak - held <= two.plan.budget_bytes for peak, held in zip(b.peak_gpu_bytes_by_device, held_before))
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:]]
    many_one = one.generate_many(prompts, max_new_tokens=6, stop_at_eos=False)
    many_two = two.generate_many(prompts, max_new_tokens=6, stop_at_eos=False)
    assert [r.tokens for r in many_one.requests] == [r.tokens for r in many_two.requests]

"""Decode steps' dense part from CUDA graphs (``decode_graph``): the same tokens as the eager path.

On the CPU the graphs' static function runs eagerly (keys read to a bucket width, tensor-indexed KV
rows, the mask computed from the positions): it must give transformers' tokens and the eager run's
logits, across a bucket boundary, with a sliding window, for one request and for a batch. On a GPU
the captured graphs replay that function: the tests there compare the replay with the eager run and
check the tokens stay the same under every policy.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

import duoserve_core
from conftest import hf_greedy, make_reference, requires_cuda, save_checkpoint
from duoserve_core.decode_graph import WIDTH_BUCKET
from duoserve_core.runtime import resolve_cuda_graphs

# 250 prompt tokens and 12 new ones: decode reads 251..262 keys, across the first bucket's edge (256)
PROMPT = [(7 * i) % 90 + 3 for i in range(250)]


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """The tests' tiny Mixtral with room for 512 positions."""
    model = make_reference(seed=2, max_position_embeddings=512)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("long_context"))


def test_the_static_path_gives_transformers_tokens_across_a_bucket_edge(long_context):
    reference_model, tiny_checkpoint = long_context
    ref_tokens, ref_logits = hf_greedy(reference_model, PROMPT, 12)
    eager = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", max_context=320)
    graphs = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", max_context=320, cuda_graphs=True)
    a = eager.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False, return_logits=True)
    b = graphs.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False, return_logits=True)
    assert a.tokens == b.tokens == ref_tokens
    for ours, eager_logits, theirs in zip(b.logits, a.logits, ref_logits):
        torch.testing.assert_close(ours, eager_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert graphs.describe()["cuda_graphs"] is True and eager.describe()["cuda_graphs"] is False
    assert [graphs.model.graphs.bucket(w) for w in (1, 256, 257, 320)] == [WIDTH_BUCKET, 256, 320, 320]


def test_the_static_path_keeps_the_sliding_window(windowed):
    model, path = windowed
    ref_tokens, ref_logits = hf_greedy(model, PROMPT[:60], 8)
    rt = duoserve_core.load(path, device="cpu", quant="none", max_context=128, cuda_graphs=True)
    got = rt.generate(prompt_ids=PROMPT[:60], max_new_tokens=8, stop_at_eos=False, return_logits=True)
    assert got.tokens == ref_tokens
    for ours, theirs in zip(got.logits, ref_logits):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["prefill-first", "mixed"])
def test_batched_decode_through_the_static_path(tiny_checkpoint, schedule):
    """B rows in one step (and, mixed, prompt chunks beside decode rows, which stay eager)."""
    prompts = [PROMPT[:40], PROMPT[50:61], PROMPT[100:133], PROMPT[7:12]]
    kw = dict(device="cpu", quant="nf4", max_context=64, max_batch=3, policy="on-demand")
    eager = duoserve_core.load(tiny_checkpoint, **kw).generate_many(
        prompts, max_new_tokens=8, stop_at_eos=False, return_logits=True, prefill_schedule=schedule)
    rt = duoserve_core.load(tiny_checkpoint, cuda_graphs=True, **kw)
    graphs = rt.generate_many(prompts, max_new_tokens=8, stop_at_eos=False, return_logits=True,
                              prefill_schedule=schedule)
    assert [r.tokens for r in graphs.requests] == [r.tokens for r in eager.requests]
    assert 3 in rt.model.graphs._inputs  # full steps of 3 rows went through the static path
    for a, b in zip(eager.requests, graphs.requests):
        for x, y in zip(a.logits, b.logits):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy,budget", [("resident", None), ("on-demand", "2slots"), ("duoserve", "3slots")])
def test_one_token_experts_through_the_slot_path(tiny_checkpoint, policy, budget):
    """``--cuda-graphs`` also runs one-token expert calls as one function per slot (``experts/slot_graph.py``;
    the static function on the CPU): every decode expert goes through it, whichever expert its slot
    holds at the time, and the tokens and logits are the eager run's."""
    kw = dict(device="cpu", quant="nf4", max_context=64, policy=policy, memory_budget=budget)
    eager = duoserve_core.load(tiny_checkpoint, **kw).generate(prompt_ids=PROMPT[:20], max_new_tokens=10,
                                                               stop_at_eos=False, return_logits=True)
    # routed on the host: resident decode routed on the device runs no expert call (tests/test_device_routing.py)
    rt = duoserve_core.load(tiny_checkpoint, cuda_graphs=True, device_routing=False, **kw)
    got = rt.generate(prompt_ids=PROMPT[:20], max_new_tokens=10, stop_at_eos=False, return_logits=True)
    assert got.tokens == eager.tokens
    for x, y in zip(got.logits, eager.logits):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    c = rt.config
    assert rt.executor.slot_graphs.calls >= 9 * c.num_hidden_layers * c.num_experts_per_tok  # 9 decode steps


@requires_cuda
@pytest.mark.gpu
def test_replayed_graphs_give_the_eager_tokens_under_every_policy(long_context):
    """On the GPU: the graphs are captured once per layer and key bucket, and replayed; tokens equal the
    eager run's, whatever the policy and budget (the invariant every schedule keeps)."""
    _, tiny_checkpoint = long_context
    kw = dict(device="cuda", quant="nf4", attention_quant="nf4", max_context=320, dtype=torch.float32)
    eager = duoserve_core.load(tiny_checkpoint, policy="resident", cuda_graphs=False, **kw)
    expected = eager.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False, return_logits=True)
    graphs = duoserve_core.load(tiny_checkpoint, policy="resident", **kw)  # one GPU: the graphs by default
    assert graphs.cuda_graphs and graphs.model.graphs is not None and not eager.cuda_graphs
    for policy, budget in (("resident", None), ("on-demand", "2slots"), ("duoserve", "3slots")):
        graphs.configure(policy=policy, memory_budget=budget)
        got = graphs.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False, return_logits=True)
        assert got.tokens == expected.tokens, policy
        for x, y in zip(got.logits, expected.logits):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    captured = graphs.model.graphs._graphs
    assert graphs.executor.slot_graphs.captured() > 0  # one-token experts replayed from their slots' graphs
    assert {(layer, rows) for layer, rows, _ in captured} == {(l, 1) for l in range(graphs.config.num_hidden_layers)}
    assert {width for _, _, width in captured} == {256, 320}


@requires_cuda
@pytest.mark.gpu
def test_captures_leave_no_workspace_per_graph(long_context):
    """cuBLAS keeps a workspace (32 MiB on an H200) for every stream that ran a matmul, for the process's
    life: the captures share one side stream (``side_stream``), so however many graphs a runtime
    captured, once it is gone the process holds at most two workspaces more than before (the compute
    stream's and the side stream's), not one per graph."""
    _, tiny_checkpoint = long_context
    gc.collect()
    before = torch.cuda.memory_allocated()
    rt = duoserve_core.load(tiny_checkpoint, device="cuda", quant="nf4", policy="resident", max_context=320,
                            dtype=torch.float32, cuda_graphs=True)
    rt.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False)
    captured = len(rt.model.graphs._graphs)
    del rt
    gc.collect()
    assert captured >= 4 and torch.cuda.memory_allocated() - before <= 2 * 32 * 2**20


def test_the_command_line_flag(capsys):
    """``generate --cuda-graphs`` and ``bench --cuda-graphs`` load the runtime with the graphs: same tokens;
    ``--no-cuda-graphs`` and no flag run eagerly on the CPU (the default is the device's: ``resolve_cuda_graphs``)."""
    from duoserve_core.bench.__main__ import parse_args, setup_of
    from duoserve_core.cli import main

    base = ["generate", "--model", "synthetic:tiny", "--num-layers", "2", "--prompt-ids", "4,5,6",
            "--max-new-tokens", "6", "--device", "cpu", "--json"]
    outputs = []
    for extra in ([], ["--cuda-graphs"], ["--no-cuda-graphs"]):
        assert main(base + extra) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["tokens"] == outputs[1]["tokens"] == outputs[2]["tokens"]
    assert [o["runtime"]["cuda_graphs"] for o in outputs] == [False, True, False]
    assert [setup_of(parse_args(flag)).cuda_graphs for flag in ([], ["--cuda-graphs"], ["--no-cuda-graphs"])] == [
        None, True, False]


def test_graphs_are_the_default_on_one_gpu_only():
    """``None`` resolves to on for one CUDA device, off on the CPU and on several GPUs (only the first
    device's slots would get graphs, unmeasured there); an explicit choice always wins."""
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert resolve_cuda_graphs(None, [gpu0]) is True
    assert resolve_cuda_graphs(None, [cpu]) is False and resolve_cuda_graphs(None, [gpu0, gpu1]) is False
    assert resolve_cuda_graphs(False, [gpu0]) is False and resolve_cuda_graphs(True, [cpu]) is True


def test_bench_records_say_whether_their_runs_used_graphs(tmp_path):
    """The record carries the runtime's resolved choice, which a command without the flag leaves to the
    device; files from before the default changed say it by their command alone."""
    from duoserve_core.bench import ran_with_cuda_graphs
    from duoserve_core.bench.__main__ import main

    out = tmp_path / "batch.json"
    assert main(["--model", "synthetic:tiny", "--num-layers", "2", "--device", "cpu", "--prompt-len", "8", "--gen",
                 "3", "--repeats", "1", "--policies", "on-demand", "--memory-budget", "4slots", "--max-batch", "2",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["cuda_graphs"] is False and not ran_with_cuda_graphs(record)
    assert ran_with_cuda_graphs({"command": "python -m duoserve_core.bench --cuda-graphs"})
    assert not ran_with_cuda_graphs({"command": "python -m duoserve_core.bench --cuda-graphs", "cuda_graphs": False})
    assert not ran_with_cuda_graphs({"command": "python -m duoserve_core.bench --no-cuda-graphs"})


def test_configure_keeps_the_kv_cache_and_graphs_while_their_shape_stays(long_context):
    """A new policy or budget reuses the KV cache and the graphs (nothing captured again); a new batch
    size or context replaces both."""
    _, path = long_context
    rt = duoserve_core.load(path, device="cpu", quant="nf4", max_context=320, cuda_graphs=True)
    kv, graphs = rt.model.kv, rt.model.graphs
    before = rt.generate(prompt_ids=PROMPT[:20], max_new_tokens=6, stop_at_eos=False).tokens
    rt.configure(policy="duoserve", memory_budget="3slots")
    assert rt.model.kv is kv and rt.model.graphs is graphs and graphs.kv is kv
    assert rt.generate(prompt_ids=PROMPT[:20], max_new_tokens=6, stop_at_eos=False).tokens == before
    rt.configure(max_batch=2)
    assert rt.model.kv is not kv and rt.model.graphs is not graphs and rt.model.graphs.kv is rt.model.kv
    assert rt.model.kv.rows == 2

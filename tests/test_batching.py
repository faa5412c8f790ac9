"""Continuous batching (``Runtime.generate_many``): a request's tokens do not depend on its batch mates.

Greedy, fp32, on the CPU, on the tiny checkpoint and the bundled model: every request's tokens in a
batch equal the same request generated alone, for every ``max_batch`` and arrival order, for every
policy that batches decode, with experts offloaded (so the MoE serves several requests per copy)
and with routing replayed from a trace (each request replays its own trace request).

How a near-tie is told apart: a batch computes the MoE and the lm_head over more rows than a
request alone, and a matmul's rounding may depend on its row count. So logits may differ by a few
ulps (asserted below 1e-4 absolute); where the tokens differ, the solo run's two best logits at the
first differing step must be within that same 1e-4 (a tie that rounding may flip), else it is a bug.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import duoserve_core
from duoserve_core.errors import PromptError

DATA = Path(__file__).resolve().parents[1] / "data"
TOLERANCE = 1e-4
POLICIES = ["on-demand", "lru", "per-layer-lru", "lru-speculative", "duoserve", "uniform"]


def _prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 20))] for _ in range(count)]


def assert_same_as_alone(batch, alone) -> None:
    for i, (got, want) in enumerate(zip(batch.requests, alone)):
        diffs = [(a - b).abs().max().item() for a, b in zip(got.logits, want.logits)]
        if got.tokens != want.tokens:
            step = next(s for s, (a, b) in enumerate(zip(got.tokens, want.tokens)) if a != b)
            top2 = want.logits[step].topk(2).values
            assert (top2[0] - top2[1]).item() < TOLERANCE, f"request {i} differs at step {step}, not a near-tie"
            diffs = diffs[:step + 1]
        assert max(diffs) < TOLERANCE, (i, max(diffs))


@pytest.fixture(scope="module")
def bundled():
    return duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", memory_budget="6slots", max_context=64,
                              max_batch=6)


@pytest.mark.parametrize("policy", POLICIES)
def test_bundled_requests_equal_alone_for_every_max_batch_and_order(bundled, policy):
    bundled.configure(policy=policy, memory_budget="6slots")
    prompts = _prompts(bundled.config.vocab_size, 5, seed=len(policy))
    alone = [bundled.generate(prompt_ids=p, max_new_tokens=8, stop_at_eos=False, return_logits=True, request_id=i)
             for i, p in enumerate(prompts)]
    for max_batch in (1, 2, 5):
        run = bundled.generate_many(prompts, max_batch=max_batch, max_new_tokens=8, stop_at_eos=False,
                                    return_logits=True)
        assert_same_as_alone(run, alone)
        assert run.max_batch == max_batch and run.mean_batch <= max_batch
    order = list(reversed(range(len(prompts))))  # another arrival order: the results follow the input order
    run = bundled.generate_many([prompts[i] for i in order], max_batch=3, max_new_tokens=8, stop_at_eos=False,
                                return_logits=True)
    assert [r.tokens for r in run.requests] == [run.requests[j].tokens for j in range(len(order))]


def test_batching_shares_copies(bundled):
    """One copy of an expert serves every request of a step that needs it: fewer copies than one at a time."""
    bundled.configure(policy="on-demand", memory_budget="6slots")
    prompts = _prompts(bundled.config.vocab_size, 6, seed=1)
    one = bundled.generate_many(prompts, max_batch=1, max_new_tokens=10, stop_at_eos=False)
    six = bundled.generate_many(prompts, max_batch=6, max_new_tokens=10, stop_at_eos=False,
                                prefill_schedule="prefill-first")  # every decode step then holds all six
    assert six.h2d_copies < one.h2d_copies and six.decode_steps < one.decode_steps
    assert six.mean_batch == 6 and one.mean_batch == 1
    assert [r.tokens for r in six.requests] == [r.tokens for r in one.requests]
    for r in six.requests:  # latencies from the run's start: queueing before the prefill, then the first token
        assert 0 <= r.queue_s <= r.ttft_s <= r.e2e_s <= six.e2e_s and r.tpot_s > 0


def test_tiny_checkpoint_requests_leave_at_eos(tiny_checkpoint):
    """Requests leave at EOS at different steps while the others go on (EOS is set to a token one request
    makes early, so that it leaves first)."""
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="nf4", memory_budget="4slots", max_context=64,
                            policy="lru", max_batch=4)
    prompts = _prompts(rt.config.vocab_size, 7, seed=3)
    free = rt.generate(prompt_ids=prompts[2], max_new_tokens=12, stop_at_eos=False)
    rt.config.eos_token_id = free.tokens[3]
    alone = [rt.generate(prompt_ids=p, max_new_tokens=12, return_logits=True, request_id=i)
             for i, p in enumerate(prompts)]
    run = rt.generate_many(prompts, max_batch=4, max_new_tokens=12, return_logits=True)
    assert_same_as_alone(run, alone)
    lengths = [len(r.tokens) for r in run.requests]
    assert lengths[2] <= 4 and max(lengths) == 12, lengths  # one left early, another ran to its limit


def test_each_request_replays_its_own_trace_request():
    rt = duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", memory_budget="6slots", max_context=64,
                            routing_trace=DATA / "traces" / "small-moe-heldout.parquet", policy="lru-speculative",
                            max_batch=4)
    prompts = _prompts(rt.config.vocab_size, 4, seed=5)
    alone = [rt.generate(prompt_ids=p, max_new_tokens=6, stop_at_eos=False, return_logits=True, request_id=i)
             for i, p in enumerate(prompts)]
    run = rt.generate_many(prompts, max_batch=4, max_new_tokens=6, stop_at_eos=False, return_logits=True)
    assert_same_as_alone(run, alone)
    assert run.expert_misses + run.expert_hits > 0


def test_duoserve_bets_on_the_union_of_a_batchs_experts():
    """In a decode step of several requests duoserve prefetches the experts any of them is likely to use
    (popularity as 1 - (1 - share)^B): after the same prompt, a step of 8 tokens loads more of the next
    layers than a step of one, and only of the next layers."""
    from duoserve_core.policy import DuoServePolicy, Phase
    from test_cache_and_policy import _cache

    gen = torch.Generator().manual_seed(0)
    prompt = [torch.randperm(8, generator=gen)[:2].repeat(12, 1) for _ in range(4)]  # each layer: a few experts
    plans = {}
    for batch in (1, 8):
        policy = DuoServePolicy(prefetch_depth=2, predictor_threshold=0.5)
        _cache(policy, slots=16, layers=4, experts=8)
        policy.phase(Phase.PREFILL)
        for layer, topk in enumerate(prompt):
            policy.router_done(layer, topk, torch.full((12, 8), 1 / 8))
        policy.phase(Phase.DECODE)
        topk = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(batch)])
        plans[batch] = policy.router_done(0, topk, torch.full((batch, 8), 1 / 8)).load
    assert len(plans[8]) > len(plans[1]) and {layer for layer, _ in plans[8]} <= {1, 2}, plans


def test_bad_arguments_are_named(bundled):
    bundled.configure(policy="on-demand")
    with pytest.raises(PromptError, match="no prompts"):
        bundled.generate_many([])
    with pytest.raises(PromptError, match="max_batch"):
        bundled.generate_many([[5]], max_batch=0)
    with pytest.raises(PromptError, match="prompt 1: the prompt has 60 tokens"):
        bundled.generate_many([[5], [5] * 60], max_new_tokens=8)
    with pytest.raises(PromptError, match="empty"):
        bundled.generate_many(["  "])
    assert torch.is_tensor(bundled.generate_many([[5]], max_new_tokens=2, return_logits=True).requests[0].logits[0])


def test_the_memory_plan_holds_the_batchs_kv_caches(bundled):
    """The plan reserves max_batch KV caches out of the budget (so a byte budget buys fewer slots), and a
    run with more requests at once than the plan holds is refused, saying what it would need."""
    from duoserve_core.errors import BudgetError

    bundled.configure(policy="on-demand", memory_budget="6slots")
    six = bundled.plan
    budget = six.fixed_bytes + 6 * six.expert_bytes
    bundled.configure(memory_budget=budget, max_batch=1)
    one = bundled.plan
    assert six.max_batch == 6 and one.max_batch == 1
    assert six.kv_cache_bytes == 6 * one.kv_cache_bytes and one.num_slots > 6
    with pytest.raises(BudgetError, match="max_batch 2: this runtime's memory plan holds the KV caches of 1"):
        bundled.generate_many([[5], [6]], max_batch=2)
    assert bundled.generate_many([[5], [6]], max_new_tokens=2).max_batch == 1  # the plan's, by default
    bundled.configure(memory_budget="6slots", max_batch=6)


def test_cli_prompts_file_prints_one_json_object(tmp_path, capsys):
    import json

    from duoserve_core.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe little dog\nIn the morning\n")
    code = main(["generate", "--model", str(DATA / "small-moe"), "--prompts", str(prompts), "--max-batch", "2",
                 "--max-new-tokens", "4", "--device", "cpu", "--memory-budget", "6slots", "--ignore-eos", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out["requests"]) == 3 and out["max_batch"] == 2
    assert all(len(r["tokens"]) == 4 for r in out["requests"])
    assert out["ttft_p50_s"] <= out["ttft_p99_s"] and out["tokens_per_s"] > 0 and out["runtime"]["model"] == "small-moe"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["generate", "--model", str(DATA / "small-moe"), "--prompts", str(empty), "--device", "cpu"]) == 2
    assert "holds no prompt" in capsys.readouterr().err


@pytest.mark.parametrize("policy,schedule,chunk", [("on-demand", "prefill-first", None),
                                                   ("lru", "prefill-first", None),
                                                   ("lru-speculative", "prefill-first", None),
                                                   ("duoserve", "mixed", None), ("lru", "mixed", 4)])
def test_runtime_and_simulator_make_the_same_decisions_in_batches(tmp_path, policy, schedule, chunk):
    """The simulator schedules a batch as the runtime does (prefill first, the same segments): with routing
    replayed from the bundled trace, the cache's decisions are the same, event by event."""
    from duoserve_core.sim import Simulator, build_model, load_calibration
    from duoserve_core.traces import RoutingReplay, read_trace
    from test_layer_step import decisions
    from test_sim import fake_calibration

    trace = DATA / "traces" / "small-moe-heldout.parquet"
    lengths, gen, context = [5, 9, 3, 7], 6, 32
    rt = duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", memory_budget="10slots", max_context=context,
                            routing_trace=trace, policy=policy, max_batch=3)
    prompts = [[5 + t for t in range(n)] for n in lengths]
    real, runs = decisions(rt, lambda: rt.generate_many(prompts, max_new_tokens=gen, stop_at_eos=False,
                                                        prefill_schedule=schedule, prefill_chunk=chunk))
    cal = load_calibration(fake_calibration(tmp_path / "cal.json", 8, 2, shape=dict(
        hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)))
    model = build_model(DATA / "small-moe", quant="nf4", memory_budget="10slots", max_context=context, device_type="cpu")
    sim = Simulator(model, cal, RoutingReplay(read_trace(trace), 8, 8, 2), policy, policy_time=False)
    simulated, steps = decisions(sim, lambda: sim.generate_many([(n, gen) for n in lengths], 3, None, schedule,
                                                                chunk).decode_steps)
    assert len(real) > 0 and simulated == real
    batch = sim.generate_many([(n, gen) for n in lengths], 3, None, schedule, chunk)
    assert batch.mean_batch > 1 and batch.decode_steps == steps[0] and 0 < batch.decode_s < batch.e2e_s
    # the steps that ran prompts: one per prompt, or per chunk of one, on both; their time and the decode
    # steps' add up to no more than the run
    prompt_steps = sum(-(-n // chunk) if chunk else 1 for n in lengths)
    assert batch.prompt_steps == runs[0].prompt_steps == prompt_steps and batch.decode_steps == runs[0].decode_steps
    for run in (batch, runs[0]):
        assert 0 < run.prompt_s and run.prompt_s + run.decode_s <= run.e2e_s + 1e-9
    assert all(0 <= r["queue_s"] <= r["ttft_s"] <= r["e2e_s"] <= batch.e2e_s for r in batch.requests)


def test_bench_max_batch_reports_throughput_per_batch_and_policy(tmp_path):
    import json

    from duoserve_core.bench.__main__ import main

    out = tmp_path / "batch.json"
    code = main(["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "8slots", "--prompt-len",
                 "8", "--gen", "4", "--repeats", "1", "--policies", "on-demand,duoserve", "--max-batch", "1,3",
                 "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0 and [(r["max_batch"], r["policy"]) for r in rows] == [
        (1, "on-demand"), (1, "duoserve"), (3, "on-demand"), (3, "duoserve")]
    one, three = rows[0], rows[2]
    assert not any("skipped" in r for r in rows) and rows[3]["mean_batch"] == 3
    assert one["slots"] == three["slots"] == 8 and three["kv_bytes_added"] > 0 == one["kv_bytes_added"]
    assert three["mean_batch"] == 3 and one["mean_batch"] == 1 and three["h2d_copies"] < 3 * one["h2d_copies"]
    for r in (one, three):
        assert r["ttft_p50_s"] <= r["ttft_p99_s"] and r["tokens_per_s"] > 0 and r["experts_per_decode_step"] > 0
        assert 0 < r["decode_s"] < r["e2e_s"] and r["decode_tokens_per_s"] > r["tokens_per_s"] * 0.5
        split = r["decode_split"]  # one stream on the CPU: its busy time fits in the step
        assert split["copies_per_step"] > 0 and split["copy_busy_s"] > 0
        assert 0 < split["compute_busy_s"] <= r["decode_s"] / r["decode_steps"] and split["cpu_busy_s"] == 0
        by_kind = [split[f"{kind}_busy_s"] for kind in ("attention", "router", "expert")]
        assert all(t > 0 for t in by_kind) and sum(by_kind) == pytest.approx(split["compute_busy_s"])


def test_bench_keeps_finished_rows_beside_out_while_it_runs(tmp_path, monkeypatch, capsys):
    """A run stopped by SIGTERM (a GPU stage's timeout) keeps the rows it finished in NAME.partial.json and
    says so; a finished run leaves only its result, and Ctrl-C (exit 130) leaves nothing."""
    import json

    from duoserve_core.progress import Terminated

    from duoserve_core import bench
    from duoserve_core.bench import __main__ as cli

    out = tmp_path / "batch.json"
    partial = tmp_path / "batch.partial.json"
    seen = []
    real_rows = bench.batch_rows

    def watched(*args, on_row, **kwargs):
        def spy(rows):
            on_row(rows)
            seen.append([r["max_batch"] for r in json.loads(partial.read_text())["rows"]])
            assert json.loads(partial.read_text())["partial"] is True and not out.exists()
        return real_rows(*args, on_row=spy, **kwargs)

    monkeypatch.setattr(cli, "batch_rows", watched)
    argv = ["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "8slots", "--prompt-len", "8",
            "--gen", "2", "--repeats", "1", "--policies", "lru", "--max-batch", "1,2", "--out", str(out)]
    assert cli.main(argv) == 0
    assert seen == [[1], [1, 2]] and not partial.exists() and len(json.loads(out.read_text())["rows"]) == 2

    def interrupted(*args, on_row, **kwargs):
        on_row([{"max_batch": 1}])
        assert partial.exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "batch_rows", interrupted)
    out.unlink()
    assert cli.main(argv) == 130 and not out.exists() and not partial.exists()

    def terminated(*args, on_row, **kwargs):  # ``timeout``'s SIGTERM after one finished row
        on_row([{"max_batch": 1}])
        raise Terminated

    monkeypatch.setattr(cli, "batch_rows", terminated)
    assert cli.main(argv) == 143 and not out.exists()
    assert json.loads(partial.read_text())["rows"] == [{"max_batch": 1}]
    assert f"interrupted; the 1 finished rows kept in {partial}" in capsys.readouterr().err

    # a row's timeline is written as the row finishes, and goes or stays with the rows
    timeline = tmp_path / "tl" / "batch_lru_b1_prefill-first.parquet"
    for stop, code in ((KeyboardInterrupt, 130), (Terminated, 143)):
        def stopped(*args, on_row, stop=stop, **kwargs):
            on_row([{"max_batch": 1, "policy": "lru", "prefill_schedule": "prefill-first", "timeline": []}])
            assert timeline.exists()
            raise stop

        monkeypatch.setattr(cli, "batch_rows", stopped)
        assert cli.main(argv + ["--timelines", str(tmp_path / "tl"), "--force"]) == code
        assert timeline.exists() == (stop is Terminated) == partial.exists()


def test_bench_rows_write_their_timelines(tmp_path):
    """--timelines with --max-batch and --arrival-rate: one Parquet timeline per row, named by policy, batch
    size or rate and schedule, checked before the model loads (an existing one needs --force)."""
    import json

    import pandas as pd

    from duoserve_core.bench.__main__ import main

    common = ["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "8slots", "--prompt-len", "6",
              "--gen", "3", "--repeats", "1", "--policies", "lru", "--timelines", str(tmp_path / "tl")]
    assert main(common + ["--max-batch", "1,2", "--out", str(tmp_path / "batch.json")]) == 0
    assert main(common + ["--arrival-rate", "40", "--requests", "2", "--max-batch", "2",
                          "--out", str(tmp_path / "load.json")]) == 0
    names = sorted(p.name for p in (tmp_path / "tl").iterdir())
    assert names == ["batch_lru_b1_prefill-first.parquet", "batch_lru_b2_prefill-first.parquet",
                     "load_lru_r40_mixed.parquet"]
    for name, out in (("batch_lru_b2_prefill-first", "batch"), ("load_lru_r40_mixed", "load")):
        timeline = pd.read_parquet(tmp_path / "tl" / f"{name}.parquet")
        row = json.loads((tmp_path / f"{out}.json").read_text())["rows"][-1]
        decode = timeline[timeline["phase"] == "decode"]
        assert "timeline" not in row and (decode["kind"] == "h2d").sum() == pytest.approx(
            row["decode_split"]["copies_per_step"] * row["decode_steps"])
    assert main(common + ["--max-batch", "1", "--out", str(tmp_path / "again.json")]) == 0  # other names
    (tmp_path / "batch.json").unlink()
    assert main(common + ["--max-batch", "1", "--out", str(tmp_path / "batch.json")]) == 2  # its timeline exists


def test_batch_rows_warm_up_briefly_and_measure_full_length(bundled, monkeypatch):
    from duoserve_core import bench

    lengths = []
    generate_many = bundled.generate_many

    def spy(prompts, **kwargs):
        lengths.append((len(prompts), kwargs["max_new_tokens"]))
        return generate_many(prompts, **kwargs)

    monkeypatch.setattr(bundled, "generate_many", spy)
    rows = bench.batch_rows(bundled, bundled.knobs.changed(policy="on-demand"), ["on-demand"], [2], 8, 9,
                            memory_budget="8slots", repeats=2, quiet=True)
    assert lengths == [(2, bench.WARMUP_TOKENS), (2, 9), (2, 9)]
    assert len(rows[0]["repeats_e2e_s"]) == 2 and rows[0]["decode_steps"] == 9 - 1  # the measured run is full length


def test_arrival_rows_warm_each_policy_up_on_a_full_batch_first(bundled, monkeypatch):
    from duoserve_core import bench

    calls = []
    generate_many = bundled.generate_many

    def spy(prompts, **kwargs):
        calls.append((len(prompts), kwargs["max_new_tokens"], kwargs.get("arrivals") is not None))
        return generate_many(prompts, **kwargs)

    monkeypatch.setattr(bundled, "generate_many", spy)
    rows = bench.arrival_rows(bundled, bundled.knobs, ["on-demand", "lru"], [50.0, 100.0], 3, 6, 3, max_batch=2,
                              memory_budget="8slots", quiet=True)
    warm = (2, min(3, bench.WARMUP_TOKENS), False)  # never longer than the measured runs
    assert calls == [warm, (3, 3, True), warm, (3, 3, True), (3, 3, True), (3, 3, True)]
    assert [r["decode_steps"] > 0 for r in rows] == [True] * 4


def test_requests_join_when_they_arrive(bundled):
    """Arrivals replayed in real time: requests join in arrival order, results stay in input order, and a
    request's latencies count from its arrival (a late one does not wait for the run's start)."""
    bundled.configure(policy="lru", memory_budget="6slots", max_batch=6)
    prompts = _prompts(bundled.config.vocab_size, 3, seed=7)
    alone = [bundled.generate(prompt_ids=p, max_new_tokens=4, stop_at_eos=False, return_logits=True, request_id=i)
             for i, p in enumerate(prompts)]
    run = bundled.generate_many(prompts, max_batch=2, max_new_tokens=4, stop_at_eos=False, return_logits=True,
                                arrivals=[0.4, 0.0, 0.1])
    assert_same_as_alone(run, alone)
    assert [r.arrival_s for r in run.requests] == [0.4, 0.0, 0.1]
    assert run.e2e_s >= 0.4 and all(0 <= r.queue_s <= r.ttft_s <= r.e2e_s for r in run.requests)
    assert run.requests[0].e2e_s < run.e2e_s  # counted from its arrival at 0.4 s, not from the start
    for bad in ([0.0, 0.1], [0.0, -1.0, 0.0], [0.0, float("nan"), 0.0]):
        with pytest.raises(PromptError, match="arrivals must give 3 finite times"):
            bundled.generate_many(prompts, arrivals=bad)


def test_the_simulator_waits_for_arrivals(tmp_path):
    from duoserve_core.sim import Simulator, build_model, load_calibration
    from duoserve_core.traces import RoutingReplay, read_trace
    from test_sim import fake_calibration

    cal = load_calibration(fake_calibration(tmp_path / "cal.json", 8, 2, shape=dict(
        hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)))
    model = build_model(DATA / "small-moe", quant="nf4", memory_budget="10slots", max_context=32, device_type="cpu")
    replay = RoutingReplay(read_trace(DATA / "traces" / "small-moe-heldout.parquet"), 8, 8, 2)
    now = Simulator(model, cal, replay, "on-demand", policy_time=False).generate_many([(6, 4)], 1)
    late = Simulator(model, cal, replay, "on-demand", policy_time=False).generate_many([(6, 4)], 1, arrivals=[5.0])
    assert late.e2e_s == pytest.approx(5.0 + now.e2e_s)
    assert late.requests[0]["ttft_s"] == pytest.approx(now.requests[0]["ttft_s"])
    assert late.requests[0]["arrival_s"] == 5.0 and late.requests[0]["queue_s"] == pytest.approx(0.0)


def test_bench_arrival_rate_reports_percentiles_and_slo_per_rate(tmp_path):
    import json

    from duoserve_core.bench.__main__ import main

    out = tmp_path / "load.json"
    code = main(["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "8slots", "--prompt-len",
                 "8", "--gen", "3", "--policies", "lru", "--arrival-rate", "4,40", "--requests", "3",
                 "--max-batch", "2", "--slo-ttft-ms", "0.001", "--prefill-schedule", "prefill-first,mixed",
                 "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0 and [(r["arrival_rate"], r["prefill_schedule"]) for r in rows] == [
        (4.0, "prefill-first"), (4.0, "mixed"), (40.0, "prefill-first"), (40.0, "mixed")]
    for r in rows:
        assert r["requests"] == 3 and r["max_batch"] == 2 and r["slots"] == 8
        assert r["prompt_steps"] == 3 and r["prompt_s"] > 0 and r["decode_steps"] > 0 and r["decode_s"] > 0
        assert 0 < r["decode_split"]["compute_busy_s"] <= r["decode_s"] / r["decode_steps"]
        assert r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] and r["slo_attainment"] == 0.0  # nobody meets 1 us
    assert main(["--model", str(DATA / "small-moe"), "--device", "cpu", "--arrival-rate", "4", "--max-batch", "1,2",
                 "--out", str(tmp_path / "x.json")]) == 2


@pytest.mark.parametrize("policy", ["on-demand", "duoserve"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_mixed_schedule_requests_equal_alone(bundled, policy, chunk):
    """The mixed schedule: a newcomer's prompt (whole, or in chunks of 3 tokens continuing its KV row) runs in
    the same forward as the others' decode tokens; every request's tokens still equal its solo run's, and
    the decode of the others goes on while a prompt is filled (fewer steps than prefill-first)."""
    bundled.configure(policy=policy, memory_budget="6slots", max_batch=6)
    prompts = _prompts(bundled.config.vocab_size, 5, seed=12)
    alone = [bundled.generate(prompt_ids=p, max_new_tokens=6, stop_at_eos=False, return_logits=True, request_id=i)
             for i, p in enumerate(prompts)]
    first = bundled.generate_many(prompts, max_batch=3, max_new_tokens=6, stop_at_eos=False,
                                  prefill_schedule="prefill-first")
    mixed = bundled.generate_many(prompts, max_batch=3, max_new_tokens=6, stop_at_eos=False, return_logits=True,
                                  prefill_schedule="mixed", prefill_chunk=chunk)
    assert_same_as_alone(mixed, alone)
    assert mixed.decode_steps < first.decode_steps  # decode tokens rode in the prompts' steps
    assert mixed.prefill_schedule.startswith("mixed") and first.prefill_schedule == "prefill-first"


def test_bad_schedules_are_named(bundled):
    from duoserve_core.errors import KnobError

    assert bundled.generate_many([[5]], max_new_tokens=2).prefill_schedule == "mixed"  # the default
    with pytest.raises(KnobError, match="unknown prefill schedule 'chunky'"):
        bundled.generate_many([[5]], prefill_schedule="chunky")
    with pytest.raises(KnobError, match="with the mixed schedule only"):
        bundled.generate_many([[5]], prefill_schedule="prefill-first", prefill_chunk=4)
    with pytest.raises(KnobError, match="prefill_chunk 0"):
        bundled.generate_many([[5]], prefill_schedule="mixed", prefill_chunk=0)


def test_bench_duration_replays_the_arrivals_within_it(tmp_path):
    """--duration S: the same seeded Poisson process as --requests, cut at S seconds (so a higher rate brings
    more requests); --requests with --duration is refused."""
    import json

    from duoserve_core.bench.__main__ import main
    from duoserve_core.sim.qos import poisson_arrivals, poisson_arrivals_within

    within = poisson_arrivals_within(20.0, 0.5, seed=0)
    assert within == poisson_arrivals(20.0, len(within), seed=0) and within[-1] < 0.5
    assert len(poisson_arrivals_within(40.0, 0.5, seed=0)) > len(within)
    out = tmp_path / "load.json"
    assert main(["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "8slots", "--prompt-len",
                 "4", "--gen", "2", "--policies", "lru", "--arrival-rate", "6,60", "--duration", "0.3",
                 "--max-batch", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["requests"] for r in rows] == [len(poisson_arrivals_within(r, 0.3)) for r in (6.0, 60.0)]
    assert main(["--model", str(DATA / "small-moe"), "--device", "cpu", "--arrival-rate", "4", "--duration", "1",
                 "--requests", "3", "--out", str(tmp_path / "x.json")]) == 2

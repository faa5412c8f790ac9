"""The benchmark's logic on the CPU: every policy measured, bounds computed from the run itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from duoserve_core.bench import bounds
from duoserve_core.bench.__main__ import main

DATA = Path(__file__).resolve().parents[1] / "data"


def test_bench_runs_policies_and_skips_what_does_not_fit(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "15.5MiB",
                 "--prompt-len", "24", "--gen", "6", "--repeats", "1", "--out", str(out),
                 "--policies", "duoserve,on-demand,lru-speculative,resident",
                 "--predictor", str(DATA / "predictors" / "small-moe-depth2.safetensors")])
    assert code == 0
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"duoserve", "on-demand", "lru-speculative"}
    assert "resident" in record["skipped"] and record["device"] == "cpu"
    assert 0 < record["host_reference_s"] < 1  # the host's speed, as a calibration stores it
    tokens = {name: r["tokens"] for name, r in record["results"].items()}
    assert len(set(map(tuple, tokens.values()))) == 1
    for r in record["results"].values():
        b = r["bounds"]
        assert b["oracle_total_loads"] <= r["phases"]["prefill"]["h2d_copies"] + r["phases"]["decode"]["h2d_copies"]
        assert b["transfer_floor_s"] > 0 and r["ttft_over_floor"] > 0
    results = record["results"]
    t, duo = record["targets"], results["duoserve"]
    assert duo["duoserve_speedup_e2e"] == 1.0
    for r in results.values():
        assert (r["duoserve_speedup_e2e"] > 1) == (r["e2e_s"] > duo["e2e_s"])
    assert t["tpot_over_oracle"]["met"] == (duo["tpot_over_oracle"] <= 1.15)
    assert t["fastest_e2e"]["met"] == all(duo["e2e_s"] < r["e2e_s"] for n, r in results.items() if n != "duoserve")
    d, decode_tokens = t["decode_time"], len(duo["tokens"]) - 1
    assert d["copies_per_token"] * decode_tokens == pytest.approx(duo["phases"]["decode"]["h2d_copies"])
    assert d["oracle_copies_per_token"] * decode_tokens == pytest.approx(duo["bounds"]["oracle_decode_loads"])
    split = duo["decode_split"]  # where a decode step's time went, from the same timeline
    assert split["copies_per_step"] * decode_tokens == pytest.approx(duo["phases"]["decode"]["h2d_copies"])
    assert 0 < split["compute_busy_s"] <= duo["tpot_s"] * (1 + 1e-9) and split["copy_busy_s"] > 0
    assert len(duo["repeats_decode_split"]) == len(duo["repeats_e2e_s"])  # every run's split, fastest first
    assert split in duo["repeats_decode_split"]
    on_demand = results["on-demand"]["phases"]["decode"]  # keeps nothing: every decode use is a copy
    assert on_demand["hits"] == 0 and on_demand["h2d_copies"] == on_demand["misses"] > 0
    assert "TTFT ms" in capsys.readouterr().out


def test_bounds_by_hand():
    rows = [
        {"kind": "h2d", "stream": "copy", "phase": "prefill", "layer": 0, "expert": 0, "nbytes": 100, "duration_ms": 1.0},
        {"kind": "expert", "stream": "compute", "phase": "prefill", "layer": 0, "expert": 0, "step": 0,
         "nbytes": 0, "duration_ms": 0.5},
        {"kind": "expert", "stream": "compute", "phase": "decode", "layer": 0, "expert": 1, "step": 1,
         "nbytes": 0, "duration_ms": 0.1},
        {"kind": "expert", "stream": "compute", "phase": "decode", "layer": 0, "expert": 0, "step": 2,
         "nbytes": 0, "duration_ms": 0.1},
    ]
    b = bounds(rows, num_slots=1, expert_bytes=100, decode_tokens=2)
    assert b["h2d_bandwidth_Bps"] == 100_000
    assert abs(b["transfer_floor_s"] - 1e-3) < 1e-12 and abs(b["ttft_floor_s"] - 1e-3) < 1e-12
    assert b["oracle_decode_loads"] == 2  # one slot: expert 1, then expert 0 again
    assert b["oracle_total_loads"] == 3   # and expert 0 once for the prefill
    assert abs(b["oracle_tpot_s"] - 1e-3) < 1e-12  # 2 loads x 1 ms over 2 tokens


def test_belady_bounds_the_whole_run_not_decode_alone():
    """A prefill that also loads an expert the prompt never uses (a window loads layers whole) can
    leave decode nothing to copy: fewer decode copies than Belady's decode loads, never fewer overall."""
    def row(kind, phase, expert, step):
        return {"kind": kind, "stream": "copy" if kind == "h2d" else "compute", "phase": phase, "layer": 0,
                "expert": expert, "step": step, "nbytes": 100, "duration_ms": 1.0}
    rows = [row("h2d", "prefill", 0, 0), row("h2d", "prefill", 1, 0), row("expert", "prefill", 0, 0),
            row("expert", "decode", 1, 1)]
    b = bounds(rows, num_slots=2, expert_bytes=100, decode_tokens=1)
    policy_decode_copies, policy_copies = 0, 2
    assert policy_decode_copies < b["oracle_decode_loads"] == 1
    assert policy_copies >= b["oracle_total_loads"] == 2


def test_sweep_and_peer(tmp_path):
    """The second command: one loaded model, every knob swept; and the peer's figures beside duoserve's."""
    out = tmp_path / "sweep.json"
    common = ["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "15.5MiB", "--gen", "3",
              "--repeats", "1", "--predictor", str(DATA / "predictors" / "small-moe-depth2.safetensors")]
    assert main(common + ["--sweep", "--prompt-len", "12", "--policies", "duoserve,on-demand", "--prompt-lens", "8,16",
                          "--budgets", "2slots,all", "--depths", "1,2", "--thresholds", "0.5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sweep"], r["policy"]) for r in rows][:4] == [("prompt", "duoserve"), ("prompt", "on-demand")] * 2
    budget_rows = [r for r in rows if r["sweep"] == "budget"]
    assert [r["slots"] for r in budget_rows] == [2, 2, 64, 64, 64] and budget_rows[-1]["policy"] == "resident"
    assert [(r["prefetch_depth"], r["predictor_threshold"]) for r in rows if r["sweep"] == "knobs"] == [(1, 0.5), (2, 0.5)]
    peer = tmp_path / "peer.json"
    peer.write_text(json.dumps({"device": "cpu", "date": "2026-11-23", "prompt_len": 12, "scaling_note": "as run",
                                "ttft_s_scaled_to_full_depth": 2.0, "tpot_s_scaled_to_full_depth": 1.0}))
    assert main(common + ["--prompt-len", "12", "--policies", "duoserve", "--peer", str(peer),
                          "--out", str(tmp_path / "b.json"), "--record-trace", str(tmp_path / "t.parquet")]) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["peer"]["e2e_s"] == 4.0  # 2 s + (3 - 1) x 1 s
    assert record["peer"]["duoserve_speedup_e2e"] == 4.0 / record["results"]["duoserve"]["e2e_s"]
    from duoserve_core.traces import read_trace

    assert len(read_trace(tmp_path / "t.parquet").tokens()) == 12 + 2  # the prompt and the decoded inputs


def test_bench_on_several_devices_names_each_and_records_their_slots(tmp_path, capsys):
    common = ["--model", str(DATA / "small-moe"), "--devices", "cpu,cpu", "--memory-budget", "15.5MiB", "--gen", "3",
              "--prompt-len", "8", "--repeats", "1", "--policies", "on-demand"]
    assert main(common + ["--out", str(tmp_path / "b.json")]) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    r = record["results"]["on-demand"]
    assert record["device"] == r["device"] == "cpu, cpu" and r["runtime"]["devices"] == ["cpu", "cpu"]
    by_device = r["runtime"]["memory_plan_by_device"]
    assert len(by_device) == 2 and sum(d["slots"] for d in by_device) == r["runtime"]["memory_plan"]["num_slots"]
    assert main(common + ["--max-batch", "1", "--out", str(tmp_path / "batch.json")]) == 0
    row = json.loads((tmp_path / "batch.json").read_text())["rows"][0]
    assert row["device_slots"] == [d["slots"] for d in by_device] and row["slots"] == sum(row["device_slots"])
    assert "peak_gpu_bytes_by_device" in row


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_bench_gpus_beyond_the_machine_exit_2(tmp_path, capsys):
    assert main(["--model", str(DATA / "small-moe"), "--gpus", "2", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus 2" in err[0] and not (tmp_path / "b.json").exists()


def test_compare_policies_interleaves_runs_and_starts_each_with_a_fresh_policy():
    """Rounds of every policy (so a drifting machine slows each policy's median alike), a warm-up
    round first, and no policy object survives into another run (no learning from a replayed twin)."""
    from duoserve_core import load
    from duoserve_core.bench import compare_policies
    from duoserve_core.policy import PolicyKnobs

    runtime = load(str(DATA / "small-moe"), device="cpu", memory_budget="15.5MiB", max_context=64)
    seen: list[tuple[str, object]] = []  # the policy objects themselves: a freed one's id could be reused
    generate = runtime.generate

    def spy(**kwargs):
        seen.append((runtime.policy.name, runtime.policy))
        return generate(**kwargs)

    runtime.generate = spy
    results, skipped = compare_policies(runtime, PolicyKnobs(), ["duoserve", "on-demand", "resident"],
                                        list(range(3, 15)), 3, repeats=2, quiet=True)
    assert "resident" in skipped and set(results) == {"duoserve", "on-demand"}
    assert [name for name, _ in seen] == ["duoserve", "on-demand"] * 3
    assert len({id(policy) for _, policy in seen}) == len(seen)
    assert all(len(r["repeats_e2e_s"]) == 2 for r in results.values())
    for r in results.values():  # of two runs the median is the slower: its split is the second
        assert r["repeats_e2e_s"] == sorted(r["repeats_e2e_s"]) and r["decode_split"] == r["repeats_decode_split"][1]
        assert r["ttft_s"] == r["repeats_ttft_s"][1] and r["gc_longest_pause_s"] == r["repeats_gc_longest_pause_s"][1]


def test_resident_is_measured_loaded_and_the_others_cold():
    """A fresh configuration per run must not turn 'resident' into a cold start: its measured runs copy
    nothing (every expert was loaded before, untimed), while a caching policy's prefill copies."""
    from duoserve_core import load
    from duoserve_core.bench import compare_policies
    from duoserve_core.policy import PolicyKnobs

    runtime = load(str(DATA / "small-moe"), device="cpu", memory_budget=None, max_context=64)
    results, skipped = compare_policies(runtime, PolicyKnobs(), ["resident", "lru"], list(range(3, 15)), 3,
                                        repeats=1, quiet=True)
    assert not skipped
    assert results["resident"]["phases"]["prefill"]["h2d_copies"] == 0 == results["resident"]["phases"]["decode"]["h2d_copies"]
    assert results["lru"]["phases"]["prefill"]["h2d_copies"] > 0

"""benchmarks/step_split_table.py: one line per run from real bench files (a plain run and a batch sweep)."""

import json
from pathlib import Path

import pytest

from conftest import benchmark_script
from duoserve_core.bench.__main__ import main as bench
from duoserve_core.timeline import step_split

DATA = Path(__file__).resolve().parents[1] / "data"


def test_a_line_per_run_with_its_decode_step_split(tmp_path, capsys):
    common = ["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "8slots", "--prompt-len", "6",
              "--gen", "3", "--repeats", "1", "--policies", "lru,on-demand"]
    assert bench(common + ["--out", str(tmp_path / "one.json")]) == 0
    assert bench(common + ["--max-batch", "2", "--out", str(tmp_path / "batch.json")]) == 0
    capsys.readouterr()
    script = benchmark_script("step_split_table")
    entries = script.lines(tmp_path / "one.json") + script.lines(tmp_path / "batch.json")
    assert [e["run"] for e in entries] == ["lru, generate", "on-demand, generate", "lru, B 2", "on-demand, B 2"]
    record = json.loads((tmp_path / "batch.json").read_text())["rows"][0]
    assert entries[2]["step_s"] == pytest.approx(record["decode_s"] / record["decode_steps"])
    assert entries[2]["copies_per_step"] == record["decode_split"]["copies_per_step"]
    assert script.main([str(tmp_path / "one.json"), str(tmp_path / "batch.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") == 4 and "| experts ms |" in out  # a line per run under the header
    assert f"| {entries[2]['expert_busy_s'] * 1e3:.1f} |" in out
    assert all("| 0.0 | - |" in line for line in out.splitlines()[2:])  # no CPU lane: nothing per expert
    split = record["decode_split"]
    assert 0 < split["longest_step_s"] and f"| {split['longest_step_s'] * 1e3:.1f} | {split['stall_s'] * 1e3:.1f} |" in out

    # with the CPU lane (half of the experts forced onto it): its busy time over its experts a step
    assert bench(common + ["--cpu-experts", "half", "--out", str(tmp_path / "lane.json")]) == 0
    capsys.readouterr()
    lane = script.lines(tmp_path / "lane.json")
    result = json.loads((tmp_path / "lane.json").read_text())["results"]["lru"]
    assert lane[0]["lane_experts_per_step"] == result["host_computes"] / (len(result["tokens"]) - 1) > 0
    decode_steps = len(result["tokens"]) - 1  # the timeline's lane jobs a step: the decode's lane experts
    assert lane[0]["cpu_jobs_per_step"] * decode_steps == pytest.approx(result["phases"]["decode"]["host_computes"])
    assert script.lane_per_expert(lane[0]) == f"{lane[0]['cpu_busy_s'] / lane[0]['cpu_jobs_per_step'] * 1e3:.2f}"
    older = {k: v for k, v in lane[0].items() if k != "cpu_jobs_per_step"}  # a file from before the split counted jobs
    assert script.lane_per_expert(older) == f"{older['cpu_busy_s'] / older['lane_experts_per_step'] * 1e3:.2f}"

    (tmp_path / "old.json").write_text(json.dumps({"rows": [{"max_batch": 1, "policy": "lru"}]}))
    assert script.main([str(tmp_path / "old.json")]) == 2
    assert "none of the files has a decode_split" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert script.main([str(tmp_path / "bad.json")]) == 2
    assert "is not a bench result" in capsys.readouterr().err


def test_a_stalled_step_counts_beyond_twice_the_median():
    """Steps of 10 ms and one of 45 ms: the longest is 45 ms, and it lost 45 - 2 x 10 = 25 ms to a stall,
    5 ms a step over the five; steps of another phase do not count."""
    def span(step, start, end, stream="compute", phase="decode"):
        return {"stream": stream, "kind": "expert", "phase": phase, "step": step, "layer": 0, "expert": 0,
                "start_ms": start, "end_ms": end, "duration_ms": end - start}
    rows = [span(s, 10 * s, 10 * s + 4) for s in range(4)] + [span(s, 10 * s + 4, 10 * s + 10, "copy") for s in range(4)]
    rows += [span(4, 40, 85), span(5, 0, 500, phase="prefill")]
    split = step_split(rows, "decode", 5)
    assert split["longest_step_s"] == pytest.approx(0.045)
    assert split["stall_s"] == pytest.approx(0.025 / 5)
    assert step_split(rows[:4], "decode", 4)["stall_s"] == 0.0  # equal steps: no stall


def test_runs_prints_every_measured_run_fastest_first(tmp_path, capsys):
    assert bench(["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "8slots", "--prompt-len", "6",
                  "--gen", "3", "--repeats", "2", "--policies", "lru", "--cpu-experts", "half",
                  "--out", str(tmp_path / "two.json")]) == 0
    capsys.readouterr()
    script = benchmark_script("step_split_table")
    result = json.loads((tmp_path / "two.json").read_text())["results"]["lru"]
    entries = script.run_lines(tmp_path / "two.json")
    assert [e["run"] for e in entries] == ["lru, run 1 of 2", "lru, run 2 of 2"]
    assert [e["e2e_s"] for e in entries] == result["repeats_e2e_s"] == sorted(result["repeats_e2e_s"])
    assert entries[1]["longest_step_s"] == result["repeats_decode_split"][1]["longest_step_s"]
    assert script.main(["--runs", str(tmp_path / "two.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[3].startswith(f"| two.json | lru, run 2 of 2 | {entries[1]['e2e_s']:.2f} | "
                                               f"{script.lane_per_expert(entries[1])} |")
    pause = result["repeats_gc_longest_pause_s"][1]  # each run's longest collection, last column
    assert len(result["repeats_gc_longest_pause_s"]) == 2 and out[3].endswith(f"| {pause * 1e3:.1f} |")
    (tmp_path / "old.json").write_text(json.dumps({"results": {"lru": {"tpot_s": 0.1}}}))
    assert script.main(["--runs", str(tmp_path / "old.json")]) == 2
    assert "repeats_decode_split" in capsys.readouterr().err

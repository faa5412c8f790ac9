"""benchmarks/step_split_table.py: one line per run from real bench files (a plain run and a batch sweep)."""

import json
from pathlib import Path

import pytest

from conftest import benchmark_script
from duoserve_core.bench.__main__ import main as bench

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
    assert all(line.endswith("| 0.0 | - |") for line in out.splitlines()[2:])  # no CPU lane: nothing per expert

    # with the CPU lane (half of the experts forced onto it): its busy time over its experts a step
    assert bench(common + ["--cpu-experts", "half", "--out", str(tmp_path / "lane.json")]) == 0
    capsys.readouterr()
    lane = script.lines(tmp_path / "lane.json")
    result = json.loads((tmp_path / "lane.json").read_text())["results"]["lru"]
    assert lane[0]["lane_experts_per_step"] == result["host_computes"] / (len(result["tokens"]) - 1) > 0
    assert script.lane_per_expert(lane[0]) == f"{lane[0]['cpu_busy_s'] / lane[0]['lane_experts_per_step'] * 1e3:.2f}"

    (tmp_path / "old.json").write_text(json.dumps({"rows": [{"max_batch": 1, "policy": "lru"}]}))
    assert script.main([str(tmp_path / "old.json")]) == 2
    assert "none of the files has a decode_split" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert script.main([str(tmp_path / "bad.json")]) == 2
    assert "is not a bench result" in capsys.readouterr().err

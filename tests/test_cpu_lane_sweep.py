"""``benchmarks/cpu_lane_sweep.py``: the CPU lane's sweep measured on this machine's runtime, and two sweep
files side by side (the simulator's error per cell)."""

from __future__ import annotations

import json

from conftest import benchmark_script


def test_a_measured_sweep_writes_a_row_per_cell(tmp_path):
    sweep = benchmark_script("cpu_lane_sweep")
    out = tmp_path / "measured.json"
    assert sweep.main(["--measure", "--model", "synthetic:tiny", "--prompt-len", "16", "--gen", "4",
                       "--budgets", "50%,all", "--threads", "1,2", "--policies", "on-demand", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["gen"] == 4
    assert [(r["budget"], r["cpu_threads"]) for r in record["rows"]] == [("50%", 1), ("50%", 2), ("all", 1), ("all", 2)]
    # on a CPU device auto has nothing to split: no expert goes to the lane
    assert all(r["cpu_share"] == 0 and r["tpot_auto_ms"] > 0 for r in record["rows"])


def test_compare_puts_each_measured_cell_beside_the_simulated_one():
    sweep = benchmark_script("cpu_lane_sweep")
    row = {"budget": "15%", "slots": 22, "policy": "on-demand", "cpu_threads": 16, "tpot_off_ms": 170.0,
           "tpot_auto_ms": 130.0, "auto_over_off": 130 / 170, "cpu_share": 0.5}
    measured = {"device": "NVIDIA H200", "date": "2026-12-02", "gen": 32, "rows": [row, {**row, "cpu_threads": 4}]}
    simulated = {"device": "simulated", "rows": [{**row, "tpot_auto_ms": 117.0}]}
    table = sweep.compare(simulated, measured)
    assert "NVIDIA H200, 2026-12-02, 32 tokens" in table
    assert "| 15% (22 slots) | on-demand | 16 | 170.0 (170.0) | 130.0 (117.0) |" in table and "-10.0% |" in table
    assert "| 4 |" not in table  # a cell the simulated file lacks is left out

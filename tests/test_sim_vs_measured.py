"""benchmarks/sim_vs_measured.py against a real (CPU) bench run: every configuration simulated and tabled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import benchmark_script
from duoserve_core.bench.__main__ import main as bench
from duoserve_core.calibrate.__main__ import main as calibrate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
BENCH = ["--model", str(DATA / "small-moe"), "--device", "cpu", "--memory-budget", "15.5MiB", "--prompt-len", "24",
         "--gen", "6", "--repeats", "1", "--policies", "duoserve,on-demand,lru-speculative",
         "--predictor", str(DATA / "predictors" / "small-moe-depth2.safetensors")]



@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svm")
    assert bench(BENCH + ["--routing-trace", str(DATA / "traces" / "small-moe-heldout.parquet"),
                          "--out", str(folder / "bench_cpu.json")]) == 0
    assert calibrate(["--model", str(DATA / "small-moe"), "--device", "cpu", "--quant", "nf4", "--max-tokens", "32",
                      "--sizes-mib", "1", "--contexts", "16,32", "--repeats", "1", "--quiet",
                      "--out", str(folder / "cal.json")]) == 0
    return folder


def test_every_measured_configuration_is_simulated(measured, capsys):
    out = measured / "table"
    assert benchmark_script("sim_vs_measured").main([str(measured / "bench_cpu.json"), "--calibration", str(measured / "cal.json"),
                           "--out", str(out)]) == 0
    written = json.loads(Path(f"{out}.json").read_text())
    rows = written["rows"]
    assert [r["policy"] for r in rows] == ["duoserve", "on-demand", "lru-speculative"]
    # the run's host speed beside the calibration's: both measured here, on this machine
    assert written["hosts"]["calibration"] > 0 and set(written["hosts"]["files"]) == {"bench_cpu.json"}
    for r in rows:
        assert r["prompt_len"] == 24 and r["gen"] == 6 and r["ttft_sim_s"] > 0 and r["tpot_sim_s"] > 0
        assert r["ttft_rel_error"] == pytest.approx((r["ttft_sim_s"] - r["ttft_measured_s"]) / r["ttft_measured_s"])
    for r in rows[1:]:  # no predictor: the simulator made exactly the runtime's copies
        assert r["h2d_copies_sim"] == r["h2d_copies_measured"] and r["hit_rate_sim"] == r["hit_rate_measured"]
    table = Path(f"{out}.md").read_text()
    assert table.count("| bench_cpu.json |") == 3 and "TPOT err" in table
    assert "Hosts (`host_reference_s`" in table and "`bench_cpu.json` " in table
    assert "on-demand" in capsys.readouterr().out


def test_a_bench_without_routing_trace_is_refused(measured, tmp_path, capsys):
    record = json.loads((measured / "bench_cpu.json").read_text())
    for r in record["results"].values():
        r["runtime"]["routing_trace"] = None
    record["command"] = record["command"].split(" --routing-trace")[0]
    (tmp_path / "b.json").write_text(json.dumps(record))
    assert benchmark_script("sim_vs_measured").main([str(tmp_path / "b.json"), "--calibration", str(measured / "cal.json"),
                           "--out", str(tmp_path / "t")]) == 2
    assert "--routing-trace" in capsys.readouterr().err


def test_a_run_with_graphs_needs_a_calibration_with_them(measured, tmp_path, capsys):
    """The runtime's resolved ``cuda_graphs`` (in each result's ``runtime``) against the calibration's: an
    eager calibration would count the graphs' saved host time as the simulator's error, so the pair is
    refused before anything is simulated or written."""
    record = json.loads((measured / "bench_cpu.json").read_text())
    for r in record["results"].values():
        r["runtime"]["cuda_graphs"] = True
    (tmp_path / "g.json").write_text(json.dumps(record))
    out = tmp_path / "t"
    assert benchmark_script("sim_vs_measured").main([str(tmp_path / "g.json"), "--calibration", str(measured / "cal.json"),
                                                     "--out", str(out)]) == 2
    assert "g.json ran with CUDA graphs" in capsys.readouterr().err and not Path(f"{out}.json").exists()


def test_an_existing_table_needs_force(measured, tmp_path, capsys):
    out = tmp_path / "table"
    Path(f"{out}.md").write_text("an earlier table")
    args = [str(measured / "bench_cpu.json"), "--calibration", str(measured / "cal.json"), "--out", str(out)]
    assert benchmark_script("sim_vs_measured").main(args) == 2
    assert "--force" in capsys.readouterr().err and Path(f"{out}.md").read_text() == "an earlier table"
    assert benchmark_script("sim_vs_measured").main(args + ["--force"]) == 0 and "TPOT err" in Path(f"{out}.md").read_text()


def test_host_terms_borrowed_from_another_calibration_are_used_and_named(measured, tmp_path):
    cal = json.loads((measured / "cal.json").read_text())
    cal["host"]["per_expert_s"], cal["host"]["per_copy_s"] = {"prefill": 0.05, "decode": 0.05}, 0.0
    (tmp_path / "slow_host.json").write_text(json.dumps(cal))
    args = [str(measured / "bench_cpu.json"), "--calibration", str(measured / "cal.json")]
    assert benchmark_script("sim_vs_measured").main(args + ["--out", str(tmp_path / "own")]) == 0
    assert benchmark_script("sim_vs_measured").main(args + ["--host-terms-from", str(tmp_path / "slow_host.json"),
                                  "--out", str(tmp_path / "borrowed")]) == 0
    own = json.loads((tmp_path / "own.json").read_text())["rows"]
    borrowed = json.loads((tmp_path / "borrowed.json").read_text())
    assert borrowed["host_terms_from"]["per_expert_s"] == {"prefill": 0.05, "decode": 0.05}
    # 50 ms of host time per expert: every simulated prefill is slower than with the calibration's own terms
    assert all(b["ttft_sim_s"] > o["ttft_sim_s"] for b, o in zip(borrowed["rows"], own))
    assert "host time per expert and per copy from" in (tmp_path / "borrowed.md").read_text()

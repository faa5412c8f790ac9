"""benchmarks/sim_vs_batch.py on a tiny setting: bench-shaped batch and arrival files, the bundled model
and trace, a hand-made calibration. The simulated figures put in as the measurement come back with
zero error; a measurement twice as fast comes back at -50%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import benchmark_script
from test_sim import fake_calibration

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TRACE = DATA / "traces" / "small-moe-heldout.parquet"
SHAPE = dict(hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)
COMMAND = (f"python -m duoserve_core.bench --model {DATA / 'small-moe'} --quant nf4 --memory-budget 10slots "
           f"--prompt-len 6 --gen 4 --routing-trace {TRACE} --policies on-demand,lru")



@pytest.fixture()
def files(tmp_path):
    """A --max-batch file (B 1 and 3) and an --arrival-rate file, bench-shaped, their figures placeholders."""
    batch = {"max_batch": 0, "policy": "", "slots": 10, "decode_tokens_per_s": 1.0, "tokens_per_s": 1.0,
             "ttft_p50_s": 1.0, "ttft_p99_s": 1.0, "tpot_p50_s": 1.0, "tpot_p99_s": 1.0, "h2d_copies": 1,
             "decode_s": 1.0, "decode_steps": 3}
    pct = {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0}
    (tmp_path / "batch.json").write_text(json.dumps({"command": COMMAND + " --max-batch 1,3", "rows": [
        {**batch, "max_batch": 1, "policy": "on-demand",
         "decode_split": {"copies_per_step": 2.0, "copy_busy_s": 0.004, "compute_busy_s": 0.001, "cpu_busy_s": 0.0}},
        {**batch, "max_batch": 3, "policy": "lru"},
        {"max_batch": 3, "policy": "resident", "skipped": "does not fit"}]}))
    (tmp_path / "arrivals.json").write_text(json.dumps({"command": COMMAND + " --arrival-rate 50 --requests 4 "
                                                        "--max-batch 3", "rows": [
        {"arrival_rate": 50.0, "policy": "lru", "max_batch": 3, "slots": 10, "mean_batch": 1.0, "h2d_copies": 1,
         "requests": 4, "ttft_s": pct, "tpot_s": pct, "latency_s": pct, "queued_s": pct, "tokens_per_s": 1.0}]}))
    cal = fake_calibration(tmp_path / "cal.json", 8, 2, shape=SHAPE)
    return tmp_path, cal


def test_equal_figures_give_zero_error_and_a_faster_measurement_a_negative_one(files):
    from duoserve_core.sim import load_calibration

    folder, cal_path = files
    svb, cal = benchmark_script("sim_vs_batch"), load_calibration(cal_path)
    configs = svb.configurations(folder / "batch.json") + svb.configurations(folder / "arrivals.json")
    assert [(c["kind"], c["policy"], c["max_batch"], c["requests"]) for c in configs] == [
        ("batch", "on-demand", 1, 1), ("batch", "lru", 3, 3), ("arrivals", "lru", 3, 4)]
    assert all(c["slots"] == 10 and c["max_context"] == 10 and c["arrival_rate"] in (None, 50.0) for c in configs)
    rows = []
    for c in configs:
        c["policy_time"] = False  # deterministic: the same run twice gives the same figures
        c["measured"] = svb.simulate(c, cal)["figures"]
        rows.append(svb.compare(c, cal))
    for r in rows:
        assert set(r["figures"]) == set(svb.FIGURES[r["kind"]])
        for name, f in r["figures"].items():
            assert f["measured"] is not None and f["sim"] == f["measured"] and f["rel_error"] == 0.0, name
    assert rows[1]["figures"]["h2d_copies"]["sim"] > 0 and rows[2]["figures"]["mean_batch"]["sim"] > 1
    assert svb.summary(rows)["met"] and svb.summary(rows)["p50_latency"]["max_abs_rel_error"] == 0.0
    # the arrival rows' means are reported beside the target, never judged: a slower mean leaves it met
    slow = dict(configs[2], measured={**configs[2]["measured"], "ttft_mean_s": 2 * configs[2]["measured"]["ttft_mean_s"]})
    means = svb.summary(rows[:2] + [svb.compare(slow, cal)])
    assert means["met"] and means["arrival_means"]["max_abs_rel_error"] == pytest.approx(0.5)

    faster = dict(configs[1], measured={**configs[1]["measured"],
                                        "decode_tokens_per_s": 2 * configs[1]["measured"]["decode_tokens_per_s"]})
    row = svb.compare(faster, cal)
    assert row["figures"]["decode_tokens_per_s"]["rel_error"] == pytest.approx(-0.5)
    summ = svb.summary(rows + [row])
    assert not summ["met"] and summ["decode_tokens_per_s"]["max_abs_rel_error"] == pytest.approx(0.5)
    assert summ["decode_tokens_per_s"]["policy"] == "lru" and summ["decode_tokens_per_s"]["max_batch"] == 3


def test_main_writes_the_table_and_the_summary(files, capsys):
    folder, cal_path = files
    out = folder / "table"
    assert benchmark_script("sim_vs_batch").main([str(folder / "batch.json"), str(folder / "arrivals.json"), "--calibration", str(cal_path),
                           "--out", str(out)]) == 0
    record = json.loads(Path(f"{out}.json").read_text())
    assert [r["kind"] for r in record["rows"]] == ["batch", "batch", "arrivals"]
    assert record["summary"]["target"] == 0.10 and record["summary"]["met"] is False  # placeholders: far off
    table = Path(f"{out}.md").read_text()
    assert "| on-demand | 1 | 10 |" in table and "| lru | 50 | 4 | 3 |" in table and "not met" in table
    # the step split: only the row that measured one, its measured figures beside the simulator's
    split = record["rows"][0]["decode_split"]
    assert split["measured"]["copy_busy_s"] == 0.004 and split["sim"]["copies_per_step"] > 0
    assert record["rows"][1]["decode_split"]["measured"] is None
    assert "| on-demand | B 1 |" in table and "| 2.0 / " in table and "| lru | B 3 |" not in table
    assert "decode throughput" in capsys.readouterr().out


@pytest.mark.parametrize("marked", ["command", "record"])
def test_runs_with_cuda_graphs_need_a_calibration_with_them(files, capsys, marked):
    """A run with CUDA graphs spends less host time than an eager calibration charges: the pair is refused,
    naming the files and the fix, before anything is simulated or written. A file says so by its command
    (``--cuda-graphs``, files before the graphs became the GPU's default) or by its ``cuda_graphs``
    (the runtime's resolved choice, which a command without the flag leaves to the device)."""
    folder, cal_path = files
    graphs = folder / "graphs.json"
    record = json.loads((folder / "batch.json").read_text())
    marks = {"command": record["command"] + " --cuda-graphs"} if marked == "command" else {"cuda_graphs": True}
    graphs.write_text(json.dumps({**record, **marks}))
    out = folder / "refused"
    assert benchmark_script("sim_vs_batch").main([str(graphs), "--calibration", str(cal_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "graphs.json ran with CUDA graphs" in err and "calibrate ... --cuda-graphs) or leave" in err
    assert not Path(f"{out}.json").exists() and not Path(f"{out}.md").exists()


def test_jitter_gives_each_arrival_row_a_band_that_holds_its_own_run(files):
    """``--jitter-runs``: the arrival row's p50s and means get the range of the simulated values when every
    arrival moves within half a decode step (the bench's own arrivals among them); a measurement equal to
    the unjittered simulation lies inside its band (distance 0), one twice as large lies outside it, and the
    summary reports that distance beside the target without judging it."""
    folder, cal_path = files
    svb = benchmark_script("sim_vs_batch")
    from duoserve_core.sim import load_calibration

    cal = load_calibration(cal_path)
    arrivals = svb.bench_arrivals({"arrival_rate": 50.0, "requests": 4})
    moved = svb.jittered(arrivals, 0.01, seed=1)
    assert moved == sorted(moved) and min(moved) >= 0 and moved != arrivals
    assert all(abs(a - b) <= 0.01 for a, b in zip(sorted(arrivals), moved))
    assert svb.jittered(arrivals, 0.01, seed=1) == moved  # seeded

    (config,) = svb.configurations(folder / "arrivals.json")
    config["policy_time"] = False
    config["measured"] = svb.simulate(config, cal)["figures"]
    row = svb.compare(config, cal, jitter_runs=3)
    for name in svb.BANDED:
        f = row["figures"][name]
        assert f["sim_band"][0] <= f["sim"] <= f["sim_band"][1] and f["band_error"] == 0.0, name
    assert "sim_band" not in row["figures"]["tokens_per_s"]
    slow = dict(config, measured={**config["measured"], "ttft_p50_s": 2 * row["figures"]["ttft_p50_s"]["sim_band"][1]})
    far = svb.compare(slow, cal, jitter_runs=3)
    assert far["figures"]["ttft_p50_s"]["band_error"] == pytest.approx(-0.5)
    summ = svb.summary([row, far])
    assert summ["p50_latency_band"]["max_abs_rel_error"] == pytest.approx(0.5)
    assert summ["p50_latency_band"]["figure"] == "ttft_p50_s"
    table = svb.markdown([row, far], summ, "cal.json")
    assert "under arrival jitter" in table and "(-50.0%)" in table
    assert "p50_latency_band" not in svb.summary([svb.compare(config, cal)])  # no jitter, no band


def test_the_table_names_each_runs_host_beside_the_calibrations(files):
    """A file that recorded its host's speed (``host_reference_s``, bench files from 2026-12-02) is listed
    beside the calibration's, with the ratio; the step split gives the time a copy took on each side."""
    folder, cal_path = files
    svb = benchmark_script("sim_vs_batch")
    record = json.loads((folder / "batch.json").read_text())
    (folder / "timed.json").write_text(json.dumps({**record, "host_reference_s": 0.002}))
    from duoserve_core.sim import load_calibration

    raw = json.loads(Path(cal_path).read_text())
    raw["host"]["reference_s"] = 0.001
    (folder / "cal_host.json").write_text(json.dumps(raw))
    cal = load_calibration(folder / "cal_host.json")
    configs = svb.configurations(folder / "timed.json") + svb.configurations(folder / "arrivals.json")
    assert svb.hosts(configs, cal) == {"calibration": 0.001, "files": {"timed.json": 0.002}}
    assert svb.main([str(folder / "timed.json"), "--calibration", str(folder / "cal_host.json"),
                     "--out", str(folder / "t")]) == 0
    table = Path(folder / "t.md").read_text()
    assert "the calibration's 1.00 ms; the runs': `timed.json` 2.00 ms (2.00x)" in table
    assert "| on-demand | B 1 |" in table and "| 0.004 / " not in table and "| 2.00 / " in table  # 4 ms over 2 copies

"""``python -m duoserve_core.sim``: replay, sweep and QoS views, files written, clear errors."""

from __future__ import annotations

import json
import random

import pytest

from duoserve_core.sim.__main__ import main
from test_sim import fake_calibration, hand_trace, model_config


def _files(tmp_path):
    rng = random.Random(0)
    token = lambda: [sorted(rng.sample(range(8), 2)) for _ in range(4)]  # noqa: E731
    requests = [{"prefill": [token() for _ in range(5)], "decode": [token() for _ in range(6)]} for _ in range(3)]
    return (hand_trace(tmp_path / "t.parquet", requests, 4, 8, 2), model_config(tmp_path / "m", 4, 8, 2),
            fake_calibration(tmp_path / "cal.json", 8, 2))


def test_replay_writes_results_and_chrome_traces(tmp_path, capsys):
    trace, model, cal = _files(tmp_path)
    code = main(["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal),
                 "--memory-budget", "10slots", "--policy", "duoserve,on-demand,resident", "--json",
                 "--out", str(tmp_path / "r.json"), "--timeline-out", str(tmp_path / "tl.json")])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.err  # --json: the table on stderr, the record alone on stdout
    printed = json.loads(captured.out)
    written = json.loads((tmp_path / "r.json").read_text())
    assert printed == written and written["view"] == "replay"
    assert set(written["results"]) == {"duoserve", "on-demand"} and "resident" in written["skipped"]
    r = written["results"]["on-demand"]
    assert written["prompt_len"] == 5 and written["gen"] == 7  # the trace request's own lengths
    assert r["expert_misses"] == r["h2d_copies"] > 0 and r["hit_rate"] == 0
    assert r["runtime"]["memory_plan"]["num_slots"] == 10 and "oracle_tpot_s" in r["bounds"]
    for name in ("duoserve", "on-demand"):
        assert json.loads((tmp_path / f"tl.{name}.json").read_text())["traceEvents"]
    assert "TTFT ms" in out


def test_sweep_and_qos_views(tmp_path, capsys):
    trace, model, cal = _files(tmp_path)
    assert main(["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal), "--sweep", "--memory-budget", "all",
                 "--requests", "3", "--out", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert {r["slots"] for r in rows} == set(range(2, 33))
    assert main(["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal),
                 "--memory-budget", "12slots", "--policy", "on-demand,lru-speculative", "--arrivals", "0,0,0.001,1", "--requests", "4",
                 "--slo-ttft-ms", "5", "--out", str(tmp_path / "q.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["view"] == "qos" and len(q["results"]["on-demand"]["requests"]) == 4
    assert 0 <= q["results"]["lru-speculative"]["summary"]["slo_attainment"] <= 1
    assert "SLO met" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    trace, model, _ = _files(tmp_path)
    other = fake_calibration(tmp_path / "other.json", 8, 2, attention_quant="nf4")
    assert main(["--trace", str(trace), "--model-preset", str(model), "--calibration", str(other)]) == 2
    assert "quant-attention" in capsys.readouterr().err
    assert main(["--trace", str(trace), "--model-preset", str(model), "--calibration", str(tmp_path / "no.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    wide = model_config(tmp_path / "wide", 4, 32, 8)
    cal32 = fake_calibration(tmp_path / "c32.json", 32, 8)
    assert main(["--trace", str(trace), "--model-preset", str(wide), "--calibration", str(cal32)]) == 2
    assert "experts" in capsys.readouterr().err
    assert main(["--trace", str(trace), "--model-preset", str(model), "--calibration",
                 str(fake_calibration(tmp_path / "c.json", 8, 2)), "--memory-budget", "1KiB"]) == 2
    assert "too small" in capsys.readouterr().err


def test_several_gpus_say_what_they_assume(tmp_path, capsys):
    trace, model, cal = _files(tmp_path)
    common = ["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal), "--memory-budget", "10slots"]
    assert main(common + ["--policy", "on-demand", "--gpus", "2", "--json"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["gpus"] == 2 and any("identical" in a for a in record["assumptions"])
    assert captured.err.count("note: ") == len(record["assumptions"])
    r = record["results"]["on-demand"]
    slots = r["runtime"]["memory_plan"]["device_slots"]
    assert len(slots) == 2 and slots[0] == 10 and len(r["peak_gpu_bytes_by_device"]) == 2
    assert r["assumptions"] == record["assumptions"]
    assert main(common + ["--policy", "on-demand", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["gpus"] == 1 and one["assumptions"] == [] and one["results"]["on-demand"]["peak_gpu_bytes_by_device"] is None


def test_gpus_takes_a_count(tmp_path, capsys):
    trace, model, cal = _files(tmp_path)
    common = ["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal)]
    for bad in ("0", "auto"):
        with pytest.raises(SystemExit) as exc:
            main(common + ["--gpus", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and "--gpus" in err[0]
    assert main(common + ["--gpus", "2", "--sweep"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sweep" in err[0]


def test_batch_view_gives_the_benchs_batch_rows(tmp_path, capsys):
    """``--max-batch 1,3``: a row per size and policy with ``bench --max-batch``'s fields, all requests
    decoding together (prefill-first: every decode step holds B), a policy the budget cannot hold skipped."""
    trace, model, cal = _files(tmp_path)
    assert main(["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal), "--memory-budget",
                 "10slots", "--policy", "on-demand,resident", "--max-batch", "1,3", "--out", str(tmp_path / "b.json")]) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["view"] == "batch" and record["prefill_schedule"] == "prefill-first"
    rows = [r for r in record["rows"] if "skipped" not in r]
    assert [(r["max_batch"], r["policy"]) for r in rows] == [(1, "on-demand"), (3, "on-demand")]
    assert [r["mean_batch"] for r in rows] == [1.0, 3.0] and all(r["slots"] == 10 for r in rows)
    for r in rows:
        assert r["decode_tokens_per_s_over_copy_floor"] == pytest.approx(
            r["decode_tokens_per_s"] / r["copy_floor_tokens_per_s"])
        assert r["ttft_p50_s"] <= r["ttft_p99_s"] and r["h2d_copies"] > 0
    assert {r["max_batch"] for r in record["rows"] if "skipped" in r} == {1, 3}  # resident: not in 10 slots
    assert "decode tok/s" in capsys.readouterr().out


def test_arrivals_with_a_max_batch_decode_together(tmp_path):
    """With ``--max-batch 2`` two requests arriving at once decode together; one at a time (no
    ``--max-batch``) the second waits for the whole first request."""
    trace, model, cal = _files(tmp_path)
    common = ["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal), "--memory-budget",
              "12slots", "--policy", "on-demand", "--arrivals", "0,0,0.001,1", "--requests", "4"]
    assert main(common + ["--out", str(tmp_path / "fcfs.json")]) == 0
    assert main(common + ["--max-batch", "2", "--prefill-schedule", "mixed", "--out", str(tmp_path / "b2.json")]) == 0
    fcfs, batched = (json.loads((tmp_path / f).read_text()) for f in ("fcfs.json", "b2.json"))
    assert (fcfs["max_batch"], batched["max_batch"], batched["prefill_schedule"]) == (1, 2, "mixed")
    one, two = fcfs["results"]["on-demand"], batched["results"]["on-demand"]
    assert one["mean_batch"] == 1.0 and 1.0 < two["mean_batch"] <= 2.0
    assert two["requests"][1]["queued_s"] < one["requests"][1]["queued_s"]
    assert one["requests"][1]["queued_s"] >= one["requests"][0]["latency_s"] - 1e-9  # waited for the first
    assert len(two["requests"]) == 4 and 0 <= two["summary"]["slo_attainment"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["--arrival-rate", "1", "--max-batch", "1,2"], "takes one size"),
    (["--prefill-schedule", "mixed"], "add --max-batch"),
    (["--sweep", "--max-batch", "2"], "drop --max-batch"),
])
def test_batch_flags_where_they_mean_nothing_exit_2(tmp_path, capsys, extra, message):
    trace, model, cal = _files(tmp_path)
    assert main(["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal)] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

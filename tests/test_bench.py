"""The benchmark's logic on the CPU: every policy measured, bounds computed from the run itself."""

from __future__ import annotations

import json
from pathlib import Path

from duoserve_core.bench import bounds, main

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
    tokens = {name: r["tokens"] for name, r in record["results"].items()}
    assert len(set(map(tuple, tokens.values()))) == 1
    for r in record["results"].values():
        b = r["bounds"]
        assert b["oracle_decode_loads"] <= r["phases"]["decode"]["h2d_copies"] + r["runtime"]["memory_plan"]["num_slots"]
        assert b["transfer_floor_s"] > 0 and r["ttft_over_floor"] > 0
    assert record["results"]["on-demand"]["duoserve_speedup_e2e"] > 0
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
    assert abs(b["oracle_tpot_s"] - 1e-3) < 1e-12  # 2 loads x 1 ms over 2 tokens

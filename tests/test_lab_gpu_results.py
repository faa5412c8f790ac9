"""Committed GPU measurements are read, labelled with device and date, and CPU results are skipped."""

from __future__ import annotations

import json

import pandas as pd

from lab import gpu_results as g


def _generation(policy: str, slots: int, prefill_copies: int) -> dict:
    return {"tokens": [1, 2, 3], "prompt_tokens": 16, "ttft_s": 0.5, "tpot_s": 0.1, "peak_gpu_bytes": 2**30,
            "h2d_bytes": 10, "h2d_bandwidth_gbps": 50.0, "expert_hits": 1, "expert_misses": 2,
            "policy": {"policy": policy},
            "phases": {"prefill": {"h2d_copies": prefill_copies}, "decode": {"misses": 2, "h2d_copies": 2}},
            "runtime": {"model": "synthetic:mixtral-8x7b",
                        "memory_plan": {"num_slots": slots, "total_experts": 256, "expert_bytes": 10**8}}}


def test_both_formats_and_what_is_skipped(tmp_path):
    foundation = {"device": "NVIDIA H100", "date": "2026-01-02", "raw_pinned_h2d_gbps_one_expert": 50.0,
                  "runs": [{**_generation("on-demand", 92, 256),
                            "timeline_ms_by_kind_last_run": [{"phase": "prefill", "kind": "h2d", "duration_ms": 5.0}]}]}
    bench = {"device": "NVIDIA H100", "date": "2026-01-03", "command": "python -m duoserve_core.bench",
             "results": {"duoserve": {**_generation("duoserve", 21, 256),
                                      "bounds": {"transfer_floor_s": 0.4, "ttft_floor_s": 0.4, "oracle_tpot_s": 0.08,
                                                 "oracle_decode_loads": 100, "h2d_bandwidth_Bps": 5e10}}},
             "peer": {"ttft_s": 18.0, "tpot_s": 14.0, "prompt_len": 512, "duoserve_speedup_e2e": 100.0}}
    (tmp_path / "foundation_x.json").write_text(json.dumps(foundation))
    (tmp_path / "bench_x.json").write_text(json.dumps(bench))
    (tmp_path / "policy_counts.json").write_text(json.dumps({"device": "cpu (counts only)", "rows": []}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"device": "NVIDIA H100", "median_us": {}}))
    rows = [{"stream": "copy", "kind": "h2d", "phase": p, "step": s, "layer": 0, "expert": 1, "nbytes": 10,
             "start_ms": float(s), "end_ms": s + 0.5, "duration_ms": 0.5} for p, s in [("prefill", 0), ("decode", 1)]]
    (tmp_path / "timelines").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "timelines" / "bench_x_duoserve.parquet")

    results = g.load_results(tmp_path)
    assert [f["file"] for f in results] == ["bench_x.json", "foundation_x.json"]
    prefill = g.prefill_table(results).set_index("file")
    assert prefill.loc["foundation_x.json", "floor (ms)"] == 512.0          # 256 x 1e8 B / 50 GB/s
    assert prefill.loc["bench_x.json", "TTFT / floor"] == 1.25
    decode = g.decode_table(results).set_index("file")
    assert decode.loc["bench_x.json", "TPOT / oracle"] == 1.25 and decode.loc["bench_x.json", "date"] == "2026-01-03"
    assert g.peer_table(results)["TTFT (s)"].tolist() == [18.0]
    assert g.busy_time_figure(results[1]) is not None and g.busy_time_figure(results[0]) is None
    figs = g.measured_timelines(results, "prefill")
    assert len(figs) == 1 and "NVIDIA H100, 2026-01-03" in figs[0].layout.title.text
    assert len(g.measured_timelines(results, "decode", steps=(1, 1))) == 1


def test_the_committed_results_load():
    for f in g.load_results():
        assert not f["device"].lower().startswith("cpu") and f["runs"]
    g.prefill_table(g.load_results())
    g.decode_table(g.load_results())


def test_timelines_of_one_file():
    results = g.load_results()
    files = g.files_with_timelines(results)
    for name in files[-1:]:
        figs = g.measured_timelines(results, "decode", policies=("duoserve",), steps=(5, 6), file=name)
        assert len(figs) == 1 and name in figs[0].layout.title.text
        assert g.measured_timelines(results, file="no such file") == []

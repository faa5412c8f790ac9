"""The calibration on the CPU: the file is written, valid, positive, and refused for another model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import requires_cuda
from duoserve_core.calibrate import _device_time_per_call, _time_per_call, measure_experts, relayout_terms
from duoserve_core.calibrate.__main__ import main
from duoserve_core.checkpoint import open_source
from duoserve_core.sim.calibration import CalibrationError, load_calibration

ARGS = ["--model", "synthetic:tiny", "--device", "cpu", "--quant", "nf4", "--quant-attention", "nf4",
        "--max-tokens", "16", "--sizes-mib", "1", "--contexts", "16,64", "--repeats", "1", "--quiet"]


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "cpu.json"
    assert main(ARGS + ["--out", str(out), "--cpu-threads", "1,2"]) == 0
    return out


def test_calibration_file_is_written_and_valid(calibration_file):
    raw = json.loads(calibration_file.read_text())
    cal = load_calibration(calibration_file)
    assert raw["device"] == "cpu" and cal.synchronous and raw["model"]["hidden_size"] == 128
    assert raw["quant"] == "nf4" and raw["attention_quant"] == "nf4"
    nf4 = raw["expert_bytes"]["nf4"]
    assert nf4 < raw["expert_bytes"]["bf16"]
    sizes = [b for b, _ in raw["h2d"]["pinned"]]
    assert nf4 in sizes and 2**20 in sizes
    assert [n for n, _ in raw["expert_compute"]["nf4"]] == [1, 2, 4, 8, 16]
    assert [x for x, _ in raw["attention"]["prefill"]] == [16, 64]
    assert all(16 < x < 64 + 8 for x, _ in raw["attention"]["decode"][:1])
    for key in ("attention", "attention_launch", "router"):
        for phase in ("prefill", "decode"):
            assert all(s > 0 for _, s in raw[key][phase]), (key, phase)
    assert all(s > 0 for pts in raw["expert_compute"].values() for _, s in pts)
    layers = raw["model"]["layers_measured"]
    for mode, base in raw["host"]["layer_base_s"].items():  # a layer's bookkeeping is part of a token's wall time
        assert base * layers < raw["overhead_summary"][mode]["wall_per_token_s"], mode
    assert [b for b, _ in raw["h2d"]["runtime"]] == [nf4]  # the runtime's own copies of a record
    assert cal.copy_s(nf4) == raw["h2d"]["runtime"][0][1] and cal.copy_s(nf4, pinned=False) > 0
    assert cal.expert_s("nf4", 3) > 0
    # the CPU runs every op inline: its spans are device time already; batched attention is its own curve,
    # and device routing's gather (two records of the tiny expert) a bandwidth
    assert set(raw["device_time"]) == {"attention_rows", "gather_Bps"}
    assert cal.gather_Bps == raw["device_time"]["gather_Bps"] > 0 and cal.gather_s(nf4) == nf4 / cal.gather_Bps
    rows = raw["device_time"]["attention_rows"]
    assert rows["width"] == 576 and [b for b, _ in rows["decode"]] == [1, 2, 4, 8, 16, 32, 64]
    assert all(s > 0 for _, s in rows["decode"]) and cal.attention_rows is not None


def test_the_host_fit_can_be_redone_from_the_file(calibration_file):
    """``host_fit`` keeps what ``host_terms`` fitted (every timed layer of both modes and phases, and the terms
    measured outright): fitting it again off the machine gives the file's host terms."""
    from duoserve_core.calibrate import host_terms

    raw = json.loads(calibration_file.read_text())
    fit = raw["host_fit"]
    assert set(fit["layers"]) == {"resident", "offloaded"}
    for mode, rows in fit["layers"].items():
        assert {r["phase"] for r in rows} == {"prefill", "decode"} and all(r["post_s"] >= 0 for r in rows), mode
    assert all(r["copies"] == 0 for r in fit["layers"]["resident"]) and any(r["copies"] for r in fit["layers"]["offloaded"])
    again = host_terms({mode: (rows, []) for mode, rows in fit["layers"].items()}, fit["pre_copy_s"], fit["per_expert_s"])
    for key in ("layer_base_s", "per_expert_s", "per_copy_s"):
        assert again[key] == pytest.approx(raw["host"][key]), key


def test_calibration_records_whether_the_runtime_ran_with_cuda_graphs(tmp_path, calibration_file):
    """``--cuda-graphs``: the runtime's runs (the host terms) replay the decode graphs, as a ``--cuda-graphs``
    bench run does, and the file says so (on the CPU: their static functions, run eagerly)."""
    out = tmp_path / "graphs.json"
    assert main(ARGS[:-5] + ["--contexts", "16", "--repeats", "1", "--quiet", "--cuda-graphs", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["cuda_graphs"] is True
    assert json.loads(calibration_file.read_text())["cuda_graphs"] is False
    assert load_calibration(out).copy_s(json.loads(out.read_text())["expert_bytes"]["nf4"]) > 0


def test_calibration_times_the_cpu_lane(calibration_file):
    """``--cpu-threads``: one expert on the CPU lane per thread count; the simulator's lane reads it."""
    raw = json.loads(calibration_file.read_text())
    lane = raw["host_lane"]
    assert lane["default_threads"] == 2 and set(lane["expert"]["nf4"]) == {"1", "2"}
    assert [t for t, _ in lane["expert"]["nf4"]["1"]] == [1, 2, 4, 8, 16, 32]
    assert all(s > 0 for pts in lane["expert"]["nf4"].values() for _, s in pts)
    assert lane["measured_under_copies"] is False  # nothing to copy to on the CPU
    cal = load_calibration(calibration_file)
    curve, threads = cal.host_lane_curve("nf4", None)
    assert threads == 2 and curve.at(4) > 0
    with pytest.raises(CalibrationError, match="at 8 threads"):
        cal.host_lane_curve("nf4", 8)


def test_calibration_refuses_another_model_or_quant(calibration_file):
    cal = load_calibration(calibration_file)
    tiny = open_source("synthetic:tiny").config
    cal.check(tiny, "nf4", "nf4")
    with pytest.raises(CalibrationError, match="hidden_size"):
        cal.check(open_source("synthetic:mixtral-8x7b").config, "nf4", "nf4")
    with pytest.raises(CalibrationError, match="quant-attention"):
        cal.check(tiny, "nf4", "none")


def test_missing_and_malformed_calibration_files(tmp_path, calibration_file):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_calibration(bad)
    raw = json.loads(calibration_file.read_text())
    del raw["h2d"]["pinned"]
    bad.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="malformed"):
        load_calibration(bad)
    raw = json.loads(calibration_file.read_text())
    raw["format"] = "something/2"
    bad.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="not a duoserve-calibration/1"):
        load_calibration(bad)


@requires_cuda
@pytest.mark.gpu
def test_expert_device_time_is_measured_behind_a_sleep_on_cuda():
    """``measure_experts`` on CUDA: a device-time point per token count and format, no longer than
    the back-to-back span (which adds the host's time); ``_device_time_per_call`` sees through a
    call whose host part (a 2 ms Python sleep) dwarfs its kernel."""
    device = torch.device("cuda")
    config = open_source("synthetic:tiny", num_layers=1).config
    tokens = [1, 2, 4, 8, 16, 32, 64]
    span, _, dev = measure_experts(config, ["bf16", "nf4"], tokens, device, torch.bfloat16, torch.bfloat16,
                                   repeats=3, quiet=True)
    assert set(dev) == set(span) == {"bf16", "nf4"}
    for fmt, pts in dev.items():
        assert [n for n, _ in pts] == tokens
        for (_, d), (_, s) in zip(pts, span[fmt]):
            assert 0 < d <= 1.5 * s, (fmt, d, s)
    x = torch.zeros(16, device=device)

    def host_bound() -> None:
        time.sleep(2e-3)
        x.add_(1)

    assert _time_per_call(host_bound, device, 3, 4) > 1.5e-3
    assert _device_time_per_call(host_bound, device, 3, 4) < 0.5e-3


@requires_cuda
@pytest.mark.gpu
def test_batched_attention_is_timed_on_cuda():
    """``measure_batched_attention`` on the GPU (NF4 attention, bf16): a device-time point per row count."""
    import duoserve_core
    from duoserve_core.calibrate import measure_batched_attention

    rt = duoserve_core.load("synthetic:tiny", device="cuda", quant="nf4", attention_quant="nf4", num_layers=2)
    rows = measure_batched_attention(rt, rows=(1, 4, 16), width=64, repeats=2)
    assert rows["width"] == 64 and [b for b, _ in rows["decode"]] == [1, 4, 16]
    assert all(0 < s < 0.05 for _, s in rows["decode"])


def test_measure_experts_on_the_cpu_has_no_device_curve():
    config = open_source("synthetic:tiny", num_layers=1).config
    span, sizes, dev = measure_experts(config, ["nf4"], [1, 2], torch.device("cpu"), torch.float32, torch.float32,
                                       repeats=1, quiet=True)
    assert dev == {} and [n for n, _ in span["nf4"]] == [1, 2] and sizes["nf4"] > 0


def test_host_terms_take_measured_terms_out_of_the_fit():
    """The host's time before a layer's first copy and its time per expert, where measured, are the
    calibration's terms as measured, and the fit explains only the rest (base per mode, per copy)."""
    import random

    from duoserve_core.calibrate import host_terms

    rng = random.Random(0)
    per_expert = {"prefill": 4e-4, "decode": 2e-4}

    def layers(mode: str) -> list[dict]:
        out = []
        for i in range(40):
            phase, experts, copies = ("prefill" if i % 4 == 0 else "decode"), rng.randint(1, 8), 0
            if mode == "offloaded":
                copies = rng.randint(1, experts)
            post = (5e-5 if mode == "resident" else 1.5e-4) + per_expert[phase] * experts + 3e-5 * copies
            out.append({"phase": phase, "experts": experts, "copies": copies, "post_s": post})
        return out

    steps = [{"phase": p, "pre_s": 1e-4, "post_s": 2e-4} for p in ("prefill", "decode")]
    per_mode = {"resident": (layers("resident"), steps), "offloaded": (layers("offloaded"), steps)}
    measured = host_terms(per_mode, pre_copy_s=1.5e-4, per_expert_s=per_expert)
    assert measured["per_expert_s"] == per_expert and measured["layer_base_s"]["offloaded"] == 1.5e-4
    assert measured["layer_base_s"]["resident"] == pytest.approx(5e-5, abs=1e-9)
    assert measured["per_copy_s"] == pytest.approx(3e-5, abs=1e-9)
    fitted = host_terms(per_mode)  # one per-expert figure over both phases: between the two
    assert 2e-4 < fitted["per_expert_s"] < 4e-4


def test_relayout_terms_give_the_mean_and_each_phases_mean():
    layers = [{"phase": "prefill", "relayout_s": [3e-3, 1e-3]}, {"phase": "decode", "relayout_s": [4e-4]},
              {"phase": "decode", "relayout_s": [2e-4]}, {"phase": "decode", "relayout_s": []}]
    terms = relayout_terms(layers)
    assert terms["relayout_s"] == pytest.approx(4.6e-3 / 4)
    assert terms["relayout_by_phase_s"] == pytest.approx({"prefill": 2e-3, "decode": 3e-4})
    assert relayout_terms([{"phase": "decode", "relayout_s": []}]) == {}  # nothing relaid: no term

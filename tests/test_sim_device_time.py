"""The device-time terms: the simulator keeps device time (``device_time``) apart from the host's
time to queue a kernel (``attention_launch``, ``per_expert``), and ``calibrate.device_terms`` reads
them off measured timelines. Hand-made numbers throughout."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from duoserve_core.calibrate import device_terms
from duoserve_core.sim import Simulator
from duoserve_core.sim.calibration import CalibrationError, load_calibration
from duoserve_core.timeline import COLUMNS
from test_sim import MS, setup


def _with(cal_path, **changes):
    raw = json.loads(cal_path.read_text())
    for key, value in changes.items():
        if key == "per_expert_s":
            raw["host"]["per_expert_s"] = value
        else:
            raw[key] = value
    cal_path.write_text(json.dumps(raw))
    return load_calibration(cal_path)


def test_device_time_replaces_the_span_in_its_phase_only(tmp_path):
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]]]}], 1, 2, 1, expert_s=0.4 * MS,
                               attention_s=0.5 * MS, router_s=0.3 * MS)
    cal = _with(tmp_path / "cal.json", device_time={
        "attention": {"decode": [[10, 0.1 * MS]]}, "router": {"decode": [[10, 0.05 * MS]]},
        "expert": {"decode": {"nf4": [[1, 0.02 * MS]]}}, "source": "hand"},
        per_expert_s={"prefill": 0.0, "decode": 0.2 * MS})
    assert cal.attention_device_s("decode", 100) == pytest.approx(0.1 * MS)
    assert cal.attention_device_s("prefill", 100) == pytest.approx(0.5 * MS)  # no device_time: the span
    assert cal.router_device_s("decode", 3) == pytest.approx(0.05 * MS)
    assert cal.expert_device_s("nf4", "decode", 1) == pytest.approx(0.02 * MS)
    assert cal.expert_device_s("nf4", "prefill", 1) == pytest.approx(0.4 * MS)
    assert cal.per_expert("decode") == pytest.approx(0.2 * MS) and cal.per_expert("prefill") == 0.0


def test_expert_is_host_bound_when_queueing_takes_longer_than_the_kernel(tmp_path):
    # One layer, top-1, every expert resident. A decode step: attention 0.1 + router 0.05 (device
    # times), then the expert: the host needs 0.2 ms to queue it and the device 0.02 ms, so its span
    # lasts 0.2 ms (not 0.22: the kernels start as soon as the first is queued): 0.35 ms per token.
    # The old spans (attention 0.5, router 0.3, expert 0.4 back to back) would have given 1.2 ms.
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]], [[0]], [[1]]]}], 1, 2, 1,
                               expert_s=0.4 * MS, attention_s=0.5 * MS, router_s=0.3 * MS)
    cal = _with(tmp_path / "cal.json", device_time={
        "attention": {"decode": [[10, 0.1 * MS]]}, "router": {"decode": [[10, 0.05 * MS]]},
        "expert": {"decode": {"nf4": [[1, 0.02 * MS]]}}},
        per_expert_s={"prefill": 0.0, "decode": 0.2 * MS})
    sim = Simulator(model, cal, replay, "resident", policy_time=False)
    sim.generate(1, 4)  # warm-up: loads every expert
    run = sim.generate(1, 4)
    df = pd.DataFrame(run.rows, columns=COLUMNS)
    experts = df[(df.kind == "expert") & (df.phase == "decode")]
    assert experts.duration_ms.tolist() == pytest.approx([0.2] * 3)
    assert run.tpot_s == pytest.approx(0.35 * MS)


def _span(kind, step, layer, start, end, expert=None, stream="compute"):
    return dict(stream=stream, kind=kind, phase="decode" if step else "prefill", step=step, layer=layer,
                expert=expert, nbytes=0, start_ms=start, end_ms=end, duration_ms=end - start)


def test_device_terms_from_a_hand_made_timeline():
    # Step 2 (context 10 + 2), two layers. Layer 0: router ends at 1.0, its copy lands at 3.0, the
    # expert waits on it (starts 3.0, lasts 0.1: device time). Layer 1's attention starts at once
    # (3.1, 0.11 long) and its router follows (0.12): device times. Layer 1 copies nothing (its
    # expert resident): the stream idles, its expert span (0.6) is the host's time to queue it.
    rows = [_span("attention", 2, 0, 0.0, 0.8), _span("router", 2, 0, 0.8, 1.0),
            _span("h2d", 2, 0, 1.1, 3.0, expert=3, stream="copy"), _span("expert", 2, 0, 3.0, 3.1, expert=3),
            _span("attention", 2, 1, 3.1, 3.21), _span("router", 2, 1, 3.22, 3.34),
            _span("expert", 2, 1, 3.9, 4.5, expert=5)]
    device, host = device_terms([(10, rows)], "nf4")
    assert device["attention"]["decode"] == [[12.0, pytest.approx(0.11e-3)]]
    assert device["router"]["decode"] == [[12.0, pytest.approx(0.12e-3)]]
    assert device["expert"]["decode"]["nf4"] == [[1.0, pytest.approx(0.1e-3)]]
    assert host == pytest.approx(0.6e-3)


def test_expert_device_time_follows_its_token_curve_in_both_phases(tmp_path):
    # calibrate.measure_experts' curve: one expert by token count, the same for both phases.
    # A one-point curve would charge 64 tokens the 1-token time; this one grows with the tokens.
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]]]}], 1, 2, 1, expert_s=0.4 * MS)
    curve = [[1, 0.02 * MS], [4, 0.03 * MS], [16, 0.06 * MS], [64, 0.2 * MS]]
    cal = _with(tmp_path / "cal.json", device_time={"expert": {"prefill": {"nf4": curve}, "decode": {"nf4": curve}}})
    for phase in ("prefill", "decode"):
        assert cal.expert_device_s("nf4", phase, 1) == pytest.approx(0.02 * MS)
        assert cal.expert_device_s("nf4", phase, 64) == pytest.approx(0.2 * MS)
        assert 0.03 * MS < cal.expert_device_s("nf4", phase, 8) < 0.06 * MS  # interpolated
    assert cal.expert_device_s("bf16", "decode", 64) == cal.expert_s("bf16", 64)  # no curve: the span


def test_with_device_time_keeps_the_longer_expert_curve(tmp_path):
    # sim_vs_measured --device-times-from merges device_terms' output (one 1-token decode point):
    # it must not replace the calibration's curve by token count, but it does fill what is missing
    # and replaces attention/router per phase as before.
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]]]}], 1, 2, 1, expert_s=0.4 * MS)
    curve = [[1, 0.02 * MS], [64, 0.2 * MS]]
    cal = _with(tmp_path / "cal.json", device_time={
        "attention": {"decode": [[10, 0.1 * MS]]},
        "expert": {"prefill": {"nf4": curve}, "decode": {"nf4": curve}}, "source": "calibration"})
    bench = {"attention": {"decode": [[12, 0.3 * MS]]}, "expert": {"decode": {"nf4": [[1, 0.05 * MS]],
                                                                             "bf16": [[1, 0.07 * MS]]}},
             "source": "bench"}
    merged = cal.with_device_time(bench, 0.2 * MS)
    assert merged.expert_device_s("nf4", "decode", 64) == pytest.approx(0.2 * MS)  # the curve kept
    assert merged.expert_device_s("nf4", "decode", 1) == pytest.approx(0.02 * MS)
    assert merged.expert_device_s("nf4", "prefill", 64) == pytest.approx(0.2 * MS)
    assert merged.expert_device_s("bf16", "decode", 64) == pytest.approx(0.07 * MS)  # none before: filled in
    assert merged.attention_device_s("decode", 12) == pytest.approx(0.3 * MS)  # attention: replaced
    assert merged.raw["device_time"]["source"].startswith("bench") and "decode.nf4" in merged.raw["device_time"]["source"]
    # over a one-point curve (an older calibration) the bench's point replaces it
    old = _with(tmp_path / "cal.json", device_time={"expert": {"decode": {"nf4": [[1, 0.01 * MS]]}}})
    assert old.with_device_time(bench).expert_device_s("nf4", "decode", 1) == pytest.approx(0.05 * MS)


def test_batched_attention_adds_what_its_rows_measured_over_one(tmp_path):
    """``attention_rows``: a step of B decode rows costs one row's attention at its width plus what B rows
    measured over one; without it, one row reading B x width keys. A malformed section is refused."""
    model, cal, replay = setup(tmp_path, [{"prefill": [[[0]]], "decode": [[[1]]]}], 1, 2, 1, attention_s=0.5 * MS)
    before = cal.decode_attention_device_s(4, 100)
    assert before == pytest.approx(cal.attention_device_s("decode", 400))
    cal = _with(tmp_path / "cal.json", device_time={
        "attention": {"decode": [[10, 0.1 * MS], [1000, 0.2 * MS]]},
        "attention_rows": {"width": 100, "decode": [[1, 0.1 * MS], [4, 0.4 * MS], [16, 1.3 * MS]]}})
    one_row = cal.attention_device_s("decode", 100)
    assert cal.decode_attention_device_s(1, 100) == pytest.approx(one_row)
    assert cal.decode_attention_device_s(4, 100) == pytest.approx(one_row + 0.3 * MS)
    assert cal.decode_attention_device_s(16, 100) == pytest.approx(one_row + 1.2 * MS)
    with pytest.raises(CalibrationError, match="start at 1 row"):
        _with(tmp_path / "cal.json", device_time={"attention_rows": {"width": 100, "decode": [[2, 0.1 * MS]]}})
    with pytest.raises(CalibrationError, match="attention_rows must be"):
        _with(tmp_path / "cal.json", device_time={"attention_rows": [[1, 0.1 * MS]]})

"""The prefill view: overlap arithmetic, the window's bound on memory, and its figures."""

from __future__ import annotations

import pytest

from lab import prefill_view as pf


def test_overlap_of_two_streams():
    rows = [dict(stream="copy", phase="prefill", start_ms=0.0, end_ms=4.0),
            dict(stream="copy", phase="prefill", start_ms=3.0, end_ms=6.0),     # merged with the first: 0-6
            dict(stream="compute", phase="prefill", start_ms=5.0, end_ms=8.0),
            dict(stream="compute", phase="prefill", start_ms=1.0, end_ms=2.0),
            dict(stream="copy", phase="decode", start_ms=0.0, end_ms=100.0)]  # another phase: ignored
    ov = pf.overlap(rows)
    assert ov["copy_ms"] == 6.0 and ov["compute_ms"] == 4.0
    assert ov["overlapped_ms"] == 2.0 and ov["exposed_copy_ms"] == 4.0 and ov["overlap_share"] == pytest.approx(1 / 3)
    assert pf.overlap([])["overlap_share"] is None


@pytest.mark.parametrize("depth", [1, 3])
def test_the_window_holds_at_most_depth_layers_and_misses_nothing(depth):
    run = pf.prefill_run(slots=32, depth=depth, prompt_tokens=32, device="cpu")
    s = pf.prefill_stats(run)
    assert s["peak slots held"] == min(32, depth * 8)
    assert s["demand misses"] == 0 and s["experts copied"] == s["prefetched and used"] + s["wasted prefetches"]
    assert s["copies issued a layer ahead"] == (0 if depth == 1 else s["experts copied"] - 8)
    assert run.decode_tokens == 0
    fig = pf.timeline_figure(run)
    assert {a.text for a in fig.layout.annotations} >= {"transfer floor", "compute floor"}
    res = pf.residency_figure(run)
    assert len(res.data) == 8 and max(res.data[0].y) == 8   # layer 0 held all its experts at once


def test_sweep_and_policy_table():
    df = pf.sweep(depths=(1, 2), slots=(8, 16), prompt_tokens=16, device="cpu")
    assert len(df) == 4
    assert dict(zip(zip(df["slots"], df["depth"]), df["peak slots held"])) == {(8, 1): 8, (8, 2): 8, (16, 1): 8,
                                                                             (16, 2): 16}
    fig = pf.sweep_figure(df)
    assert len(fig.data) == 3 * 2
    table = pf.policy_table(slots=16, depth=2, prompt_tokens=16, device="cpu")
    assert table.loc["on-demand", "demand misses"] == table.loc["on-demand", "experts copied"]
    assert table.loc["duoserve", "demand misses"] == 0

"""The simulator's figures: one line per policy, the axes the notebooks expect."""

from __future__ import annotations

import pytest

from lab.sim_plots import hit_rate_vs_budget, slo_attainment_vs_load, tpot_vs_budget

ROWS = [{"policy": p, "slots": s, "budget_pct": 10.0 + s, "budget_bytes": s * 100, "decode_loads": 10 - s,
         "hit_rate": s / 10, "tpot_overlapped_s": 0.01 * (10 - s), "tpot_serial_s": 0.02 * (10 - s)}
        for p in ("belady", "lru") for s in range(2, 9)]


def test_hit_rate_and_tpot_against_budget():
    fig = hit_rate_vs_budget(ROWS, simulated=[{"policy": "duoserve", "budget_pct": 15.0, "hit_rate": 0.7}])
    assert [t.name for t in fig.data] == ["belady", "lru", "duoserve (simulated)"]
    assert list(fig.data[0].x) == [12.0 + i for i in range(7)] and fig.data[0].line.dash == "dot"
    assert fig.layout.yaxis.title.text == "decode hit rate"
    fig = tpot_vs_budget(ROWS, simulated=[{"policy": "on-demand", "slots": 5, "tpot_s": 0.05}], x="slots")
    names = [t.name for t in fig.data]
    assert names == ["belady", "belady serial", "lru", "lru serial", "on-demand (simulated)"]
    assert fig.data[0].y[0] == 80.0 and fig.data[-1].y[0] == 50.0  # ms
    assert fig.layout.xaxis.title.text == "expert slots"


def test_slo_attainment_against_load():
    rows = [{"policy": p, "arrival_rate": r, "slo_attainment": a, "ttft_p90_s": 0.1, "tpot_p90_s": 0.01}
            for p, shift in (("duoserve", 0.0), ("on-demand", 0.3)) for r, a in ((4, 0.9 - shift), (1, 1.0 - shift))]
    fig = slo_attainment_vs_load(rows)
    assert [t.name for t in fig.data] == ["duoserve", "on-demand"]
    assert list(fig.data[0].x) == [1, 4] and list(fig.data[1].y) == pytest.approx([0.7, 0.6])

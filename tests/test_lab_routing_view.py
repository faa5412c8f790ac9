"""The routing view of notebook 05: simulated decode per routing source against Belady's bound."""

from __future__ import annotations

import pandas as pd
import pytest

from duoserve_core.traces import Trace, expand_trace
from duoserve_core.traces.synth import measure
from lab import routing_view as rv

PROMPT, GEN = 16, 8   # short: the notebook's 64 and 32 take seconds per source


@pytest.fixture(scope="module")
def sweep():
    return rv.budget_sweep("mixtral-like", budgets=(64, 8, 8), prompt_len=PROMPT, gen=GEN)


def test_sweep_has_every_policy_at_every_budget_once(sweep):
    assert list(sweep["slots"].unique()) == [8, 64]
    assert sorted(sweep["policy"]) == sorted(rv.POLICIES * 2)
    assert (sweep["decode tokens"] == GEN - 1).all()


def test_belady_from_the_routing_alone_matches_each_runs_oracle(sweep):
    # sim.reference (one pass, every capacity) and bench.bounds (Belady over the run's own timeline) agree
    loads = rv.belady("mixtral-like", PROMPT, GEN)["Belady's loads"]
    assert (sweep["Belady's loads"].to_numpy() == loads.loc[sweep["slots"]].to_numpy()).all()
    assert loads.is_monotonic_decreasing and loads.loc[8] > loads.loc[64]


def test_belady_bounds_every_policy(sweep):
    assert (sweep["copied in the whole run"] >= sweep["Belady's loads in the whole run"]).all()
    assert (sweep["TPOT (ms)"] >= sweep["Belady TPOT (ms)"]).all()
    # at 8 slots nothing survives from one token to the next: lru copies every expert, as on-demand does
    tight = sweep[sweep["slots"] == 8].set_index("policy")
    assert tight.at["lru", "copies per token"] == tight.at["on-demand", "copies per token"] == rv.LAYERS * rv.TOP_K


def test_violations_name_what_breaks(sweep):
    assert rv.violations(sweep) == []
    slow = sweep.copy()
    slow.loc[(slow["policy"] == "duoserve") & (slow["slots"] == 8), "TPOT (ms)"] *= 1.5
    slow.loc[(slow["policy"] == "lru") & (slow["slots"] == 64), "copied in the whole run"] = 0
    slow.loc[(slow["policy"] == "on-demand") & (slow["slots"] == 64), "TPOT / Belady"] = 0.9
    found = rv.violations(slow)
    assert len(found) == 3
    assert any(v.startswith("lru at 64 slots copied 0") for v in found)
    assert any(v.startswith("on-demand at 64 slots decodes in") for v in found)
    assert any(v.startswith("duoserve at 8 slots decodes") for v in found)
    # 1.02x the better plain cache is the limit at every budget, 64 slots included
    gap = sweep.copy()
    best = gap[(gap["slots"] == 64) & (gap["policy"] != "duoserve")]["TPOT (ms)"].min()
    gap.loc[(gap["policy"] == "duoserve") & (gap["slots"] == 64), "TPOT (ms)"] = 1.05 * best
    assert [v.split(" decodes")[0] for v in rv.violations(gap)] == ["duoserve at 64 slots"]


def test_figure_and_table(sweep):
    fig = rv.budget_figure(sweep, slots=21)
    assert [t.name for t in fig.data] == [*rv.POLICIES, "Belady's bound"]
    assert list(fig.data[-1].x) == list(range(8, 65)) and fig.data[-1].line.dash == "dash"
    assert len(fig.layout.shapes) == 1   # the knob's budget
    table = rv.at_budget(sweep, 8)
    assert list(table.index) == list(rv.POLICIES) and table["TPOT / Belady"].min() >= 1


def test_statistics_table():
    t = rv.statistics("random")
    assert t.shape == (6, 2)
    assert t.columns[0] == "random (4,096 decode tokens)"
    floor = t["uniform random routing"]
    assert floor["previous-token recall@2"] == floor["popularity recall@2"] == 0.25
    assert abs(t.iloc[:, 0] - floor).max() < 0.03   # the random preset has nothing to predict
    with pytest.raises(ValueError, match="unknown routing source"):
        rv.statistics("mixtral")


def test_bundled_statistics_are_those_of_the_32_layer_replay():
    """statistics() measures the bundled trace at its 8 layers; the notebook replays it at 32."""
    trace = rv.routing(rv.BUNDLED)
    part = Trace(trace.df[trace.df["request_id"] < 3].reset_index(drop=True), trace.meta)
    rows, meta = expand_trace(part, rv.LAYERS)
    rows = rows.sort_values(["request_id", "token_index", "layer"], kind="stable").reset_index(drop=True)
    eight, deep = measure(part), measure(Trace(rows, meta))
    assert deep["layers"] == rv.LAYERS
    for key in ("popularity_skew", "first_expert_repeat"):
        for summary in ("mean", "min", "max"):
            assert getattr(pd.Series(eight[key]), summary)() == pytest.approx(getattr(pd.Series(deep[key]), summary)())
    for key in ("previous_token_recall_at_k", "popularity_recall_at_k"):
        assert eight[key] == pytest.approx(deep[key])


def test_measured_sources_show_the_gpu_beside_the_simulator():
    """The committed H200 runs of two routing sources, read with their device, date and calibration."""
    for source in rv.MEASURED_FILES:
        table = rv.measured(source)
        assert list(table.index) == list(rv.POLICIES)
        assert (table["measured TPOT (ms)"] > 0).all() and (table["simulated TPOT (ms)"] > 0).all()
        assert "H200, 2026-12-01" in table.attrs["caption"] and "calibration" in table.attrs["caption"]
        # the policies' committed copies match the simulator's: the comparison is of the same decisions
        measured, simulated = zip(*(c.split(" / ") for c in table["copies measured / simulated"]))
        assert all(abs(int(m) - int(s)) <= 0.01 * int(m) for m, s in zip(measured, simulated))
    assert rv.measured("random") is None


def test_foresight_spans_the_causal_caches_to_belady_and_draws():
    result = rv.foresight("random", 21)
    curve, tokens = result["foresight_copies_per_token"], result["decode_tokens"]
    belady_loads = rv.belady("random").loc[21, "Belady's loads"]  # sim.reference's stack algorithm, same uses
    assert curve["inf"] == pytest.approx(result["belady_copies_per_token"]) == pytest.approx(belady_loads / tokens)
    assert curve["inf"] <= min(curve.values()) and set(result["copies_per_token"]) == {"duoserve", "lru"}
    assert all(c >= curve["inf"] for c in result["copies_per_token"].values())
    fig = rv.foresight_figure(result)
    assert list(fig.data[0].x) == [str(w) for w in curve] and "21 slots" in fig.layout.title.text
    assert [a.text.split(":")[0] for a in fig.layout.annotations][:2] == ["duoserve", "lru"]
    assert "duoserve + gate" in rv.foresight(rv.BUNDLED, 21)["copies_per_token"]

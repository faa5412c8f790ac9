"""The predictor view agrees with ``predict eval`` and draws the threshold trade-off."""

from __future__ import annotations

import numpy as np
import pytest

from lab import predictor_view as pv


@pytest.fixture(scope="module")
def setup():
    train_data, test_data = pv.load_split()
    trained = pv.train(depth=2, epochs=3, hidden=16)
    return train_data, test_data, trained


def test_training_and_the_comparison(setup):
    train_data, test_data, trained = setup
    assert set(trained.predictor.params) == {(l, d) for l in range(7) for d in (1, 2) if l + d <= 7}
    assert "13 MLPs" in pv.describe(trained)   # 7 one layer ahead, 6 two layers ahead
    result = pv.compare(trained.predictor, train_data, test_data, threshold=0.5)
    assert {"predictor (live)", "predictor (bundled)", "affinity", "speculative_gate"} <= set(result["methods"])
    table = pv.comparison_table(result)
    assert np.isnan(table.loc[("speculative_gate", 1), "R@3"])   # the trace keeps only the gate's top-2
    bundled = result["methods"]["predictor (bundled)"]["1"]["overall"]["recall_at"]["2"]
    assert bundled == pytest.approx(0.727, abs=0.001)            # data/README.md's table
    assert len(pv.equal_bytes_figure(result).data) == 2 * 5 + 1
    assert len(pv.per_layer_figure(result, d=2).data) == 5


def test_threshold_sweep_matches_evaluate_and_trades_recall_for_bytes(setup):
    train_data, test_data, trained = setup
    sweep = pv.threshold_sweep(trained.predictor, train_data, test_data, thresholds=(0.2, 0.5, 0.8))
    live = sweep[(sweep["method"] == "predictor (live)") & (sweep["depth"] == 1)].set_index("threshold")
    assert live["recall"].is_monotonic_decreasing and live["experts_per_token"].is_monotonic_decreasing
    result = pv.compare(trained.predictor, train_data, test_data, threshold=0.5, bundled=False)
    overall = result["methods"]["predictor (live)"]["1"]["overall"]
    assert live.loc[0.5, "recall"] == pytest.approx(overall["recall"])
    assert live.loc[0.5, "experts_per_layer"] == pytest.approx(overall["experts_per_layer"])
    gate = sweep[sweep["method"] == "speculative_gate"]
    assert len(gate) == 1 and gate["threshold"].isna().all() and gate["experts_per_layer"].iloc[0] == pytest.approx(2)
    fig = pv.threshold_figure(sweep, 0.5, depth=1)
    assert any(t.text is not None and "threshold 0.50" in t.text[0] for t in fig.data if t.mode == "markers+text")
    assert list(pv.at_threshold(sweep, 0.5).index.get_level_values(0)).count("predictor (live)") == 2


def test_token_figure_marks_the_routers_choice(setup):
    _, test_data, trained = setup
    fig = pv.token_figure(trained.predictor, test_data, token=3)
    assert np.asarray(fig.data[0].z).shape == (7, 8) and len(fig.data[1].x) == 7 * 2

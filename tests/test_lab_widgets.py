"""Knobs bound to live outputs: drawn once with the defaults, redrawn in place on a change."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

from lab.widgets import REDRAWING, Knobs, _bundle, budget_slider, depth_slider, threshold_slider


class FakeHandle:
    def __init__(self, data, metadata):
        self.shown = [data]
        self.metadata = metadata

    def update(self, data, metadata=None, raw=False):
        assert raw
        self.shown.append(data)


def fake_show(data, metadata=None, raw=False, display_id=None):
    assert raw and display_id is True
    return FakeHandle(data, metadata)


def knobs() -> Knobs:
    return Knobs(slots=budget_slider(16), depth=depth_slider(2), threshold=threshold_slider(0.5))


def test_live_draws_the_defaults_and_redraws_only_for_its_own_knobs():
    k = knobs()
    calls = []

    def draw(slots, depth):
        calls.append((slots, depth))
        return f"{slots} slots, depth {depth}", pd.DataFrame({"slots": [slots]})

    out = k.live(draw, show=fake_show)
    assert calls == [(16, 2)] and out.names == ["slots", "depth"]
    assert [h.shown[0]["text/markdown"] for h in out.handles[:1]] == ["16 slots, depth 2"]
    assert "text/html" in out.handles[1].shown[0]

    k.controls["threshold"].value = 0.7          # not a parameter of draw: nothing happens
    assert calls == [(16, 2)]
    k.controls["slots"].value = 8
    assert calls == [(16, 2), (8, 2)] and out.redraws == 1
    first = out.handles[0].shown
    assert first[1] == REDRAWING and first[2]["text/markdown"] == "8 slots, depth 2"
    assert "redrawn" in k.status.value


def test_a_failing_redraw_says_why_in_place_and_keeps_the_panel_alive():
    k = knobs()

    def draw(slots):
        if slots < 4:
            raise ValueError("budget too small")
        return go.Figure(go.Bar(x=[1], y=[slots]), layout=dict(title=f"{slots}"))

    out = k.live(draw, show=fake_show)
    assert "application/vnd.plotly.v1+json" in out.handles[0].shown[0]
    k.controls["slots"].value = 2
    assert "budget too small" in out.handles[0].shown[-1]["text/markdown"]
    k.controls["slots"].value = 6
    assert out.handles[0].shown[-1]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] == "6"


def test_kwargs_functions_take_every_knob_and_unknown_names_are_refused():
    k = knobs()
    seen = []
    k.live(lambda **v: seen.append(dict(v)) or "ok", show=fake_show)
    assert seen == [{"slots": 16, "depth": 2, "threshold": 0.5}]
    with pytest.raises(TypeError, match="budget"):
        k.live(lambda budget: budget, show=fake_show)


def test_cached_runs_once_per_setting():
    k = knobs()
    runs = []
    run = k.cached(lambda slots: runs.append(slots) or slots * 2)
    k.live(lambda slots: str(run(slots)), show=fake_show)
    k.live(lambda slots: str(run(slots) + 1), show=fake_show)
    assert runs == [16]
    k.controls["slots"].value = 32
    assert runs == [16, 32]


def test_bundles_carry_a_text_fallback():
    fig = go.Figure(go.Bar(x=[1], y=[2]), layout=dict(title="t"))
    data, _ = _bundle(fig)
    assert data["text/plain"] == "<plotly figure: t>" and "application/vnd.plotly.v1+json" in data
    assert _bundle("**x**")[0]["text/markdown"] == "**x**"

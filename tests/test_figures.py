"""Figures are built from real runtime output and carry what they claim to show."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import duoserve_core
from duoserve_core.traces import read_trace
from lab.figures import expert_counts, expert_heatmap, stream_timeline

DATA = Path(__file__).resolve().parents[1] / "data"


def test_stream_timeline_has_a_bar_per_span_and_the_floor_line():
    rt = duoserve_core.load(DATA / "small-moe", device="cpu", quant="nf4", max_context=64)
    rt.generate("The following", max_new_tokens=3)
    df = rt.timeline.to_dataframe()
    fig = stream_timeline(df, floors_ms={"transfer floor": 1.0})
    bars = sum(len(t.x) for t in fig.data)
    assert bars == len(df)
    assert {t.name for t in fig.data} == set(df["kind"])
    assert fig.layout.shapes and fig.layout.shapes[0].x0 == 1.0


def test_expert_heatmap_counts_match_the_trace():
    trace = read_trace(DATA / "traces" / "small-moe-heldout.parquet")
    counts = expert_counts(trace, "decode")
    decode_tokens = int((trace.tokens()["phase"] == "decode").sum())
    assert counts.shape == (8, 8) and (counts.sum(axis=1) == decode_tokens * 2).all()
    fig = expert_heatmap(counts)
    assert np.allclose(np.asarray(fig.data[0].z).sum(axis=1), 1.0)

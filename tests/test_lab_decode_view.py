"""The decode view: counts against Belady's oracle, the per-step heatmap, the sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from lab import decode_view as dv


@pytest.fixture(scope="module")
def run():
    return dv.decode_run(slots=12, depth=2, threshold=0.5, gate=True, prompt_tokens=16, new_tokens=6, device="cpu")


def test_stats_are_consistent(run):
    s = dv.decode_stats(run)
    assert s["decode tokens"] == 5
    assert s["hits"] + s["misses"] == 5 * 8 * 2
    assert s["experts copied"] == s["misses"] + s["prefetched"]
    assert s["copied in the whole run"] >= s["Belady's loads in the whole run"] >= s["Belady's loads"]
    assert s["copies per token"] == pytest.approx(s["experts copied"] / 5)
    assert "Belady's loads" in dv.summary(run).index


def test_heatmap_counts_the_misses(run):
    fig = dv.step_heatmap(run)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (8, 5) and z.sum() == run.result.phases["decode"]["misses"]
    assert sum(fig.data[1].y) == run.result.phases["decode"]["prefetch_wasted"]
    assert len(dv.decode_timeline(run, steps=(1, 2)).data) >= 3


def test_sweeps_share_tokens_and_respect_the_oracle():
    df = dv.budget_sweep(slots=(8, 64), new_tokens=4, prompt_tokens=16, device="cpu")
    assert len(df) == 2 * 4 and df["tokens"].nunique() == 1
    assert (df["copied in the whole run"] >= df["Belady's loads in the whole run"]).all()
    assert (df[df["slots"] == 64]["Belady's loads"] == 0).all()   # everything fits: nothing to load in decode
    assert len(dv.budget_figure(df).data) == 3 * 4 + 2
    ks = dv.knob_sweep(slots=8, depths=(1,), thresholds=(0.2, 0.8), new_tokens=4, prompt_tokens=16, device="cpu")
    low, high = ks.iloc[0], ks.iloc[1]
    assert low["prefetched"] >= high["prefetched"]   # a lower threshold prefetches more
    assert len(dv.knob_figure(ks).data) == 3

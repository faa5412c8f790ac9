"""Routing statistics on traces where the answer is known by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from duoserve_core.traces import Trace, TraceMeta
from lab.routing_stats import load_balance, random_repeat_rates, repeat_rates


def _trace(sequences, E=4, k=2):
    rows = []
    for r, seq in enumerate(sequences):
        for t, per_layer in enumerate(seq):
            for l, experts in enumerate(per_layer):
                rows.append({"request_id": r, "token_index": t, "phase": "prefill" if t == 0 else "decode",
                             "layer": l, "experts": experts})
    return Trace(pd.DataFrame(rows), TraceMeta("hand", len(sequences[0][0]), E, k))


def test_repeat_rates_by_hand():
    # one layer; tokens: [0,1] -> [0,2] (first repeats) -> [3,1] (shares 1? no: {0,2} vs {3,1} share nothing)
    trace = _trace([[[[0, 1]], [[0, 2]], [[3, 1]]], [[[2, 3]], [[3, 2]]]])
    rates = repeat_rates(trace)
    # pairs within requests: (01->02), (02->31), (23->32): first repeats 1/3, any shared 2/3
    assert rates["first_choice_repeat"][0] == pytest.approx(1 / 3)
    assert rates["any_shared"][0] == pytest.approx(2 / 3)


def test_load_balance_and_random_rates():
    trace = _trace([[[[0, 1]], [[0, 2]]]])
    balance = load_balance(trace)
    assert balance.loc[0].tolist() == [0.5, 0.25, 0.25, 0.0]
    first, share = random_repeat_rates(8, 2)
    assert first == 0.125 and share == pytest.approx(1 - 15 / 28)


def test_layer_affinity_by_hand():
    from lab.routing_stats import layer_affinity

    # two layers, E=4, k=2: token A: {0,1} -> {2,3}; token B: {0,2} -> {2,1}
    trace = _trace([[[[0, 1], [2, 3]], [[0, 2], [2, 1]]]])
    a = layer_affinity(trace, 0)
    assert a[0].tolist() == [0.0, 0.5, 1.0, 0.5]  # expert 0 chosen twice: 2 always follows, 1 and 3 once each
    assert a[1].tolist() == [0.0, 0.0, 1.0, 1.0] and a[3].tolist() == [0.0] * 4

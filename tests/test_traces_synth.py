"""Synthetic routing traces: the statistics by hand, the knobs and presets measured back, the file
through the reader and the replay, and the ``synth`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from duoserve_core.traces import RoutingReplay, Trace, TraceError, TraceMeta, read_trace, write_trace
from duoserve_core.traces.__main__ import main
from duoserve_core.traces.synth import (
    PRESETS, first_expert_repeat, layer_affinity, layer_profile, measure, popularity_recall_at_k, popularity_skew,
    preset_arguments, previous_token_recall_at_k, speculative_gate_precision, synthesize)

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "traces" / "small-moe-heldout.parquet"


def _trace(**arguments) -> Trace:
    df, meta = synthesize(**arguments)
    return Trace(df, meta)


def _preset(name: str, **overrides) -> Trace:
    return _trace(**preset_arguments(name, **overrides))


def test_statistics_by_hand():
    # one request, E=4, k=2, two layers; token 0 is a prompt token, so it only ever is a pair's earlier half
    experts = {0: [[0, 1], [0, 2], [3, 0], [3, 0]], 1: [[2, 3], [1, 2], [1, 2], [3, 1]]}
    spec = [[2, 3], [1, 2], [0, 2], [2, 0]]  # layer 0's guess at layer 1: prompt token ignored, then 2 + 1 + 0 hits
    rows = [{"request_id": 0, "token_index": t, "phase": "prefill" if t == 0 else "decode", "layer": l,
             "experts": experts[l][t], "spec_experts": spec[t] if l == 0 else None}
            for t in range(4) for l in range(2)]
    trace = Trace(pd.DataFrame(rows), TraceMeta("hand", 2, 4, 2))
    # pairs (0,1), (1,2), (2,3): first choices 0=0, 0!=3, 3=3 at layer 0; 2!=1, 1=1, 1!=3 at layer 1
    assert first_expert_repeat(trace).tolist() == pytest.approx([2 / 3, 1 / 3])
    # shared halves: 1/2, 1/2, 1 at layer 0; 1/2, 1, 1/2 at layer 1
    assert previous_token_recall_at_k(trace) == pytest.approx(2 / 3)
    # decode counts per expert: layer 0 [3, 0, 1, 2], layer 1 [0, 3, 2, 1]: top-2 hold 5 of 6 at both
    # (with the prompt token layer 0 would read 6 of 8)
    assert popularity_recall_at_k(trace) == pytest.approx(5 / 6)
    # Gini of counts {0, 1, 2, 3}: sum |x_i - x_j| over ordered pairs (20) / (2 E sum x = 48)
    assert popularity_skew(trace).tolist() == pytest.approx([20 / 48, 20 / 48])
    # P(. at 1 | e at 0): e0 [0, 1, 2/3, 1/3], e2 [0, 1, 1, 0], e3 [0, 1, 1/2, 1/2]: every token guesses {1, 2};
    # the truth is {1, 2}, {1, 2}, {1, 3}
    assert layer_affinity(trace).tolist() == pytest.approx([5 / 6])
    assert speculative_gate_precision(trace) == pytest.approx(3 / 6)


def test_statistics_need_decode_tokens():
    df, meta = synthesize(**preset_arguments("random", layers=2, tokens=1, requests=2, seed=0))
    df["phase"] = "prefill"
    with pytest.raises(TraceError, match="no decode tokens"):
        measure(Trace(df, meta))


@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4)])
def test_random_has_no_structure(experts, top_k):
    s = measure(_preset("random", layers=6, experts=experts, top_k=top_k))
    assert np.abs(np.array(s["first_expert_repeat"]) - 1 / experts).max() < 0.03
    assert s["previous_token_recall_at_k"] == pytest.approx(top_k / experts, abs=0.01)
    assert s["popularity_recall_at_k"] == pytest.approx(top_k / experts, abs=0.02)
    assert s["layer_affinity_mean"] < top_k / experts + 0.04  # in-sample fitting is all it can gain
    assert max(s["popularity_skew"]) < 0.06
    assert s["speculative_gate_precision"] is None


def test_mixtral_like_hits_the_measured_profile():
    s = measure(_preset("mixtral-like"))
    repeat = s["first_expert_repeat"]
    assert (s["layers"], s["experts"], s["top_k"]) == (32, 8, 2)
    assert repeat[0] == pytest.approx(0.12, abs=0.04)
    assert repeat[15] == pytest.approx(0.31, abs=0.04)
    assert repeat[31] == pytest.approx(0.21, abs=0.04)
    assert s["previous_token_recall_at_k"] == pytest.approx(0.35, abs=0.04)
    assert s["popularity_recall_at_k"] == pytest.approx(0.26, abs=0.04)


def test_bundled_like_lands_near_the_bundled_trace():
    real, synth = measure(read_trace(HELDOUT)), measure(_preset("bundled-like"))
    assert np.abs(np.subtract(real["first_expert_repeat"], synth["first_expert_repeat"])).max() < 0.04
    for key in ("previous_token_recall_at_k", "popularity_recall_at_k", "layer_affinity_mean"):
        assert synth[key] == pytest.approx(real[key], abs=0.03), key
    assert np.mean(synth["popularity_skew"]) == pytest.approx(np.mean(real["popularity_skew"]), abs=0.03)
    # and far more predictable than the random floor
    assert synth["previous_token_recall_at_k"] > 0.25 + 0.1


def test_higher_repeat_gives_more_first_expert_repeats():
    base = dict(layers=4, experts=8, top_k=2, tokens=64, requests=32, affinity=0.0, skew=0.0, seed=1)
    rates = [first_expert_repeat(_trace(**base, repeat=r)).mean() for r in (0.0, 0.3, 0.6)]
    assert rates[0] == pytest.approx(1 / 8, abs=0.02)
    assert rates[1] > rates[0] + 0.12 and rates[2] > rates[1] + 0.12


def test_higher_affinity_gives_more_layer_affinity():
    base = dict(layers=6, experts=8, top_k=2, tokens=64, requests=32, repeat=0.0, skew=0.3, seed=2)
    measured = [layer_affinity(_trace(**base, affinity=a)).mean() for a in (0.0, 0.5, 1.0)]
    assert measured[1] > measured[0] + 0.15
    assert measured[2] == pytest.approx(1.0)  # a permutation kernel at full strength: layer l+1 is determined


def test_a_repeat_profile_shapes_the_layers():
    trace = _trace(layers=8, experts=8, top_k=2, tokens=64, requests=32, repeat=(0.0, 0.7), affinity=0.0,
                   skew=0.0, seed=3)
    rates = first_expert_repeat(trace)
    assert rates[0] == pytest.approx(1 / 8, abs=0.03) and rates[-1] > rates[0] + 0.35
    assert layer_profile((0.0, 1.0), 5, "--repeat").tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_profile([0.1, 0.5, 0.2], 3, "--repeat").tolist() == [0.1, 0.5, 0.2]  # one per layer: as is


def test_rows_are_well_formed_and_deterministic():
    arguments = preset_arguments("bundled-like", layers=3, tokens=5, requests=4, prompt_len=2, seed=7)
    df, meta = synthesize(**arguments)
    assert len(df) == 4 * (2 + 5) * 3
    first = df[(df["request_id"] == 1) & (df["layer"] == 0)]
    assert first["token_index"].tolist() == list(range(7))
    assert first["phase"].tolist() == ["prefill"] * 2 + ["decode"] * 5
    experts, weights = np.array(df["experts"].tolist()), np.array(df["weights"].tolist())
    assert (experts[:, 0] != experts[:, 1]).all()
    assert np.allclose(weights.sum(1), 1) and (weights[:, 0] >= weights[:, 1]).all()
    assert measure(Trace(df, meta))["decode_tokens"] == 4 * 5
    assert synthesize(**arguments)[0].equals(df)
    assert not synthesize(**{**arguments, "seed": 8})[0]["experts"].equals(df["experts"])


@pytest.mark.parametrize("precision", [0.0, 0.7, 1.0])
def test_gate_column_has_the_asked_precision(precision):
    trace = _preset("bundled-like", layers=4, tokens=32, requests=16, gate_precision=precision)
    assert speculative_gate_precision(trace) == pytest.approx(precision, abs=0.03)
    spec = trace.df["spec_experts"]
    assert spec[trace.df["layer"] == 3].isna().all() and spec[trace.df["layer"] < 3].notna().all()
    guesses = np.array(spec[trace.df["layer"] < 3].tolist())
    assert (guesses[:, 0] != guesses[:, 1]).all()


def test_file_round_trips_and_replays(tmp_path):
    df, meta = synthesize(**preset_arguments("bundled-like", layers=4, tokens=6, requests=3, prompt_len=2,
                                             gate_precision=0.8, seed=0))
    write_trace(tmp_path / "s.parquet", df, meta)
    trace = read_trace(tmp_path / "s.parquet")
    assert trace.meta == meta and trace.has_weights
    assert trace.df["experts"].map(list).tolist() == df["experts"].tolist()
    ids, spec = trace.expert_array(), trace.expert_array("spec_experts")
    request_1 = np.flatnonzero(trace.tokens()["request_id"].to_numpy() == 1)

    same = RoutingReplay(trace, num_layers=4, num_experts=8, top_k=2)
    experts, weights = same.routing(1, 0, 8, 2)
    assert experts.tolist() == ids[request_1, 2].tolist()
    assert np.allclose(weights.numpy(), trace.weight_array()[request_1, 2])
    assert same.speculation(1, 0, 8, 0).tolist() == spec[request_1, 0].tolist()

    deeper = RoutingReplay(trace, num_layers=10, num_experts=8, top_k=2)
    block_1, _ = deeper.routing(1, 0, 8, 6)  # model layer 6 replays trace layer 2, relabelled
    mapping = dict(zip(ids[request_1, 2].ravel().tolist(), block_1.ravel().tolist()))
    assert len(set(mapping.values())) == len(mapping)  # one fixed relabelling, so repeats survive it
    assert deeper.speculation(1, 0, 8, 3) is None and deeper.speculation(1, 0, 8, 7) is None  # ends of blocks


@pytest.mark.parametrize("overrides,message", [
    ({"top_k": 9}, "--top-k 9 exceeds --experts 8"),
    ({"repeat": 1.5}, r"--repeat must be a probability in \[0, 1\]"),
    ({"affinity": (0.2, -0.1)}, r"--affinity must be a probability in \[0, 1\]"),
    ({"tokens": 0}, "--tokens must be at least 1"),
    ({"skew": -1.0}, "--skew must be a number >= 0"),
    ({"gate_precision": 1.2}, r"--gate-precision must be in \[0, 1\]"),
    ({"experts": 3, "gate_precision": 0.5}, "needs --experts at least 2 x --top-k = 4"),
    ({"layers": 1, "gate_precision": 0.5}, "needs --layers at least 2"),
    ({"seed": -1}, "--seed must be at least 0"),
])
def test_bad_arguments_name_the_fix(overrides, message):
    with pytest.raises(TraceError, match=message):
        synthesize(**preset_arguments("random", **{"layers": 2, "tokens": 2, "requests": 1, **overrides}))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(TraceError, match="choose one of random, mixtral-like, bundled-like"):
        preset_arguments("mixtral")
    assert set(PRESETS) == {"random", "mixtral-like", "bundled-like"}


SMALL = ["--layers", "3", "--tokens", "8", "--requests", "4"]


def test_cli_writes_once_and_reports(tmp_path, capsys):
    out = tmp_path / "s.parquet"
    args = ["synth", "--preset", "bundled-like", *SMALL, "--repeat", "0.1,0.5", "--out", str(out)]
    assert main(args) == 0
    trace = read_trace(out)
    assert (trace.meta.num_layers, trace.meta.num_experts, len(trace.tokens())) == (3, 8, 32)
    assert "first-expert repeat" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and err.count("\n") == 1
    assert main(args + ["--force", "--seed", "5"]) == 0
    assert not read_trace(out).df["experts"].map(list).equals(trace.df["experts"].map(list))


def test_cli_json_is_json_alone(tmp_path, capsys):
    out = tmp_path / "s.parquet"
    assert main(["synth", *SMALL, "--gate-precision", "0.9", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and result["preset"] == "random"
    assert result["statistics"] == measure(read_trace(out))
    assert result["statistics"]["speculative_gate_precision"] == pytest.approx(0.9, abs=0.08)


@pytest.mark.parametrize("bad,message", [
    (["--top-k", "9"], "--top-k 9 exceeds --experts 8"),
    (["--repeat", "often"], "--repeat takes a probability or comma-separated ones"),
    (["--affinity", "2"], "--affinity must be a probability"),
    (["--preset", "mixtral"], "unknown preset 'mixtral'; choose one of random, mixtral-like, bundled-like"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bad, message):
    out = tmp_path / "s.parquet"
    assert main(["synth", *SMALL, *bad, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1
    assert captured.out == "" and not out.exists()

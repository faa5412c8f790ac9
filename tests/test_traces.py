"""The trace format: round trips, other shapes, minimal traces, malformed files, and real recordings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import duoserve_core
from duoserve_core.traces import TraceError, TraceMeta, read_trace, record, write_trace
from duoserve_core.traces.__main__ import main


def _synthetic(num_experts=8, top_k=2, layers=3, requests=2, tokens=4, weights=True, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(requests):
        for t in range(tokens):
            for l in range(layers):
                experts = rng.choice(num_experts, size=top_k, replace=False).tolist()
                row = {"request_id": r, "token_index": t, "phase": "prefill" if t < 2 else "decode", "layer": l,
                       "experts": experts}
                if weights:
                    w = rng.random(top_k)
                    row["weights"] = sorted((w / w.sum()).tolist(), reverse=True)
                rows.append(row)
    return pd.DataFrame(rows), TraceMeta("test", layers, num_experts, top_k)


def test_round_trip(tmp_path):
    df, meta = _synthetic()
    write_trace(tmp_path / "t.parquet", df, meta)
    trace = read_trace(tmp_path / "t.parquet")
    assert trace.meta == meta and trace.has_weights
    assert trace.df["experts"].map(list).tolist() == df["experts"].tolist()
    arr = trace.expert_array()
    assert arr.shape == (8, 3, 2) and arr[0, 1].tolist() == df.iloc[1]["experts"]


def test_32_experts_top8(tmp_path):
    df, meta = _synthetic(num_experts=32, top_k=8, layers=5)
    write_trace(tmp_path / "t.parquet", df, meta)
    trace = read_trace(tmp_path / "t.parquet")
    assert trace.expert_array().shape == (8, 5, 8) and trace.expert_array().max() < 32


def test_trace_with_only_experts(tmp_path):
    df, meta = _synthetic(weights=False)
    write_trace(tmp_path / "t.parquet", df, meta)
    trace = read_trace(tmp_path / "t.parquet")
    assert not trace.has_weights
    assert np.allclose(trace.weight_array(), 0.5)


def test_malformed_files_get_clear_errors(tmp_path):
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TraceError, match="not a readable Parquet trace"):
        read_trace(tmp_path / "junk.parquet")
    with pytest.raises(TraceError, match="does not exist"):
        read_trace(tmp_path / "absent.parquet")
    df, meta = _synthetic()
    df.drop(columns=["layer"]).to_parquet(tmp_path / "nolayer.parquet")
    with pytest.raises(TraceError, match="lacks trace metadata"):
        read_trace(tmp_path / "nolayer.parquet")
    bad = df.copy()
    bad["experts"] = [[0, 9]] + bad["experts"].tolist()[1:]
    with pytest.raises(TraceError, match="expert id outside 0..7"):
        write_trace(tmp_path / "bad.parquet", bad, meta)
    short = df[df["layer"] != 2]
    with pytest.raises(TraceError, match="a row for each of the 3 layers"):
        write_trace(tmp_path / "short.parquet", short, meta)
    assert not (tmp_path / "bad.parquet").exists() and not (tmp_path / "short.parquet").exists()


def test_refuses_to_overwrite(tmp_path):
    df, meta = _synthetic()
    write_trace(tmp_path / "t.parquet", df, meta)
    with pytest.raises(TraceError, match="exists; .* --force"):
        write_trace(tmp_path / "t.parquet", df, meta)
    write_trace(tmp_path / "t.parquet", df, meta, overwrite=True)


def test_recorded_routing_is_the_routers_choice(tiny_checkpoint, reference_model):
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", policy="resident")
    prompt = [5, 17, 33, 2, 71]
    df, meta = record(rt, [prompt], max_new_tokens=3, keep_probs=True)
    assert (meta.num_layers, meta.num_experts, meta.top_k) == (3, 6, 2)
    tokens = df.groupby("token_index")["phase"].first()
    assert tokens.tolist() == ["prefill"] * 5 + ["decode"] * 2  # the third token is sampled, never run
    # transformers' own router logits for the same sequence give the same top-k, in router order
    full = prompt + rt.generate(prompt_ids=prompt, max_new_tokens=3).tokens[:2]
    with torch.no_grad():
        out = reference_model(torch.tensor([full]), output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):
        expected = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1).indices.tolist()
        got = df[df["layer"] == layer].sort_values("token_index")["experts"].tolist()
        assert got == expected
    spec = df[df["layer"] < 2]["spec_experts"]
    assert spec.map(len).eq(2).all() and df[df["layer"] == 2]["spec_experts"].isna().all()


def test_record_cli(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    assert main(["record", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--max-new-tokens", "2",
                 "--out", str(tmp_path / "t.parquet"), "--device", "cpu"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_record_cli_writes_a_readable_trace_once(checkpoint_with_tokenizer, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick brown fox\n\nexperts live in host memory\n")
    out = tmp_path / "t.parquet"
    args = ["record", "--model", str(checkpoint_with_tokenizer), "--prompts", str(prompts), "--max-new-tokens", "3",
            "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    trace = read_trace(out)
    assert trace.df["request_id"].nunique() == 2 and set(trace.df["phase"]) == {"prefill", "decode"}
    assert main(args) == 2  # refuses to overwrite
    assert main(args + ["--force"]) == 0


def test_routing_replay_drives_the_experts(tiny_checkpoint, tmp_path):
    """With --routing-trace, recorded routing is the trace's, whatever the router would pick."""
    df, meta = _synthetic(num_experts=6, top_k=2, layers=3, requests=2, tokens=6)
    meta = TraceMeta("hand", 3, 6, 2)
    write_trace(tmp_path / "r.parquet", df, meta)
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", routing_trace=tmp_path / "r.parquet")
    got, _ = record(rt, [[5, 17, 33, 2], [7, 7]], max_new_tokens=4)
    want = read_trace(tmp_path / "r.parquet").df
    for _, row in got.iterrows():
        src = want[(want["request_id"] == row["request_id"]) & (want["token_index"] == row["token_index"] % 6)
                   & (want["layer"] == row["layer"])].iloc[0]
        assert list(row["experts"]) == list(src["experts"])
        assert np.allclose(row["weights"], src["weights"], atol=1e-6)
    natural = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none")
    assert record(natural, [[5, 17, 33, 2]], max_new_tokens=4)[0]["experts"].tolist() != \
        got[got["request_id"] == 0]["experts"].tolist()


def test_routing_replay_relabels_blocks_and_checks_shape(tmp_path):
    from duoserve_core.traces import RoutingReplay

    df, meta = _synthetic(num_experts=8, top_k=2, layers=2, requests=1, tokens=3)
    write_trace(tmp_path / "r.parquet", df, meta)
    trace = read_trace(tmp_path / "r.parquet")
    replay = RoutingReplay(trace, num_layers=6, num_experts=8, top_k=2)
    e0, w0 = replay.routing(0, 0, 3, 0)
    e2, w2 = replay.routing(0, 0, 3, 2)  # layer 2 = trace layer 0 of block 1: same tokens, relabelled
    assert torch.equal(w0, w2) and torch.equal(replay.relabel[1][e0], e2)
    assert e0.tolist() == trace.expert_array()[:, 0].tolist()
    with pytest.raises(TraceError, match="routes over 8 experts, top-2; the model has 6"):
        RoutingReplay(trace, num_layers=2, num_experts=6, top_k=2)


def test_expanded_trace_is_what_the_replay_feeds_a_deeper_model(tmp_path):
    """``traces expand`` writes the routing RoutingReplay gives a deeper model, gate guesses included."""
    from duoserve_core.traces import RoutingReplay

    df, meta = _synthetic(num_experts=8, top_k=2, layers=2, requests=2, tokens=3)
    nxt = df["experts"].tolist()[1:] + [None]  # rows run (request, token, layer): the next row is layer 1
    df["spec_experts"] = [None if l == 1 else list(n) for l, n in zip(df["layer"], nxt)]  # a perfect gate
    write_trace(tmp_path / "r.parquet", df, meta)
    trace = read_trace(tmp_path / "r.parquet")
    assert main(["expand", "--trace", str(tmp_path / "r.parquet"), "--layers", "6",
                 "--out", str(tmp_path / "x.parquet")]) == 0
    deep = read_trace(tmp_path / "x.parquet")
    assert deep.meta.num_layers == 6 and len(deep.tokens()) == len(trace.tokens())
    replay = RoutingReplay(trace, num_layers=6, num_experts=8, top_k=2)
    arr, spec = deep.expert_array(), deep.expert_array("spec_experts")
    for request in (0, 1):
        rows = np.flatnonzero(deep.tokens()["request_id"].to_numpy() == request)
        for layer in range(6):
            assert arr[rows, layer].tolist() == replay.routing(request, 0, 3, layer)[0].tolist()
            guess = replay.speculation(request, 0, 3, layer)
            if layer % 2 == 1:  # the trace's last layer: no guess recorded, none replayed
                assert guess is None and (spec[rows, layer] == -1).all()
            else:  # the gate's guess for layer+1, relabelled like layer+1 (same block)
                assert spec[rows, layer].tolist() == guess.tolist()
                assert guess.tolist() == replay.routing(request, 0, 3, layer + 1)[0].tolist()

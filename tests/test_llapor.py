"""LLaPor: the hidden-state column of traces, recording it, and the layer-aware predictor on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import duoserve_core
from duoserve_core.predict import PredictorError
from duoserve_core.predict import llapor
from duoserve_core.predict.data import from_trace
from duoserve_core.predict.llapor import (GUESS_COLUMN, annotate, layer_hidden, load_llapor, main, train_llapor)
from duoserve_core.traces import (META_KEYS, RoutingReplay, Trace, TraceError, TraceMeta, read_trace, record,
                                  write_trace)
from duoserve_core.traces.hidden import HIDDEN_COLUMN, fit_basis, read_hidden

PROMPTS = [[5, 17, 33, 2, 71], [9, 9, 40, 3], [60, 1, 22, 7, 8, 30], [44, 12], [3, 80, 15, 15, 2],
           [70, 71, 72], [11, 23, 5, 6], [90, 2, 18, 54, 33]]
DIMS = 4


def _synthetic(hidden: bool, layers=3, experts=6, k=2, tokens=5, dims=3, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(tokens):
        for layer in range(layers):
            rows.append({"request_id": 0, "token_index": t, "phase": "prefill" if t < 2 else "decode",
                         "layer": layer, "experts": rng.choice(experts, k, replace=False).tolist(),
                         "weights": [0.6, 0.4]})
    df, meta = pd.DataFrame(rows), TraceMeta("synthetic", layers, experts, k)
    if hidden:
        raw = torch.from_numpy(rng.normal(size=(tokens, layers, 16)).astype(np.float32))
        meta.hidden_basis = fit_basis([raw[:, l] for l in range(layers)], dims, "synthetic")
        df[HIDDEN_COLUMN] = pd.Series([meta.hidden_basis.project(r.layer, raw[r.token_index, r.layer][None])[0].numpy()
                                       for r in df.itertuples()], dtype=object)
    return Trace(df, meta)


def test_hidden_column_round_trips_and_old_readers_ignore_it(tmp_path):
    trace = _synthetic(hidden=True)
    write_trace(tmp_path / "h.parquet", trace.df, trace.meta)
    back = read_trace(tmp_path / "h.parquet")
    basis = back.meta.hidden_basis
    assert basis.fingerprint() == trace.meta.hidden_basis.fingerprint() and basis.dims == 3
    assert pq.read_schema(tmp_path / "h.parquet").field(HIDDEN_COLUMN).type.value_type == "float"  # float32 stored
    expected = np.stack(trace.df[HIDDEN_COLUMN].to_numpy()).reshape(5, 3, 3)
    np.testing.assert_array_equal(back.hidden_array(), expected)
    coords, b = read_hidden(tmp_path / "h.parquet")
    np.testing.assert_array_equal(coords, expected)
    assert b.fingerprint() == basis.fingerprint()
    # a format-1 reader knows four metadata keys and the v1 columns; the rest it never looks at
    table = pq.read_table(tmp_path / "h.parquet")
    raw = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    v1 = Trace(table.to_pandas(), TraceMeta(raw["model"], *(int(raw[k]) for k in META_KEYS[1:])))
    np.testing.assert_array_equal(v1.expert_array(), back.expert_array())
    assert from_trace(back).experts.shape == (5, 3, 2)  # the id-only predictor's reader
    RoutingReplay(back, 6, 6, 2)  # and the replay's
    # new code reads old traces: no column, no basis; asking for hidden states names the fix
    plain = _synthetic(hidden=False)
    write_trace(tmp_path / "old.parquet", plain.df, plain.meta)
    old = read_trace(tmp_path / "old.parquet")
    assert old.meta.hidden_basis is None and old.meta == plain.meta
    with pytest.raises(TraceError, match="--hidden-dims"):
        old.hidden_array()
    with pytest.raises(TraceError, match="--hidden-dims"):
        read_hidden(tmp_path / "old.parquet")
    # coordinates without their basis, or of the wrong width, are refused
    with pytest.raises(TraceError, match="no PCA basis"):
        write_trace(tmp_path / "bad.parquet", trace.df, plain.meta)
    short = trace.df.copy()
    short[HIDDEN_COLUMN] = short[HIDDEN_COLUMN].map(lambda v: v[:2])
    with pytest.raises(TraceError, match="3 coordinates"):
        write_trace(tmp_path / "bad.parquet", short, trace.meta)


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint, reference_model):
    """The tiny model's routing and MoE inputs for PROMPTS, recorded with a fitted basis."""
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", policy="resident")
    df, meta = record(rt, PROMPTS, max_new_tokens=8, hidden_dims=DIMS)
    return rt, Trace(df.sort_values(["request_id", "token_index", "layer"]).reset_index(drop=True), meta)


def test_record_captures_each_moe_layers_input(recorded, reference_model, tmp_path):
    rt, trace = recorded
    basis = trace.meta.hidden_basis
    assert (basis.num_layers, basis.dims, basis.hidden_size) == (3, DIMS, 64)
    assert 0 < basis.explained.sum(1).min() and basis.explained.sum(1).max() <= 1 + 1e-6
    # the coordinates are those of transformers' own MoE-block inputs (the tensor the router reads)
    prompt = PROMPTS[0]
    rows = trace.df[trace.df["request_id"] == 0]
    full = prompt + rt.generate(prompt_ids=prompt, max_new_tokens=8).tokens[:7]
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0][0]))
             for i, layer in enumerate(reference_model.model.layers)]
    try:
        with torch.no_grad():
            reference_model(torch.tensor([full]))
    finally:
        for h in hooks:
            h.remove()
    for layer in range(3):
        got = np.stack(rows[rows["layer"] == layer].sort_values("token_index")[HIDDEN_COLUMN].to_numpy())
        np.testing.assert_allclose(got, basis.project(layer, inputs[layer]).numpy(), atol=1e-4)
    # recording with that basis gives the same coordinates, and the routing is unchanged by the hooks
    df2, meta2 = record(rt, PROMPTS[:2], max_new_tokens=8, hidden_basis=basis)
    plain, _ = record(rt, PROMPTS[:2], max_new_tokens=8)
    assert meta2.hidden_basis is basis and df2["experts"].tolist() == plain["experts"].tolist()
    first = trace.df[trace.df["request_id"] < 2]
    np.testing.assert_allclose(np.stack(df2.sort_values(["request_id", "token_index", "layer"])[HIDDEN_COLUMN]),
                               np.stack(first[HIDDEN_COLUMN]), atol=1e-5)


@pytest.fixture(scope="module")
def trained(recorded, tmp_path_factory):
    _, trace = recorded
    folder = tmp_path_factory.mktemp("llapor")
    write_trace(folder / "t.parquet", trace.df, trace.meta)
    predictor = train_llapor([folder / "t.parquet"], depth=2, max_iter=30, shallow=(8,), deep=(16, 8))
    predictor.save(folder / "p.safetensors")
    return folder, predictor


def test_tiny_llapor_predicts_probabilities_and_round_trips(recorded, trained):
    rt, trace = recorded
    folder, predictor = trained
    arrays, hidden = from_trace(trace), torch.from_numpy(trace.hidden_array())
    assert predictor.hidden == {0: (16, 8), 1: (16, 8)}  # 3 layers: every source layer is a middle one
    loaded = load_llapor(folder / "p.safetensors", expect=trace.meta)
    for layer in range(3):
        feats = predictor.features(layer, arrays.experts, arrays.weights, arrays.prev_experts, hidden[:, layer])
        assert feats.shape == (arrays.num_tokens, (4 + 3) * 6 + DIMS)
        probs = predictor.predict(layer, feats)
        assert probs.shape == (arrays.num_tokens, min(2, 2 - layer), 6)
        assert ((probs >= 0) & (probs <= 1)).all()
        torch.testing.assert_close(loaded.predict(layer, loaded.features(
            layer, arrays.experts, arrays.weights, arrays.prev_experts, hidden[:, layer])), probs)
    # serving compresses the raw MoE input with the basis in the file: the trace's coordinates
    raw = torch.randn(5, 64)
    torch.testing.assert_close(loaded.compress(1, raw), trace.meta.hidden_basis.project(1, raw))
    # the hidden state reaches the output (the MLPs read it)
    shifted = hidden[:, 0] + 3 * predictor.scale[0]
    assert not torch.equal(predictor.predict(0, predictor.features(0, arrays.experts, arrays.weights,
                                                                   arrays.prev_experts, shifted)),
                           predictor.predict(0, predictor.features(0, arrays.experts, arrays.weights,
                                                                   arrays.prev_experts, hidden[:, 0])))


def test_middle_layers_get_deeper_mlps():
    assert [len(layer_hidden(l, 8)) for l in range(8)] == [1, 1, 2, 2, 2, 2, 1, 1]
    assert [len(layer_hidden(l, 32)) for l in (0, 7, 8, 23, 24, 31)] == [1, 1, 2, 2, 1, 1]


def test_wrong_model_shape_format_or_basis_is_rejected(trained, tmp_path):
    folder, predictor = trained
    with pytest.raises(PredictorError, match=r"\(3 layers x 6 experts, top-2\) but is used with 'other' \(4 layers"):
        load_llapor(folder / "p.safetensors", expect=("other", 4, 6, 2))
    with pytest.raises(PredictorError, match="6 experts, top-2.*8 experts, top-2"):
        load_llapor(folder / "p.safetensors", expect=("other", 3, 8, 2))
    save_file({"x": torch.zeros(1)}, tmp_path / "id_only.safetensors", metadata={"format": "duoserve-predictor/2"})
    with pytest.raises(PredictorError, match="not a duoserve-llapor/1 file"):  # the id-only predictor's format
        load_llapor(tmp_path / "id_only.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(PredictorError, match="not a readable predictor"):
        load_llapor(tmp_path / "junk.safetensors")
    other = _synthetic(hidden=True, dims=DIMS)
    with pytest.raises(PredictorError, match="basis"):
        predictor.check_basis(other.meta.hidden_basis, "other.parquet")
    with pytest.raises(PredictorError, match="--hidden-basis"):
        annotate(_synthetic(hidden=False), predictor)


def test_annotate_writes_llapor_experts(recorded, trained, capsys):
    _, trace = recorded
    folder, predictor = trained
    out = folder / "annotated.parquet"
    args = ["annotate", "--trace", str(folder / "t.parquet"), "--predictor", str(folder / "p.safetensors"),
            "--out", str(out)]
    assert main(args) == 0 and GUESS_COLUMN in capsys.readouterr().out
    assert main(args) == 2  # refuses to replace it without --force
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    back = read_trace(out)
    assert back.meta.hidden_basis.fingerprint() == trace.meta.hidden_basis.fingerprint()
    np.testing.assert_array_equal(back.expert_array("spec_experts"),
                                  read_trace(folder / "t.parquet").expert_array("spec_experts"))  # the gate's, kept
    guesses = back.expert_array(GUESS_COLUMN)
    assert (guesses[:, 2] == -1).all() and back.df.loc[back.df["layer"] == 2, GUESS_COLUMN].isna().all()
    assert (guesses[:, :2] >= 0).all() and (guesses[:, :2, 0] != guesses[:, :2, 1]).all()
    arrays, hidden = from_trace(back), torch.from_numpy(back.hidden_array())
    probs = predictor.predict(1, predictor.features(1, arrays.experts, arrays.weights, arrays.prev_experts,
                                                    hidden[:, 1]))[:, 0]
    assert (probs.gather(1, torch.from_numpy(guesses[:, 1])).min(1).values >= probs.topk(2).values[:, 1]).all()


def test_eval_cli_json_and_errors(trained, capsys, tmp_path):
    folder, _ = trained
    assert main(["eval", "--trace", str(folder / "t.parquet"), "--predictor", str(folder / "p.safetensors"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # the JSON alone
    assert set(result["methods"]) == {"llapor", "previous_token", "speculative_gate"}
    assert set(result["methods"]["llapor"]) == {"1", "2"} and set(result["methods"]["speculative_gate"]) == {"1"}
    assert 0 <= result["methods"]["llapor"]["1"]["overall"]["recall_at"]["2"] <= 1
    assert main(["eval", "--trace", str(tmp_path / "absent.parquet"), "--predictor",
                 str(folder / "p.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("terminate", [False, True], ids=["ctrl-c", "sigterm"])
def test_interrupted_training_writes_nothing(trained, monkeypatch, capsys, terminate):
    """sklearn's MLP swallows a Ctrl-C (or SIGTERM's exception) in its epoch loop and returns
    half-trained: training must stop, with 130 or 143."""
    import os
    import signal

    folder, _ = trained
    out = folder / "interrupted.safetensors"
    out.write_bytes(b"the previous predictor")

    def interrupt(self, *args):
        if terminate:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises where the work is
        raise KeyboardInterrupt

    monkeypatch.setattr(llapor.MLPClassifier, "_update_no_improvement_count", interrupt)
    code = main(["train", "--trace", str(folder / "t.parquet"), "--depth", "1", "--out", str(out), "--force"])
    assert code == (143 if terminate else 130) and capsys.readouterr().err.endswith("interrupted; nothing written\n")
    assert out.read_bytes() == b"the previous predictor"
    assert not [p for p in folder.iterdir() if p.name.startswith(".interrupted")]


def test_record_cli_hidden_flags(checkpoint_with_tokenizer, tmp_path, capsys):
    from duoserve_core.traces.__main__ import main as traces_main

    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick brown fox\nexperts live in host memory\n")
    base = ["record", "--model", str(checkpoint_with_tokenizer), "--prompts", str(prompts), "--max-new-tokens", "3",
            "--device", "cpu"]
    assert traces_main(base + ["--out", str(tmp_path / "a.parquet"), "--hidden-dims", "5"]) == 0
    assert "5 of 64 dimensions" in capsys.readouterr().out
    a = read_trace(tmp_path / "a.parquet")
    assert a.hidden_array().shape == (a.tokens().shape[0], 3, 5)
    assert traces_main(base + ["--out", str(tmp_path / "b.parquet"), "--hidden-basis", str(tmp_path / "a.parquet")]) == 0
    assert read_trace(tmp_path / "b.parquet").meta.hidden_basis.fingerprint() == a.meta.hidden_basis.fingerprint()
    plain = _synthetic(hidden=False)
    write_trace(tmp_path / "plain.parquet", plain.df, plain.meta)
    capsys.readouterr()
    assert traces_main(base + ["--out", str(tmp_path / "c.parquet"), "--hidden-basis", str(tmp_path / "plain.parquet")]) == 2
    assert "holds no hidden-state basis" in capsys.readouterr().err
    assert traces_main(base + ["--out", str(tmp_path / "c.parquet"), "--hidden-dims", "65"]) == 2
    assert "hidden size is 64" in capsys.readouterr().err and not (tmp_path / "c.parquet").exists()

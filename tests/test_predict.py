"""The decode-phase expert predictor: it learns planted routing structure, its file round-trips and
refuses other shapes, the fused serving forward is each (layer, depth) model's, format-1 files still
load, the metrics are right by hand, and the CLI runs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import duoserve_core
from duoserve_core.predict import FeatureSpec, PredictorError, layer_features, load_predictor, train_predictor
from duoserve_core.predict.baselines import fit_baselines
from duoserve_core.predict.cli import main
from duoserve_core.predict.data import load_arrays
from duoserve_core.predict.evaluate import calibration, count, evaluate, metrics, reliability
from duoserve_core.predict.graph import GraphedPredictor
from duoserve_core.predict.features import prev_token_similarity, prev_token_targets
from duoserve_core.predict.layer_predictor import FORMAT_V1, fit_predictor
from duoserve_core.sim import Simulator, build_model, load_calibration
from duoserve_core.traces import RoutingReplay, TraceMeta, read_trace, write_trace

from conftest import make_reference, requires_cuda, save_checkpoint
from test_sim import fake_calibration, model_config

ROOT = Path(__file__).resolve().parents[1]


def planted(num_experts=8, top_k=2, layers=4, requests=16, prefill=4, decode=24, noise=0.1, seed=0):
    """Routing where layer l+1's experts are a fixed permutation of layer l's, each id replaced by a
    random other expert with probability ``noise``; layer 0 is uniform. The permutations do not
    depend on ``seed``, so a train and a test trace share the structure but not the tokens."""
    rng = np.random.default_rng(seed)
    perms = [np.random.default_rng(1000 + layer).permutation(num_experts) for layer in range(layers)]
    rows = []
    for r in range(requests):
        for t in range(prefill + decode):
            cur = rng.choice(num_experts, size=top_k, replace=False)
            for layer in range(layers):
                if layer:
                    cur = perms[layer][cur]
                    for j in np.flatnonzero(rng.random(top_k) < noise):
                        cur[j] = rng.choice(np.setdiff1d(np.arange(num_experts), cur))
                w = np.sort(rng.random(top_k))[::-1]
                rows.append({"request_id": r, "token_index": t, "phase": "prefill" if t < prefill else "decode",
                             "layer": layer, "experts": cur.tolist(), "weights": (w / w.sum()).tolist()})
    return pd.DataFrame(rows), TraceMeta("planted", layers, num_experts, top_k)


def write(path, df_meta):
    write_trace(path, *df_meta)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A planted E=8 top-2 trace pair and a depth-2 predictor trained on the first."""
    d = tmp_path_factory.mktemp("predict")
    train = write(d / "train.parquet", planted(seed=0))
    test = write(d / "test.parquet", planted(seed=1, requests=6))
    predictor = train_predictor([train], depth=2, window=2, max_iter=200)
    return train, test, predictor


@pytest.mark.parametrize("num_experts,top_k,layers,depth", [(8, 2, 4, 2), (32, 8, 3, 1)])
def test_recovers_planted_structure(tmp_path, small, num_experts, top_k, layers, depth):
    if num_experts == 8:
        train, test, predictor = small
    else:
        train = write(tmp_path / "train.parquet", planted(num_experts, top_k, layers, requests=40, seed=0))
        test = write(tmp_path / "test.parquet", planted(num_experts, top_k, layers, requests=6, seed=1))
        predictor = train_predictor([train], depth=depth, window=2, max_iter=200)
    baselines = fit_baselines(load_arrays([train]).select(("decode",)), depth)
    result = evaluate(load_arrays([test]), predictor, baselines)
    k = str(top_k)
    for d in range(1, depth + 1):
        ours = result["methods"]["predictor"][str(d)]["overall"]
        popular = result["methods"]["popularity"][str(d)]["overall"]
        # noise 0.1 per id and step: ~0.9**d of the target ids follow from layer l; popularity knows nothing
        assert ours["recall_at"][k] > popular["recall_at"][k] + 0.35, (d, ours, popular)
        assert ours["half_correct"] > 0.8
    assert result["phase"] == "decode" and result["tokens"] == 6 * 24


def test_save_load_round_trip(tmp_path, small):
    train, _, predictor = small
    path = tmp_path / "p.safetensors"
    predictor.save(path)
    loaded = load_predictor(path, expect=("planted", 4, 8, 2))
    assert list(tmp_path.iterdir()) == [path]  # one file, no temporary left behind
    cfg = loaded.config()
    assert cfg["training"]["traces"] == [str(train.resolve())] and cfg["training"]["tokens"] == {
        "decode": 16 * 24, "prefill": 16 * 4}
    assert cfg["features"] == {"window": 2, "use_prev_token": True, "weighted": True, "version": 1}
    assert (cfg["depth"], cfg["hidden"], cfg["num_experts"], cfg["top_k"]) == (2, [64], 8, 2)
    arrays = load_arrays([train])
    for layer in range(4):
        feats = predictor.features(layer, arrays.experts, arrays.weights, arrays.prev_experts)
        assert torch.equal(predictor.predict(layer, feats), loaded.predict(layer, feats))


def test_depth_is_clipped_at_the_last_layer(small):
    _, _, predictor = small
    experts = torch.tensor([[[0, 1]] * 4])
    shapes = [tuple(predictor.predict(layer, predictor.features(layer, experts, None, experts)).shape)
              for layer in range(4)]
    assert shapes == [(1, 2, 8), (1, 2, 8), (1, 1, 8), (1, 0, 8)]


def test_other_shapes_are_refused_and_other_names_warned(tmp_path, small):
    path = tmp_path / "p.safetensors"
    small[2].save(path)
    with pytest.raises(PredictorError, match=r"trained for 'planted' \(4 layers x 8 experts, top-2\) but is used "
                                             r"with 'mixtral' \(32 layers x 8 experts, top-2\); retrain .*"
                                             r"python -m duoserve_core.predict train --trace"):
        load_predictor(path, expect=("mixtral", 32, 8, 2))
    with pytest.raises(PredictorError, match="16 experts, top-4"):
        load_predictor(path, expect=TraceMeta("planted", 4, 16, 4))
    with pytest.warns(UserWarning, match="trained on traces of 'planted', used with 'renamed'"):
        load_predictor(path, expect=("renamed", 4, 8, 2))
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(PredictorError, match="not a readable predictor file"):
        load_predictor(tmp_path / "junk.safetensors")
    with pytest.raises(PredictorError, match="does not exist; train one with"):
        load_predictor(tmp_path / "absent.safetensors")


def test_a_replayed_trace_is_the_routing_the_predictor_is_checked_against(tmp_path):
    """A predictor trained on the bundled model's traces, on a tiny checkpoint of the same shape (8 layers
    x 8 experts, top-2) named otherwise: a warning when the checkpoint routes, none when it replays the
    bundled model's routing (what notebook 05 does with Mixtral-size experts), in the runtime and the
    simulator alike."""
    data = Path(__file__).resolve().parents[1] / "data"
    predictor, trace = data / "predictors" / "small-moe-depth2.safetensors", data / "traces" / "small-moe-heldout.parquet"
    checkpoint = save_checkpoint(make_reference(num_hidden_layers=8, num_local_experts=8), tmp_path / "other-moe")
    knobs = dict(policy="duoserve", predictor=str(predictor))
    with pytest.warns(UserWarning, match="trained on traces of 'small-moe', used with 'other-moe'"):
        duoserve_core.load(checkpoint, device="cpu", **knobs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        duoserve_core.load(checkpoint, device="cpu", routing_trace=trace, **knobs)
        model = build_model(model_config(tmp_path / "hand", 8, 8, 2), quant="nf4", memory_budget="all", max_context=64)
        timing = load_calibration(fake_calibration(tmp_path / "cal.json", 8, 2))
        Simulator(model, timing, RoutingReplay(read_trace(trace), 8, 8, 2), **knobs)
    # the same routing under another model's name: the simulator warns as the runtime does
    renamed = read_trace(trace)
    write_trace(tmp_path / "renamed.parquet", renamed.df, TraceMeta("renamed-moe", 8, 8, 2))
    with pytest.warns(UserWarning, match="trained on traces of 'small-moe', used with 'renamed-moe'"):
        Simulator(model, timing, RoutingReplay(read_trace(tmp_path / "renamed.parquet"), 8, 8, 2), **knobs)



# two hidden layers check the block-diagonal fusion of later layers; none is a linear correction
@pytest.mark.parametrize("hidden", [(16, 8), ()])
def test_fused_forward_equals_each_model(small, hidden):
    """Serving fuses a layer's depth models into one; each column block must be that depth's model:
    sigmoid(MLP(x) + (w_prev + w_sim * similarity) * previous token's experts at the target)."""
    data = load_arrays([small[0]]).select(("decode",))
    spec = FeatureSpec(window=3)
    predictor = fit_predictor(data, depth=2, spec=spec, hidden=hidden, max_iter=20)
    assert any(r["correction"] for r in predictor.training["fits"].values())  # the MLPs are exercised
    for (layer, d), mlp in predictor.params.items():
        x = predictor.features(layer, data.experts, data.weights, data.prev_experts)
        h = x
        for i, (w, b) in enumerate(mlp):
            h = h @ w + b
            h = h.relu() if i < len(mlp) - 1 else h
        w_prev, w_sim = predictor.prior[(layer, d)].tolist()
        prev = prev_token_targets(x, layer + d - 1, 1, spec=spec, num_experts=8)
        sim = prev_token_similarity(x, layer, spec=spec, num_experts=8, top_k=2)
        expected = torch.sigmoid(h + prev * (w_prev + w_sim * sim))
        torch.testing.assert_close(predictor.predict(layer, x)[:, d - 1], expected, atol=1e-5, rtol=0)


def test_format_1_files_still_load():
    """The committed predictors were written by the scikit-learn version (format 1, no prior): they load
    and compute what they computed, a relu MLP with sigmoid outputs."""
    from safetensors import safe_open

    path = ROOT / "data" / "predictors" / "small-moe-depth2.safetensors"
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == FORMAT_V1
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    predictor = load_predictor(path, expect=("small-moe", 8, 8, 2))
    assert predictor.prior is None
    test = load_arrays([ROOT / "data" / "traces" / "small-moe-heldout.parquet"])
    x = predictor.features(2, test.experts[:50], test.weights[:50], test.prev_experts[:50])
    for d in (1, 2):
        h = (x @ tensors[f"layer2.depth{d}.coef0"] + tensors[f"layer2.depth{d}.intercept0"]).relu()
        expected = torch.sigmoid(h @ tensors[f"layer2.depth{d}.coef1"] + tensors[f"layer2.depth{d}.intercept1"])
        torch.testing.assert_close(predictor.predict(2, x)[:, d - 1], expected, atol=1e-5, rtol=0)
    with pytest.raises(PredictorError, match="format-1 file; retrain it"):
        predictor.save(ROOT / "never-written.safetensors")


def test_feature_layout():
    spec = FeatureSpec(window=3)
    experts = torch.tensor([[[0, 1], [2, 3], [3, 0], [1, 2]]])  # one token, 4 layers, E=4
    weights = torch.tensor([[[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.5, 0.5]]])
    prev = torch.full((1, 4, 2), -1)
    f = layer_features(1, experts, weights, prev, spec=spec, num_layers=4, num_experts=4)
    assert f.shape == (1, (3 + 4) * 4)
    window = f[0, :12].view(3, 4)
    assert window[0].tolist() == [0, 0, 0, 0]  # before layer 0: zero padding
    # router weights x k (mean 1 over the top-k)
    assert window[1].tolist() == pytest.approx([1.4, 0.6, 0, 0]) and window[2].tolist() == pytest.approx(
        [0, 0, 1.2, 0.8])
    assert f[0, 12:].abs().sum() == 0  # no previous token
    garbage = experts.clone()
    garbage[:, 2:] = 3  # a runtime buffer whose later layers are not filled yet
    assert torch.equal(f, layer_features(1, garbage, weights, prev, spec=spec, num_layers=4, num_experts=4))
    prev = experts.flip(1)
    f = layer_features(3, experts, None, prev, spec=FeatureSpec(window=1, weighted=False), num_layers=4,
                       num_experts=4)
    assert f[0, :4].tolist() == [0, 1, 1, 0]  # uniform when unweighted
    assert f[0, 4:].view(4, 4).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]]


def test_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0],    # top-2 {0,1}; >=0.5: {0,1}
                           [0.2, 0.6, 0.7, 0.55],   # top-2 {2,1}; >=0.5: {1,2,3}
                           [0.3, 0.3, 0.3, 0.3]])   # ties: top-2 {0,1}, top-3 {0,1,2}; >=0.5: {}
    actual = torch.tensor([[1, 0], [0, 3], [3, 2]])
    c = count(scores, actual, threshold=0.5, ms=[2, 3, 4])
    m = metrics(c, expert_bytes=100, target_layers=1)
    assert m["exact_topk"] == pytest.approx(1 / 3)          # only row 0
    assert m["half_correct"] == pytest.approx(1 / 3)        # row 0 (2 hits); rows 1, 2 have 0 hits
    assert m["recall"] == pytest.approx((2 + 1 + 0) / 6)    # threshold sets hit {0,1}, {3}, {}
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["experts_per_layer"] == pytest.approx(5 / 3) and m["bytes_per_token"] == pytest.approx(500 / 3)
    assert m["recall_at"] == pytest.approx({"2": 2 / 6, "3": (2 + 1 + 1) / 6, "4": 1.0})
    assert math.ceil(3 / 2) == 2 and count(scores[:1], torch.tensor([[1, 2, 3]]), 0.5, [3]).half == 1


def test_calibration_by_hand():
    # 2 tokens x 4 experts, top-1: 8 events
    scores = torch.tensor([[0.05, 0.15, 0.95, 1.0],
                           [0.05, 0.12, 0.91, 0.5]])
    actual = torch.tensor([[2], [3]])
    r = reliability(scores, actual)
    cal = calibration(r)
    bins = {tuple(b["bin"]): b for b in cal["bins"]}
    assert [b["bin"][0] for b in cal["bins"]] == [0.0, 0.1, 0.5, 0.9]  # empty bins are left out; 1.0 is in the last
    assert bins[(0.0, 0.1)]["events"] == 2 and bins[(0.0, 0.1)]["observed"] == 0
    assert bins[(0.9, 1.0)]["events"] == 3 and bins[(0.9, 1.0)]["mean_score"] == pytest.approx((0.95 + 1 + 0.91) / 3)
    assert bins[(0.9, 1.0)]["observed"] == pytest.approx(1 / 3)  # expert 2 of token 0 only
    # |0.05 - 0| x 2 + |0.135 - 0| x 2 + |0.5 - 1| x 1 + |0.9533 - 1/3| x 3, over 8 events
    expected = (0.05 * 2 + 0.135 * 2 + 0.5 + abs((0.95 + 1 + 0.91) / 3 - 1 / 3) * 3) / 8
    assert cal["ece"] == pytest.approx(expected)
    r += reliability(scores, actual)  # twice the same events: the same curve and ECE
    assert calibration(r)["ece"] == pytest.approx(expected)
    assert reliability(scores * 2, actual) is None  # not probabilities: no calibration


def test_evaluate_on_a_hand_made_trace(tmp_path):
    # one request, 2 layers, E=4, top-2: t0 prefill, t1 and t2 decode
    layer1 = [[0, 1], [0, 2], [0, 2]]
    spec0 = [[1, 0], [0, 2], [1, 3]]  # the speculative gate's guess of layer 1, made at layer 0
    rows = []
    for t in range(3):
        rows.append({"request_id": 0, "token_index": t, "phase": "prefill" if t == 0 else "decode", "layer": 0,
                     "experts": [3, 1], "spec_experts": spec0[t]})
        rows.append({"request_id": 0, "token_index": t, "phase": "prefill" if t == 0 else "decode", "layer": 1,
                     "experts": layer1[t], "spec_experts": None})
    path = write(tmp_path / "t.parquet", (pd.DataFrame(rows), TraceMeta("hand", 2, 4, 2)))
    predictor = train_predictor([path], depth=1, max_iter=5)
    arrays = load_arrays([path])
    result = evaluate(arrays, predictor, fit_baselines(arrays.select(("decode",)), 1), expert_bytes=10)
    assert result["tokens"] == 2
    prev = result["methods"]["previous_token"]["1"]["overall"]
    # t1 gets t0's {0,1} vs {0,2}: 1 hit; t2 gets t1's {0,2}: exact
    assert (prev["exact_topk"], prev["half_correct"], prev["recall"], prev["precision"]) == (0.5, 1.0, 0.75, 0.75)
    assert prev["experts_per_layer"] == 2 and prev["bytes_per_token"] == 20
    assert prev["recall_at"] == {"2": 0.75, "3": 1.0, "4": 1.0}
    assert result["methods"]["popularity"]["1"]["overall"]["exact_topk"] == 1.0  # {0,2} in every decode token
    assert result["methods"]["affinity"]["1"]["overall"]["recall_at"]["2"] == 1.0
    spec = result["methods"]["speculative_gate"]["1"]["overall"]
    assert (spec["exact_topk"], spec["recall"]) == (0.5, 0.5)
    assert set(result["methods"]["predictor"]["1"]["per_layer"]) == {"1"}


def test_cli_train_eval_bench(tmp_path, capsys):
    train = write(tmp_path / "train.parquet", planted(layers=3, requests=6, seed=0))
    test = write(tmp_path / "test.parquet", planted(layers=3, requests=3, seed=1))
    out = tmp_path / "p.safetensors"
    args = ["train", "--trace", str(train), "--depth", "2", "--out", str(out), "--window", "2", "--hidden", "16",
            "--max-iter", "10"]
    assert main(args) == 0
    assert "trained on 144 decode tokens of 6 requests" in capsys.readouterr().out
    assert main(args) == 2 and "exists; choose another --out or pass --force" in capsys.readouterr().err
    assert main(["eval", "--trace", str(test), "--predictor", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["baseline_traces"] == [str(train.resolve())] and result["tokens"] == 72
    assert set(result["methods"]) == {"predictor", "popularity", "previous_token", "affinity"}
    cal = result["methods"]["predictor"]["1"]["overall"]["calibration"]
    assert sum(b["events"] for b in cal["bins"]) == 72 * 2 * 8  # every (token, target layer, expert)
    assert main(["eval", "--trace", str(test), "--predictor", str(out), "--train-trace", str(train),
                 "--threshold", "0.3", "--expert-bytes", "1MiB"]) == 0
    table = capsys.readouterr().out
    assert "scored on decode tokens only (72)" in table and "expert = 1.00 MiB" in table and "R@4" in table
    assert "ECE" in table and f"predictor reliability, depth 1 (ECE {cal['ece']:.3f})" in table
    with pytest.raises(SystemExit):
        main(args + ["--holdout", "1.5", "--force"])
    assert "--holdout must be between 0 and 1" in capsys.readouterr().err
    assert main(["bench", "--predictor", str(out), "--device", "cpu", "--iters", "5"]) == 0
    assert "µs" in capsys.readouterr().out

    other = write(tmp_path / "other.parquet", planted(num_experts=6, layers=3, requests=2, seed=2))
    assert main(["eval", "--trace", str(other), "--predictor", str(out)]) == 2
    assert "error: predictor" in capsys.readouterr().err
    assert main(["train", "--trace", str(tmp_path / "absent.parquet"), "--out", str(tmp_path / "q")]) == 2
    assert "error: trace" in capsys.readouterr().err
    assert main(["bench", "--predictor", str(out), "--device", "nonsense"]) == 2
    assert "error: --device 'nonsense'" in capsys.readouterr().err


@requires_cuda
def test_cuda_graph_replay_equals_eager(small):
    train, _, predictor = small
    gpu = predictor.to("cuda")
    arrays = load_arrays([train])
    graphed = GraphedPredictor(gpu, batch=5)
    for start in (0, 40):  # replays see new buffer contents
        experts, weights, prev = (t[start:start + 5].cuda() for t in (arrays.experts, arrays.weights,
                                                                       arrays.prev_experts))
        graphed.experts.copy_(experts)
        graphed.weights.copy_(weights)
        graphed.prev_experts.copy_(prev)
        for layer in range(4):
            eager = gpu.predict(layer, gpu.features(layer, experts, weights, prev))
            torch.testing.assert_close(graphed.predict(layer), eager)
            torch.testing.assert_close(eager.cpu(), predictor.predict(
                layer, predictor.features(layer, *(t.cpu() for t in (experts, weights, prev)))), atol=1e-5, rtol=0)


@pytest.mark.parametrize("signum, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_cli_train_interrupted_writes_nothing(tmp_path, signum, code):
    """Ctrl-C (130) or SIGTERM (143) during training: the file --force would replace untouched, no
    temporary left."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"the previous predictor")
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "duoserve_core.predict", "train", "--trace",
                                 str(ROOT / "data" / "traces" / "small-moe-train.parquet"), "--depth", "2",
                                 "--out", str(out), "--force"], cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        deadline = time.monotonic() + 120  # layer 0 takes ~10 s on a 2-core CPU, over 30 s on an H200 host
        while "layer 0 -> 1" not in err_path.read_text():  # the first MLP is fitted: training is under way
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # into the next layer's fit
        proc.send_signal(getattr(signal, signum))
        stdout, _ = proc.communicate(timeout=30)
    lines = err_path.read_text().splitlines()
    assert proc.returncode == code and stdout == b""
    assert lines[-1] == "interrupted; nothing written" and all(line.startswith("layer ") for line in lines[:-1])
    assert out.read_bytes() == b"the previous predictor"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors", "stderr"]


def test_the_gates_recall_beyond_its_top_k_is_not_given():
    """The trace keeps only the gate's top-k: R@m for m > k is None in the result and '-' in the table."""
    from duoserve_core.predict.evaluate import format_recall, metrics, ranked_by, Counts

    c = Counts(pairs=4, exact=1, half=2, actual=8, hits=4, predicted=8, hits_at={2: 4, 3: 5, 4: 6})
    gate = metrics(c, 1, 1, ranked_by("speculative_gate", 2))
    assert gate["recall_at"] == {"2": 0.5, "3": None, "4": None}
    assert metrics(c, 1, 1, ranked_by("previous_token", 2))["recall_at"]["4"] == 0.75
    assert format_recall(None).strip() == "-" and format_recall(0.5).strip() == "0.500"

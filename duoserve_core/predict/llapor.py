"""LLaPor (PreScope's layer-aware predictor): the id-only predictor's input plus the hidden state.

At source layer l the features are the id-only predictor's (``features.layer_features``: this
token's routing at layers l-W+1..l and the previous token's at every layer) followed by the PCA
coordinates of layer l's MoE input (``traces.hidden``), each divided by its standard deviation
on the training tokens, so that one unit means the same on every dimension and is of the id
block's scale (0..2). One MLP per (l, d) for the targets l+1..l+depth, fitted with scikit-learn's
MLPClassifier (200 epochs of Adam, as the id-only predictor's format-1 files were) and served by
``layer_predictor``'s fused MLP stacks (with no prior terms), unchanged. As PreScope does, the
middle layers get deeper MLPs: the middle half of the layers (``L//4 <= l < L - L//4``) hidden
sizes (128, 64), the others the id-only predictor's (64,). On the bundled model the depth alone
buys nothing (routing alone, these MLPs score R@2 0.719 one layer ahead against the (64,) MLPs'
0.727); the hidden state buys 8 points (0.806), as much as the gate (docs/llapor.md).

The router reads the hidden state, the id features only what the routers chose from it, so the
hidden state is what can lift a layer-level predictor towards the speculative gate (next layer's
router on this layer's input) at depth 1, and past it where the gate cannot reach (depth 2+).

Serving: the runtime holds the raw MoE input; ``compress(layer, h)`` projects it with the basis
stored in the predictor file (the training trace's), and ``features`` appends it to the id block:

    p = load_llapor("P.safetensors", expect=(model, L, E, k), device="cuda")
    probs = p.predict(l, p.features(l, experts, weights, prev_experts, p.compress(l, h)))  # [B, depth_at(l), E]

The file is one safetensors file: the per-(l, d) MLP weights under ``layer_predictor``'s tensor
names, plus ``pca.mean`` [L, H], ``pca.components`` [L, D, H] and ``pca.scale`` [L, D], and a JSON
description (shape, feature spec, per-layer hidden sizes, the basis fingerprint, training data)
in its metadata, checked against the model or trace before anything is used.

Hidden states mean something only on the model that produced them. On replayed routing over
synthesized weights (``--routing-trace``) the model's hidden states have nothing to do with the
replayed experts, so a replay cannot ask LLaPor live; ``annotate`` records its guesses at the next
layer into the trace instead, in their own column ``llapor_experts`` (``spec_experts`` holds the
speculative gate's), shaped like ``spec_experts``: top-k ids, null at the last layer.

    python -m duoserve_core.predict.llapor train    --trace T.parquet --depth 3 --out P.safetensors
    python -m duoserve_core.predict.llapor eval     --trace TEST.parquet --predictor P.safetensors [--json]
    python -m duoserve_core.predict.llapor annotate --trace T.parquet --predictor P.safetensors --out T2.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
import torch
from joblib import Parallel, delayed
from safetensors.torch import save as save_safetensors
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from ..atomic import atomic_write_bytes, check_writable
from ..knob_args import Parser
from ..errors import DuoServeError
from ..progress import interruptible, reraise_interrupt
from ..traces import Trace, TraceMeta, read_trace, write_trace
from ..traces.hidden import HiddenBasis, read_hidden
from ..units import format_bytes
from .baselines import PreviousToken, SpeculativeGate
from .data import TraceArrays, from_trace, load_arrays, multi_hot
from .errors import PredictorError, describe_shape
from .evaluate import MIXTRAL_NF4_EXPERT_BYTES, Counts, count, format_recall, metrics, ranked_by, recall_sizes
from .features import FeatureSpec, layer_features
from .layer_predictor import LayerPredictor, MLPParams, check_fits, load_predictor, read_predictor_file

FORMAT = "duoserve-llapor/1"
RETRAIN = "python -m duoserve_core.predict.llapor train --trace T.parquet --depth D --out P"
GUESS_COLUMN = "llapor_experts"
SHALLOW, DEEP = (64,), (128, 64)

# (source layer, depth) -> [N, E] scores for layer source + depth, or None where a method has none
ScoreFn = Callable[[int, int], "torch.Tensor | None"]


def layer_hidden(layer: int, num_layers: int, shallow: tuple[int, ...] = SHALLOW,
                 deep: tuple[int, ...] = DEEP) -> tuple[int, ...]:
    """The MLP hidden sizes of a source layer: ``deep`` for the middle half of the layers."""
    quarter = num_layers // 4
    return deep if quarter <= layer < num_layers - quarter else shallow


def llapor_features(layer: int, experts: torch.Tensor, weights: torch.Tensor | None,
                    prev_experts: torch.Tensor | None, hidden_pca: torch.Tensor | None, scale: torch.Tensor, *,
                    spec: FeatureSpec, num_layers: int, num_experts: int) -> torch.Tensor:
    """``[B, F + D]``: ``layer_features`` (same arguments) then ``hidden_pca [B, D]`` (layer ``layer``'s
    PCA coordinates) divided by ``scale [D]``; ``[B, F]`` without ``hidden_pca`` (the ablation that
    reads routing alone). One function for training and serving. The id block comes first, at the
    offsets ``features.py`` documents."""
    ids = layer_features(layer, experts, weights, prev_experts, spec=spec, num_layers=num_layers,
                         num_experts=num_experts)
    if hidden_pca is None:
        return ids
    return torch.cat([ids, hidden_pca.to(ids.device, torch.float32) / scale.to(ids.device)], dim=1)


def _fit_mlp(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], seed: int, max_iter: int
             ) -> tuple[MLPParams, int, float]:
    """One (layer, depth) MLP by scikit-learn (relu, sigmoid outputs, Adam, ``max_iter`` epochs), as
    torch tensors ``[(coef [in, out], intercept), ...]``, with its epochs and final loss."""
    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="adam", early_stopping=False,
                        max_iter=max_iter, random_state=seed)
    # One BLAS thread: the matrices are small and BLAS threads fight torch's (parallelism comes from
    # fitting MLPs side by side). Warnings are collected: a capped number of epochs is a budget, not a
    # problem, and sklearn reports a Ctrl-C only as a warning, returning the half-trained model.
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("always")
        clf.fit(x, y)
    if any("interrupted by user" in str(w.message) for w in caught):
        reraise_interrupt()  # never keep (and save) a half-trained model
    params = [(torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
              for w, b in zip(clf.coefs_, clf.intercepts_)]
    return params, int(clf.n_iter_), float(clf.loss_)


class LLaPor:
    """At each source layer, expert probabilities for the next ``depth`` layers from routing and hidden state."""

    def __init__(self, meta: TraceMeta, depth: int, spec: FeatureSpec, basis: HiddenBasis, scale: torch.Tensor,
                 hidden: dict[int, tuple[int, ...]], params: dict[tuple[int, int], MLPParams], training: dict,
                 device: str | torch.device = "cpu", use_hidden: bool = True):
        if basis.num_layers != meta.num_layers:
            raise PredictorError(f"the hidden-state basis is for {basis.num_layers} layers, the model has "
                                 f"{meta.num_layers}; retrain with {RETRAIN}")
        if tuple(scale.shape) != (meta.num_layers, basis.dims):
            raise PredictorError(f"hidden-state scale of shape {tuple(scale.shape)} for {meta.num_layers} layers x "
                                 f"{basis.dims} dimensions; retrain with {RETRAIN}")
        self.meta, self.depth, self.spec, self.basis = meta, depth, spec, basis
        self.scale, self.hidden, self.params, self.training = scale, dict(hidden), params, training
        self.use_hidden = use_hidden  # False: the ablation that reads routing alone (same MLPs otherwise)
        # The MLP stacks, fused per layer, are LayerPredictor's (with no prior terms: plain sigmoid
        # MLPs); it serves predict() alone. Its own config and file are the id-only predictor's.
        self.mlps = LayerPredictor(meta, depth, spec, (), params, training, device)
        self.device = self.mlps.device
        self._mean = torch.from_numpy(basis.mean).to(self.device)
        self._components = torch.from_numpy(basis.components).to(self.device)
        self._scale = scale.to(self.device, torch.float32)

    @property
    def dims(self) -> int:
        return self.basis.dims

    def depth_at(self, layer: int) -> int:
        return self.mlps.depth_at(layer)

    def compress(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` raw MoE inputs of ``layer`` -> ``[B, D]`` PCA coordinates (as the trace stores them)."""
        return (hidden.to(self.device, torch.float32) - self._mean[layer]) @ self._components[layer].T

    def features(self, layer: int, experts: torch.Tensor, weights: torch.Tensor | None,
                 prev_experts: torch.Tensor | None, hidden_pca: torch.Tensor) -> torch.Tensor:
        return llapor_features(layer, experts, weights, prev_experts, hidden_pca if self.use_hidden else None,
                               self._scale[layer], spec=self.spec, num_layers=self.meta.num_layers,
                               num_experts=self.meta.num_experts)

    def predict(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``[B, depth_at(layer), E]`` probabilities; index 0 is layer+1. Pure torch, on ``self.device``."""
        return self.mlps.predict(layer, feats)

    def to(self, device: str | torch.device) -> LLaPor:
        return LLaPor(self.meta, self.depth, self.spec, self.basis, self.scale, self.hidden, self.params,
                      self.training, device, self.use_hidden)

    def config(self) -> dict:
        return {**self.meta.as_dict(), "depth": self.depth, "features": self.spec.as_dict(),
                "use_hidden": self.use_hidden, "hidden_dims": self.dims, "hidden_size": self.basis.hidden_size,
                "basis_fingerprint": self.basis.fingerprint(), "basis_fitted_on": self.basis.fitted_on,
                "hidden": {str(l): list(h) for l, h in sorted(self.hidden.items())},
                "activation": "relu", "output": "sigmoid", "training": self.training}

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically."""
        tensors = {"pca.mean": torch.from_numpy(self.basis.mean), "pca.components": torch.from_numpy(self.basis.components),
                   "pca.explained": torch.from_numpy(self.basis.explained), "pca.scale": self.scale.cpu().contiguous()}
        for (layer, d), mlp in self.params.items():
            for i, (w, b) in enumerate(mlp):
                tensors[f"layer{layer}.depth{d}.coef{i}"] = w.detach().cpu().contiguous()
                tensors[f"layer{layer}.depth{d}.intercept{i}"] = b.detach().cpu().contiguous()
        blob = save_safetensors(tensors, metadata={"format": FORMAT, "config": json.dumps(self.config())})
        atomic_write_bytes(path, blob)

    def check_basis(self, basis: HiddenBasis | None, where: str) -> None:
        """A trace's coordinates are this predictor's input only in this predictor's basis."""
        if basis is None:
            raise PredictorError(f"{where} holds no hidden states; record it with python -m duoserve_core.traces "
                                 f"record ... --hidden-basis TRAIN.parquet (the trace this predictor was trained on)")
        if basis.fingerprint() != self.basis.fingerprint():
            raise PredictorError(
                f"{where} stores hidden states in PCA basis {basis.fingerprint()}, this predictor reads basis "
                f"{self.basis.fingerprint()} ({self.basis.fitted_on}); record the trace with "
                f"--hidden-basis set to the predictor's training trace")


def load_hidden_traces(paths: list[str | Path]) -> tuple[TraceArrays, torch.Tensor, HiddenBasis]:
    """The traces as the id predictor's arrays plus their ``[N, L, D]`` coordinates; one basis for all."""
    arrays = load_arrays(paths)
    parts = [read_hidden(p) for p in paths]
    basis = parts[0][1]
    for path, (_, b) in zip(paths[1:], parts[1:]):
        if b.fingerprint() != basis.fingerprint():
            raise PredictorError(f"trace {path} stores hidden states in PCA basis {b.fingerprint()}, {paths[0]} in "
                                 f"{basis.fingerprint()}; record every trace with --hidden-basis {paths[0]}")
    hidden = torch.from_numpy(np.concatenate([h for h, _ in parts]))
    if hidden.shape[0] != arrays.num_tokens:
        raise PredictorError(f"{paths}: {hidden.shape[0]} tokens of hidden states for {arrays.num_tokens} of routing")
    return arrays, hidden, basis


def fit_llapor(data: TraceArrays, hidden: torch.Tensor | None, scale: torch.Tensor, *, depth: int,
               spec: FeatureSpec, shallow: tuple[int, ...] = SHALLOW, deep: tuple[int, ...] = DEEP, seed: int = 0,
               max_iter: int = 200, jobs: int = 1, log: Callable[[str], None] | None = None
               ) -> dict[tuple[int, int], MLPParams]:
    """Fit the MLP of every (source layer, depth) on all tokens of ``data`` (``hidden``: their
    ``[N, L, D]`` coordinates, or None for routing alone), ``jobs`` at a time."""
    meta = data.meta
    if data.num_tokens == 0:
        raise PredictorError("the training traces hold no tokens of the phases selected for training")
    keys, tasks = [], []
    for layer in range(meta.num_layers - 1):
        x = llapor_features(layer, data.experts, data.weights, data.prev_experts,
                            None if hidden is None else hidden[:, layer], scale[layer], spec=spec,
                            num_layers=meta.num_layers, num_experts=meta.num_experts).numpy()
        sizes = layer_hidden(layer, meta.num_layers, shallow, deep)
        for d in range(1, min(depth, meta.num_layers - 1 - layer) + 1):
            y = multi_hot(data.experts[:, layer + d], meta.num_experts).numpy().astype(np.int8)
            keys.append((layer, d))
            tasks.append(delayed(_fit_mlp)(x, y, sizes, seed, max_iter))
    params = {}
    for (layer, d), (mlp, epochs, loss) in zip(keys, Parallel(n_jobs=jobs, return_as="generator")(tasks)):
        params[(layer, d)] = mlp
        if log:
            sizes = ",".join(str(w.shape[1]) for w, _ in mlp[:-1])
            log(f"layer {layer} -> {layer + d} (hidden {sizes}): {epochs} epochs, loss {loss:.4f}")
    return params


def train_llapor(traces: list[str | Path], *, depth: int, window: int = 4, shallow: tuple[int, ...] = SHALLOW,
                 deep: tuple[int, ...] = DEEP, seed: int = 0, max_iter: int = 200, use_prev_token: bool = True,
                 use_hidden: bool = True, phases: tuple[str, ...] = ("decode",), jobs: int = 1,
                 log: Callable[[str], None] | None = None) -> LLaPor:
    """Read traces recorded with hidden states, fit every MLP on the tokens of ``phases``, export.
    ``use_hidden=False`` fits the same MLPs on routing alone (the ablation)."""
    if depth < 1:
        raise PredictorError(f"depth must be at least 1, got {depth}")
    arrays, hidden, basis = load_hidden_traces(traces)
    keep = np.isin(arrays.phase, phases)
    data, hidden = arrays.select(phases), hidden[torch.from_numpy(keep)]
    # per (layer, dimension) spread of the training tokens: features in units of it
    scale = hidden.std(0).clamp(min=1e-6) if len(hidden) > 1 else torch.ones(hidden.shape[1:])
    spec = FeatureSpec(window=window, use_prev_token=use_prev_token, weighted=arrays.has_weights)
    L = arrays.meta.num_layers
    sizes = {l: layer_hidden(l, L, shallow, deep) for l in range(L - 1)}
    training = {"traces": [str(Path(t).resolve()) for t in traces], "requests": arrays.requests,
                "tokens": arrays.phase_counts(), "phases": list(phases), "samples": data.num_tokens,
                "seed": seed, "max_iter": max_iter, "sklearn": sklearn.__version__,
                "variance_kept": [round(float(v), 4) for v in basis.explained.sum(1)]}
    params = fit_llapor(data, hidden if use_hidden else None, scale, depth=depth, spec=spec, shallow=shallow,
                        deep=deep, seed=seed, max_iter=max_iter, jobs=jobs, log=log)
    return LLaPor(arrays.meta, depth, spec, basis, scale.to(torch.float32), sizes, params, training,
                  use_hidden=use_hidden)


def load_llapor(path: str | Path, expect: TraceMeta | tuple[str, int, int, int] | None = None,
                device: str | torch.device = "cpu") -> LLaPor:
    """Load a LLaPor file, checking it fits ``expect`` (the model or trace it is used with), as
    ``load_predictor`` does: another shape is an error, another model name of the same shape a warning."""
    path = Path(path)
    header, tensors = read_predictor_file(path, (FORMAT,), RETRAIN, f"train a LLaPor predictor with {RETRAIN}")
    try:
        cfg = json.loads(header["config"])
        meta = TraceMeta(cfg["model"], cfg["num_layers"], cfg["num_experts"], cfg["top_k"])
        spec = FeatureSpec.from_dict(cfg["features"])
        depth, training = int(cfg["depth"]), cfg["training"]
        hidden = {int(l): tuple(h) for l, h in cfg["hidden"].items()}
        basis = HiddenBasis(tensors["pca.mean"].numpy(), tensors["pca.components"].numpy(),
                            tensors["pca.explained"].numpy(), cfg["basis_fitted_on"])
        scale, use_hidden = tensors["pca.scale"], bool(cfg["use_hidden"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PredictorError(f"{path} has malformed predictor metadata ({exc}); retrain with {RETRAIN}") from exc
    if basis.fingerprint() != cfg.get("basis_fingerprint"):
        raise PredictorError(f"{path}: its PCA basis does not match its fingerprint; the file is damaged")
    check_fits(path, meta, expect, RETRAIN)
    params = {}
    for layer in range(meta.num_layers):
        n_mlp_layers = len(hidden.get(layer, ())) + 1
        for d in range(1, min(depth, meta.num_layers - 1 - layer) + 1):
            try:
                params[(layer, d)] = [(tensors[f"layer{layer}.depth{d}.coef{i}"],
                                       tensors[f"layer{layer}.depth{d}.intercept{i}"]) for i in range(n_mlp_layers)]
            except KeyError as exc:
                raise PredictorError(f"{path} lacks tensor {exc}; retrain with {RETRAIN}") from exc
    return LLaPor(meta, depth, spec, basis, scale, hidden, params, training, device, use_hidden)


# -- evaluation -------------------------------------------------------------------------------------

def llapor_scores(predictor: LLaPor, data: TraceArrays, hidden: torch.Tensor) -> ScoreFn:
    """LLaPor's probabilities for every (source layer, depth) of ``data``'s tokens, computed once."""
    with torch.inference_mode():
        predicted = {layer: predictor.predict(layer, predictor.features(
            layer, data.experts, data.weights, data.prev_experts, hidden[:, layer]).to(predictor.device)).cpu()
            for layer in range(data.meta.num_layers - 1)}
    return lambda layer, d: predicted[layer][:, d - 1] if d <= predicted[layer].shape[1] else None


def id_predictor_scores(predictor: LayerPredictor, data: TraceArrays) -> ScoreFn:
    """The id-only predictor's probabilities, the same way."""
    with torch.inference_mode():
        predicted = {layer: predictor.predict(layer, predictor.features(
            layer, data.experts, data.weights, data.prev_experts).to(predictor.device)).cpu()
            for layer in range(data.meta.num_layers - 1)}
    return lambda layer, d: predicted[layer][:, d - 1] if d <= predicted[layer].shape[1] else None


def baseline_scores(data: TraceArrays) -> dict[str, ScoreFn]:
    """The previous token, and the speculative gate where the trace holds its guesses (depth 1)."""
    methods: dict[str, ScoreFn] = {"previous_token": lambda l, d, b=PreviousToken(): b.scores(l, d, data)}
    if data.spec_experts is not None:
        methods["speculative_gate"] = lambda l, d, b=SpeculativeGate(): b.scores(l, d, data)
    return methods


def score_methods(data: TraceArrays, methods: dict[str, ScoreFn], depth: int, *, threshold: float = 0.5,
                  expert_bytes: int = MIXTRAL_NF4_EXPERT_BYTES) -> dict:
    """``evaluate``'s metrics (its ``count``/``metrics``) for any scoring functions: per method and
    depth d, each (token, target layer t) pair scored at source layer t-d, overall and per target."""
    meta = data.meta
    ms = recall_sizes(meta.top_k, meta.num_experts)
    results: dict = {}
    for name, score_fn in methods.items():
        per_depth = {}
        for d in range(1, depth + 1):
            per_layer, total = {}, Counts()
            for target in range(d, meta.num_layers):
                scores = score_fn(target - d, d)
                if scores is None:
                    break
                c = count(scores, data.experts[:, target], threshold, ms)
                per_layer[str(target)] = metrics(c, expert_bytes, 1, ranked_by(name, meta.top_k))
                total += c
            if per_layer:
                per_depth[str(d)] = {"overall": metrics(total, expert_bytes, len(per_layer), ranked_by(name, meta.top_k)),
                                     "per_layer": per_layer}
        if per_depth:
            results[name] = per_depth
    return {"model": meta.model, "num_layers": meta.num_layers, "num_experts": meta.num_experts,
            "top_k": meta.top_k, "depth": depth, "tokens": data.num_tokens, "threshold": threshold,
            "expert_bytes": expert_bytes, "recall_at_sizes": ms, "methods": results}


def evaluate_llapor(test: str | Path, predictor: LLaPor, *, id_predictor: LayerPredictor | None = None,
                    phase: str = "decode", threshold: float = 0.5) -> dict:
    """LLaPor against the previous token, the speculative gate and (if given) the id-only predictor,
    on the ``phase`` tokens of a trace recorded in the predictor's hidden-state basis."""
    arrays, hidden, basis = load_hidden_traces([test])
    predictor.check_basis(basis, str(test))
    keep = np.isin(arrays.phase, (phase,))
    data, hidden = arrays.select((phase,)), hidden[torch.from_numpy(keep)]
    if data.num_tokens == 0:
        raise PredictorError(f"{test} has no {phase} tokens to evaluate on")
    methods = {"llapor": llapor_scores(predictor, data, hidden)}
    if id_predictor is not None:
        methods["id_only"] = id_predictor_scores(id_predictor, data)
    methods.update(baseline_scores(data))
    result = score_methods(data, methods, predictor.depth, threshold=threshold)
    result.update(phase=phase, test_trace=str(test))
    return result


def format_table(result: dict) -> str:
    ms = result["recall_at_sizes"]
    lines = [f"{result['model']}: {result['num_layers']} layers x {result['num_experts']} experts, "
             f"top-{result['top_k']}; {result['tokens']} {result.get('phase', 'decode')} tokens; threshold "
             f"{result['threshold']}; R@m: recall of the m best-scored experts (equal bytes at equal m)", "",
             f"{'method':<18}{'depth':>5}{'exact':>8}{'half':>8}" + "".join(f"{'R@' + str(m):>8}" for m in ms)]
    for name, per_depth in result["methods"].items():
        for d, r in per_depth.items():
            o = r["overall"]
            lines.append(f"{name:<18}{d:>5}{o['exact_topk']:>8.3f}{o['half_correct']:>8.3f}"
                         + "".join(format_recall(o["recall_at"][str(m)]) for m in ms))
    return "\n".join(lines)


# -- guesses for replays ----------------------------------------------------------------------------

def annotate(trace: Trace, predictor: LLaPor) -> pd.DataFrame:
    """``trace``'s rows plus ``llapor_experts``: at each (token, layer l < L-1) LLaPor's top-k guess at
    layer l+1's experts (highest probability first, ties to the lower id), null at the last layer.
    Every token is annotated, prefill too, as the speculative gate's guesses are."""
    predictor.check_basis(trace.meta.hidden_basis, f"this trace of {trace.meta.model}")
    m = trace.meta
    arrays, hidden = from_trace(trace), torch.from_numpy(trace.hidden_array())
    guesses = torch.full((arrays.num_tokens, m.num_layers, m.top_k), -1, dtype=torch.int64)
    with torch.inference_mode():
        for layer in range(m.num_layers - 1):
            probs = predictor.predict(layer, predictor.features(layer, arrays.experts, arrays.weights,
                                                                arrays.prev_experts, hidden[:, layer]))[:, 0].cpu()
            guesses[:, layer] = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :m.top_k]
    df = trace.df.copy()
    # rows are sorted by request, token and layer (read_trace): row i is token i // L, layer i % L
    if not (df["layer"].to_numpy() == np.tile(np.arange(m.num_layers), arrays.num_tokens)).all():
        raise PredictorError("trace rows are not in (request, token, layer) order; read it with read_trace")
    flat = guesses.reshape(-1, m.top_k).tolist()
    df[GUESS_COLUMN] = pd.Series([g if g[0] >= 0 else None for g in flat], index=df.index, dtype=object)
    return df


# -- command line -------------------------------------------------------------------------------------

def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"hidden sizes such as 64 or 128,64; got {text!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m duoserve_core.predict.llapor", description=__doc__,  # one-line errors
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fit LLaPor on traces recorded with --hidden-dims")
    t.add_argument("--trace", action="append", required=True, help="training trace (repeat for several; one basis)")
    t.add_argument("--depth", type=int, default=2, help="how many layers ahead to predict")
    t.add_argument("--out", required=True, help="predictor file to write (safetensors)")
    t.add_argument("--window", type=int, default=4, help="current-token layers in the id features")
    t.add_argument("--shallow", type=_sizes, default=SHALLOW, help="MLP hidden sizes of the outer layers")
    t.add_argument("--deep", type=_sizes, default=DEEP, help="MLP hidden sizes of the middle half of the layers")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-iter", type=int, default=200, help="training epochs per MLP at most")
    t.add_argument("--jobs", type=int, default=1, help="MLPs fitted in parallel (-1: one per CPU core)")
    t.add_argument("--no-hidden", action="store_true",
                   help="the ablation: the same MLPs on routing alone (the hidden state left out)")
    t.add_argument("--force", action="store_true", help="replace --out if it exists")
    e = sub.add_parser("eval", help="LLaPor against the gate, the previous token (and the id-only predictor)")
    e.add_argument("--trace", required=True, help="held-out trace recorded with --hidden-basis TRAIN.parquet")
    e.add_argument("--predictor", required=True)
    e.add_argument("--id-predictor", help="an id-only predictor (python -m duoserve_core.predict train) to compare")
    e.add_argument("--threshold", type=float, default=0.5)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    a = sub.add_parser("annotate", help="write LLaPor's next-layer guesses into a trace (column llapor_experts)")
    a.add_argument("--trace", required=True)
    a.add_argument("--predictor", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _train(args: argparse.Namespace) -> None:
    out = check_writable(args.out, args.force, "--out")
    for value, flag in ((args.depth, "--depth"), (args.window, "--window"), (args.max_iter, "--max-iter")):
        if value < 1:
            raise PredictorError(f"{flag} must be positive, got {value}")
    if args.jobs == 0 or args.jobs < -1:
        raise PredictorError(f"--jobs takes a positive number or -1 (every core), got {args.jobs}")
    t0 = time.perf_counter()
    predictor = train_llapor(args.trace, depth=args.depth, window=args.window, shallow=args.shallow, deep=args.deep,
                             seed=args.seed, max_iter=args.max_iter, jobs=args.jobs, use_hidden=not args.no_hidden,
                             log=lambda msg: print(msg, file=sys.stderr))
    predictor.save(out)
    tr = predictor.training
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}): {describe_shape(predictor.meta)}, depth {args.depth}, "
          f"{predictor.dims if predictor.use_hidden else 'no'} hidden-state dimensions; trained on {tr['samples']} decode tokens of {tr['requests']} "
          f"requests in {time.perf_counter() - t0:.1f} s")


def _eval(args: argparse.Namespace) -> dict:
    meta = read_trace(args.trace).meta
    predictor = load_llapor(args.predictor, expect=meta)
    id_predictor = load_predictor(args.id_predictor, expect=meta) if args.id_predictor else None
    result = evaluate_llapor(args.trace, predictor, id_predictor=id_predictor, threshold=args.threshold)
    result.update(predictor=str(args.predictor), id_predictor=args.id_predictor)
    return result


def _annotate(args: argparse.Namespace) -> None:
    out = check_writable(args.out, args.force, "--out")
    trace = read_trace(args.trace)
    predictor = load_llapor(args.predictor, expect=trace.meta)
    df = annotate(trace, predictor)
    write_trace(out, df, trace.meta, overwrite=args.force)
    print(f"wrote {out}: {args.trace} with LLaPor's top-{trace.meta.top_k} guesses at the next layer "
          f"in column {GUESS_COLUMN}")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return interruptible(lambda: _run(args))  # Ctrl-C 130, SIGTERM 143: training re-raises what sklearn swallows


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "eval":
            result = _eval(args)
            print(json.dumps(result) if args.json else format_table(result))
        else:
            _annotate(args)
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``LayerPredictor``: at layer l, the probability of every expert at layers l+1..l+depth.

One small MLP per (source layer l, depth d), fitted offline with scikit-learn (multi-label:
one sigmoid output per expert), then exported to torch so that serving runs on the runtime's
device with no sklearn call. At load time the ``depth`` MLPs of a layer are fused into one
stack of matrices (first layers side by side, later layers block-diagonal), so a prediction is
two kernels per MLP layer whatever the depth. Targets beyond the last layer do not exist:
layer l predicts ``depth_at(l) = min(depth, L-1-l)`` layers, none at the last layer.

The file is one safetensors file: the raw per-(l, d) sklearn weights as tensors and a JSON
description (shape, feature spec, training data) in its metadata, so a file can be checked
against the model it is used with before any tensor is read.
"""

from __future__ import annotations

import json
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sklearn
import torch
from joblib import Parallel, delayed
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from ..atomic import atomic_write_bytes
from ..traces import TraceMeta
from .data import TraceArrays, load_arrays, multi_hot
from .errors import PredictorError, describe_shape
from .features import FeatureSpec, layer_features

FORMAT = "duoserve-predictor/1"
RETRAIN = "python -m duoserve_core.predict train --trace T.parquet --depth D --out P"

# per MLP: [(coef, intercept), ...] for each of its layers, sklearn's coefs_[i] is [in, out]
MLPParams = list[tuple[torch.Tensor, torch.Tensor]]


def _fit_one(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], seed: int, max_iter: int) -> MLPClassifier:
    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="adam", early_stopping=False,
                        max_iter=max_iter, random_state=seed)
    # One BLAS thread: these matrices are small, and OpenBLAS's threads fight torch's OpenMP threads
    # (measured 25x slower fits with both at 2 threads); parallelism comes from fitting MLPs side by side.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # a capped number of epochs is a deliberate budget, not a problem to report
        warnings.simplefilter("ignore", ConvergenceWarning)
        # raised by sklearn when it swallows a Ctrl-C; interrupts_abort() raises the interrupt instead
        warnings.filterwarnings("ignore", message="Training interrupted by user")
        return clf.fit(x, y)


@contextmanager
def interrupts_abort() -> Iterator[Callable[[], None]]:
    """Make Ctrl-C abort training. sklearn's MLP catches KeyboardInterrupt in its epoch loop and
    returns the half-trained model as if it had converged, so a plain interrupt would end in a saved,
    half-trained predictor. Inside this block SIGINT is recorded (and still raised, to stop the epoch
    loop at once); the ``check`` it yields raises KeyboardInterrupt after a fit if one came. The
    previous handler is restored on exit. Off the main thread (no signal handlers there) it does nothing."""
    interrupted = threading.Event()

    def check() -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield check
        return

    def on_sigint(signum, frame) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def fit_estimators(data: TraceArrays, *, depth: int, spec: FeatureSpec, hidden: tuple[int, ...], seed: int = 0,
                   max_iter: int = 200, jobs: int = 1, log: Callable[[str], None] | None = None
                   ) -> dict[tuple[int, int], MLPClassifier]:
    """Fit the MLP of every (source layer, depth) on all tokens of ``data``, ``jobs`` at a time
    (the fits are independent; a Mixtral trace has ~100 of them)."""
    meta = data.meta
    if data.num_tokens == 0:
        raise PredictorError("the training traces hold no tokens of the phases selected for training")
    keys, tasks = [], []
    for layer in range(meta.num_layers - 1):
        x = layer_features(layer, data.experts, data.weights, data.prev_experts, spec=spec,
                           num_layers=meta.num_layers, num_experts=meta.num_experts).numpy()
        for d in range(1, min(depth, meta.num_layers - 1 - layer) + 1):
            y = multi_hot(data.experts[:, layer + d], meta.num_experts).numpy().astype(np.int8)
            keys.append((layer, d))
            tasks.append(delayed(_fit_one)(x, y, hidden, seed, max_iter))
    estimators = {}
    with interrupts_abort() as check_interrupt:
        for (layer, d), clf in zip(keys, Parallel(n_jobs=jobs, return_as="generator")(tasks)):
            check_interrupt()  # before a half-trained estimator is kept
            estimators[(layer, d)] = clf
            if log:
                log(f"layer {layer} -> {layer + d}: {clf.n_iter_} epochs, loss {clf.loss_:.4f}")
    return estimators


def export_mlp(clf: MLPClassifier) -> MLPParams:
    """sklearn weights as float32 torch tensors (the forward pass is relu hidden layers, sigmoid output)."""
    if clf.activation != "relu" or clf.out_activation_ != "logistic":
        raise PredictorError(f"expected a relu MLP with sigmoid outputs, got {clf.activation}/{clf.out_activation_}")
    return [(torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
            for w, b in zip(clf.coefs_, clf.intercepts_)]


class LayerPredictor:
    """Predicts, at each source layer, expert probabilities for the next ``depth`` layers."""

    def __init__(self, meta: TraceMeta, depth: int, spec: FeatureSpec, hidden: tuple[int, ...],
                 params: dict[tuple[int, int], MLPParams], training: dict, device: str | torch.device = "cpu"):
        if depth < 1:
            raise PredictorError(f"depth must be at least 1, got {depth}")
        self.meta, self.depth, self.spec, self.hidden = meta, depth, spec, tuple(hidden)
        self.training = training
        self.params = params
        missing = [(l, d) for l in range(meta.num_layers) for d in range(1, self.depth_at(l) + 1)
                   if (l, d) not in params]
        if missing:
            raise PredictorError(f"predictor lacks the MLPs of (layer, depth) {missing[:4]}...; retrain with {RETRAIN}")
        self.device = torch.device(device)
        self._fused = [self._fuse(l) for l in range(meta.num_layers)]

    @classmethod
    def from_estimators(cls, estimators: dict[tuple[int, int], MLPClassifier], meta: TraceMeta, depth: int,
                        spec: FeatureSpec, hidden: tuple[int, ...], training: dict) -> LayerPredictor:
        return cls(meta, depth, spec, hidden, {key: export_mlp(clf) for key, clf in estimators.items()}, training)

    def depth_at(self, layer: int) -> int:
        """How many layers ahead ``layer`` predicts: ``depth``, clipped at the last layer."""
        return max(0, min(self.depth, self.meta.num_layers - 1 - layer))

    def _fuse(self, layer: int) -> MLPParams:
        """The layer's depth MLPs as one MLP whose output is their outputs side by side."""
        mlps = [self.params[(layer, d)] for d in range(1, self.depth_at(layer) + 1)]
        if not mlps:
            return []
        fused = []
        for i in range(len(mlps[0])):
            weights = [m[i][0] for m in mlps]
            w = torch.cat(weights, 1) if i == 0 else torch.block_diag(*weights)
            fused.append((w.contiguous().to(self.device), torch.cat([m[i][1] for m in mlps]).to(self.device)))
        return fused

    def features(self, layer: int, experts: torch.Tensor, weights: torch.Tensor | None,
                 prev_experts: torch.Tensor | None) -> torch.Tensor:
        """This predictor's feature rows (see :func:`features.layer_features` for the inputs)."""
        return layer_features(layer, experts, weights, prev_experts, spec=self.spec,
                              num_layers=self.meta.num_layers, num_experts=self.meta.num_experts)

    def predict(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``[B, depth_at(layer), E]`` probabilities; index 0 is layer+1. Pure torch, on ``self.device``."""
        mats = self._fused[layer]
        if not mats:
            return feats.new_zeros(feats.shape[0], 0, self.meta.num_experts)
        h = feats
        for w, b in mats[:-1]:
            h = torch.addmm(b, h, w).relu_()
        w, b = mats[-1]
        return torch.addmm(b, h, w).sigmoid_().view(feats.shape[0], -1, self.meta.num_experts)

    def to(self, device: str | torch.device) -> LayerPredictor:
        return LayerPredictor(self.meta, self.depth, self.spec, self.hidden, self.params, self.training, device)

    def config(self) -> dict:
        return {**self.meta.as_dict(), "depth": self.depth, "features": self.spec.as_dict(),
                "hidden": list(self.hidden), "activation": "relu", "output": "sigmoid", "training": self.training}

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically."""
        tensors = {}
        for (layer, d), mlp in self.params.items():
            for i, (w, b) in enumerate(mlp):
                tensors[f"layer{layer}.depth{d}.coef{i}"] = w.detach().cpu().contiguous()
                tensors[f"layer{layer}.depth{d}.intercept{i}"] = b.detach().cpu().contiguous()
        blob = save_safetensors(tensors, metadata={"format": FORMAT, "config": json.dumps(self.config())})
        atomic_write_bytes(path, blob)


def train_predictor(traces: list[str | Path], *, depth: int, window: int = 4, hidden: tuple[int, ...] = (64,),
                    seed: int = 0, max_iter: int = 200, use_prev_token: bool = True,
                    phases: tuple[str, ...] = ("decode",), jobs: int = 1,
                    log: Callable[[str], None] | None = None) -> LayerPredictor:
    """Read the traces, fit every MLP on the tokens of ``phases`` and return the exported predictor."""
    arrays = load_arrays(traces)
    spec = FeatureSpec(window=window, use_prev_token=use_prev_token, weighted=arrays.has_weights)
    data = arrays.select(phases)
    training = {"traces": [str(Path(t).resolve()) for t in traces], "requests": arrays.requests,
                "tokens": arrays.phase_counts(), "phases": list(phases), "samples": data.num_tokens,
                "seed": seed, "max_iter": max_iter, "sklearn": sklearn.__version__}
    estimators = fit_estimators(data, depth=depth, spec=spec, hidden=hidden, seed=seed, max_iter=max_iter,
                                jobs=jobs, log=log)
    return LayerPredictor.from_estimators(estimators, arrays.meta, depth, spec, hidden, training)


def load_predictor(path: str | Path, expect: TraceMeta | tuple[str, int, int, int] | None = None,
                   device: str | torch.device = "cpu") -> LayerPredictor:
    """Load a predictor, checking it fits ``expect`` = the model it will serve (a TraceMeta or
    ``(model, num_layers, num_experts, top_k)``). A different shape is an error; a different
    model name with the same shape only a warning (e.g. a renamed or re-quantised checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise PredictorError(f"predictor {path} does not exist; train one with {RETRAIN}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors input
        raise PredictorError(f"{path} is not a readable predictor file: {exc}") from exc
    if header.get("format") != FORMAT:
        raise PredictorError(f"{path} is not a {FORMAT} file (format {header.get('format')!r}); retrain with {RETRAIN}")
    try:
        cfg = json.loads(header["config"])
        meta = TraceMeta(cfg["model"], cfg["num_layers"], cfg["num_experts"], cfg["top_k"])
        spec = FeatureSpec.from_dict(cfg["features"])
        depth, hidden, training = cfg["depth"], tuple(cfg["hidden"]), cfg["training"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PredictorError(f"{path} has malformed predictor metadata ({exc}); retrain with {RETRAIN}") from exc
    if expect is not None:
        want = expect if isinstance(expect, TraceMeta) else TraceMeta(*expect)
        if (want.num_layers, want.num_experts, want.top_k) != (meta.num_layers, meta.num_experts, meta.top_k):
            raise PredictorError(
                f"predictor {path} was trained for {meta.model!r} ({describe_shape(meta)}) but is used with "
                f"{want.model!r} ({describe_shape(want)}); retrain on a trace of this model with {RETRAIN}")
        if want.model != meta.model:
            warnings.warn(f"predictor {path} was trained on traces of {meta.model!r}, used with {want.model!r} "
                          f"(same shape: {describe_shape(meta)})", stacklevel=2)
    n_mlp_layers = len(hidden) + 1
    params = {}
    for layer in range(meta.num_layers):
        for d in range(1, min(depth, meta.num_layers - 1 - layer) + 1):
            try:
                params[(layer, d)] = [(tensors[f"layer{layer}.depth{d}.coef{i}"],
                                       tensors[f"layer{layer}.depth{d}.intercept{i}"]) for i in range(n_mlp_layers)]
            except KeyError as exc:
                raise PredictorError(f"{path} lacks tensor {exc}; retrain with {RETRAIN}") from exc
    return LayerPredictor(meta, depth, spec, hidden, params, training, device)

"""Latency of one layer's prediction, where it runs in serving: on the runtime's device.

The predictor sits on the critical path of every decode layer, so what matters is the time of
one call at the serving batch size, not throughput. Each layer is timed call by call (after a
warm-up), for ``predict`` alone, for features + ``predict`` (what the runtime pays), and on CUDA
for features + ``predict`` replayed as one CUDA graph; the median is kept. On CUDA the calls are
timed with events around a synchronised call, so the figure includes the launch overhead that a
lone small call really costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .errors import PredictorError
from .graph import GraphedPredictor
from .layer_predictor import LayerPredictor


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function timing one call in microseconds on ``device``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_time(fn: Callable[[], object]) -> float:
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e3
    return cpu_time


def random_routing(predictor: LayerPredictor, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Plausible inputs: distinct top-k ids with renormalised weights, for the current and previous token."""
    m = predictor.meta
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(2, batch, m.num_layers, m.num_experts, generator=g).argsort(-1)[..., :m.top_k]
    weights = torch.rand(batch, m.num_layers, m.top_k, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    return experts[0].to(predictor.device), weights.to(predictor.device), experts[1].to(predictor.device)


@torch.inference_mode()
def bench(predictor: LayerPredictor, *, batch: int = 1, iters: int = 1000, warmup: int = 100) -> dict:
    """Median µs per call for every layer that predicts something, and their summary.

    On CUDA, also the same call replayed as a CUDA graph (:class:`GraphedPredictor`), the way a
    GPU runtime should call it."""
    if predictor.meta.num_layers < 2:
        raise PredictorError("a one-layer model has no later layer to predict")
    experts, weights, prev = random_routing(predictor, batch)
    timer = _timer(predictor.device)
    graphed = None
    if predictor.device.type == "cuda":
        with torch.inference_mode(False):  # graph capture needs ordinary tensors
            graphed = GraphedPredictor(predictor, batch)
        graphed.experts.copy_(experts)
        graphed.weights.copy_(weights)
        graphed.prev_experts.copy_(prev)
    layers = {}
    for layer in range(predictor.meta.num_layers - 1):
        feats = predictor.features(layer, experts, weights, prev)
        calls = {"features_and_predict_us": lambda layer=layer: predictor.predict(
                     layer, predictor.features(layer, experts, weights, prev)),
                 "predict_us": lambda layer=layer, feats=feats: predictor.predict(layer, feats)}
        if graphed is not None:
            calls["cuda_graph_us"] = lambda layer=layer: graphed.predict(layer)
        layers[layer] = {}
        for name, fn in calls.items():
            for _ in range(warmup):
                fn()
            layers[layer][name] = statistics.median(timer(fn) for _ in range(iters))
    result = {"device": str(predictor.device), "batch": batch, "iters": iters, "depth": predictor.depth,
              "threads": torch.get_num_threads(), "layers": layers}
    for name in layers[0]:
        values = [v[name] for v in layers.values()]
        result[f"median_{name}"], result[f"max_{name}"] = statistics.median(values), max(values)
    return result

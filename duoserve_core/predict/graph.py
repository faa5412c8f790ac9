"""CUDA-graph replay of features + predict, for serving on a GPU.

Called eagerly, a layer's prediction is ~13 small kernels, and on an H100 each launch costs
~10 µs from Python: ~180 µs per layer at batch 1, measured, against a budget of 50 µs. Captured
once per layer into a CUDA graph, a call is a single replay. The price is fixed shapes: one
runner per batch size, and inputs written in place into the runner's buffers (the runtime's
router can write its top-k straight into ``experts``/``weights``; no copy kernel is needed).
"""

from __future__ import annotations

import torch

from .errors import PredictorError
from .layer_predictor import LayerPredictor
from ..side_stream import capture


class GraphedPredictor:
    """Replays ``predictor.predict(layer, predictor.features(layer, ...))`` for a fixed batch.

    Fill ``experts``/``weights`` ``[B, L, k]`` (layers ``<= layer`` are read) and ``prev_experts``
    (``-1`` where there is no previous token), then ``predict(layer)``. The returned tensor is the
    graph's own output: it is overwritten by the next ``predict`` of the same layer.
    """

    def __init__(self, predictor: LayerPredictor, batch: int):
        device = predictor.device
        if device.type != "cuda":
            raise PredictorError(f"CUDA graphs need a predictor on a CUDA device, this one is on {device}")
        m = predictor.meta
        self.predictor = predictor
        self.experts = torch.zeros(batch, m.num_layers, m.top_k, dtype=torch.long, device=device)
        self.weights = torch.full((batch, m.num_layers, m.top_k), 1.0 / m.top_k, device=device)
        self.prev_experts = torch.full((batch, m.num_layers, m.top_k), -1, dtype=torch.long, device=device)
        layers = [layer for layer in range(m.num_layers) if predictor.depth_at(layer)]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.no_grad():
            for layer in layers:
                self._graphs[layer], self._outputs[layer] = capture(lambda: self._eager(layer), device, pool)
                pool = self._graphs[layer].pool()  # layers run one after another: one memory pool for all
        self._empty = torch.zeros(batch, 0, m.num_experts, device=device)

    def _eager(self, layer: int) -> torch.Tensor:
        p = self.predictor
        return p.predict(layer, p.features(layer, self.experts, self.weights, self.prev_experts))

    def predict(self, layer: int) -> torch.Tensor:
        """``[B, depth_at(layer), E]`` probabilities from the current contents of the buffers."""
        graph = self._graphs.get(layer)
        if graph is None:
            return self._empty
        graph.replay()
        return self._outputs[layer]

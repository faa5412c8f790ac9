"""What the predictor has to beat: simple per-expert scores for the same (layer, depth) targets.

Each baseline gives, for the tokens of a test trace at source layer ``l``, a score per expert at
target layer ``l + d`` (higher = more likely), or None where it has nothing to say. The fitted
ones (popularity, affinity) learn from the same training tokens as the predictor, so the
comparison is about the model, not the data.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .data import TraceArrays, multi_hot


class Baseline(Protocol):
    name: str

    def scores(self, layer: int, d: int, data: TraceArrays) -> torch.Tensor | None:
        """``[N, E]`` scores for layer ``layer + d`` of every token in ``data``, or None."""


class Popularity:
    """How often each expert is chosen at the target layer (the best input-free guess)."""

    name = "popularity"

    def __init__(self, train: TraceArrays):
        indicator = multi_hot(train.experts, train.meta.num_experts)  # [N, L, E]
        self.freq = indicator.mean(0)  # [L, E]

    def scores(self, layer: int, d: int, data: TraceArrays) -> torch.Tensor:
        return self.freq[layer + d].expand(data.num_tokens, -1)


class PreviousToken:
    """The previous token's experts at the target layer (temporal locality of decoding)."""

    name = "previous_token"

    def scores(self, layer: int, d: int, data: TraceArrays) -> torch.Tensor:
        return multi_hot(data.prev_experts[:, layer + d], data.meta.num_experts)


class Affinity:
    """P(expert e at l+d | expert e' at l) from training counts, averaged over the token's top-k at l.

    Rows of experts never chosen at l in training fall back to the target layer's popularity.
    """

    name = "affinity"

    def __init__(self, train: TraceArrays, depth: int):
        indicator = multi_hot(train.experts, train.meta.num_experts)  # [N, L, E]
        popularity = indicator.mean(0)
        L = train.meta.num_layers
        self.cond: dict[tuple[int, int], torch.Tensor] = {}
        for layer in range(L - 1):
            seen = indicator[:, layer].sum(0)  # [E]
            for d in range(1, min(depth, L - 1 - layer) + 1):
                joint = indicator[:, layer].T @ indicator[:, layer + d]  # [E, E] co-occurrence counts
                cond = joint / seen.clamp(min=1).unsqueeze(1)
                self.cond[(layer, d)] = torch.where((seen > 0).unsqueeze(1), cond, popularity[layer + d])

    def scores(self, layer: int, d: int, data: TraceArrays) -> torch.Tensor:
        current = multi_hot(data.experts[:, layer], data.meta.num_experts)
        return current @ self.cond[(layer, d)] / data.meta.top_k


# Methods whose scores mark only their top-k guesses (a trace keeps the gate's top-k, not its router
# scores): beyond k their ranking is the tie-break, so recall of more than k experts is not given.
TOP_K_ONLY = frozenset({"speculative_gate"})


class SpeculativeGate:
    """Layer l+1's router applied at layer l (recorded in the trace as ``spec_experts``): depth 1 only."""

    name = "speculative_gate"

    def scores(self, layer: int, d: int, data: TraceArrays) -> torch.Tensor | None:
        if d != 1 or data.spec_experts is None:
            return None
        return multi_hot(data.spec_experts[:, layer], data.meta.num_experts)


def fit_baselines(train: TraceArrays, depth: int) -> list[Baseline]:
    """All baselines, the fitted ones on ``train`` (already restricted to the training phases)."""
    return [Popularity(train), PreviousToken(), Affinity(train, depth), SpeculativeGate()]

"""Traces as the tensors the predictor, the baselines and the evaluation share.

Everything here is per token (one row per (request, token)); the previous-token routing is
derived once, the same way for training and evaluation: the token at position ``t - 1`` of the
same request, or none (``-1``) for a request's first token or after a gap in positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..traces import Trace, TraceMeta, read_trace
from .errors import PredictorError, describe_shape

PHASES = ("decode", "prefill")


@dataclass
class TraceArrays:
    """One or more traces of the same shape, concatenated token-wise."""

    meta: TraceMeta
    experts: torch.Tensor       # [N, L, k] int64
    weights: torch.Tensor       # [N, L, k] float32 (uniform 1/k where the trace has none)
    prev_experts: torch.Tensor  # [N, L, k] int64, -1 where there is no previous token
    phase: np.ndarray           # [N] str
    spec_experts: torch.Tensor | None  # [N, L, k] int64 (-1 at the last layer), None if absent
    has_weights: bool
    requests: int

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    def phase_counts(self) -> dict[str, int]:
        return {p: int((self.phase == p).sum()) for p in PHASES}

    def select(self, phases: tuple[str, ...]) -> TraceArrays:
        """Only the tokens of these phases (their previous tokens are kept as computed)."""
        keep = torch.from_numpy(np.isin(self.phase, phases))
        return TraceArrays(self.meta, self.experts[keep], self.weights[keep], self.prev_experts[keep],
                           self.phase[keep.numpy()],
                           None if self.spec_experts is None else self.spec_experts[keep],
                           self.has_weights, self.requests)


def from_trace(trace: Trace) -> TraceArrays:
    tokens = trace.tokens()
    experts = torch.from_numpy(trace.expert_array())
    prev = torch.full_like(experts, -1)
    same_request = tokens["request_id"].to_numpy()[1:] == tokens["request_id"].to_numpy()[:-1]
    consecutive = np.diff(tokens["token_index"].to_numpy()) == 1
    has_prev = np.concatenate([[False], same_request & consecutive])
    prev[torch.from_numpy(has_prev)] = experts[torch.from_numpy(np.flatnonzero(has_prev) - 1)]
    spec = None
    if "spec_experts" in trace.df.columns:
        last = trace.df["layer"] == trace.meta.num_layers - 1
        if trace.df.loc[~last, "spec_experts"].notna().all():
            spec = torch.from_numpy(trace.expert_array("spec_experts"))
    return TraceArrays(trace.meta, experts, torch.from_numpy(trace.weight_array()), prev,
                       tokens["phase"].to_numpy(dtype=str), spec, bool(trace.has_weights),
                       int(tokens["request_id"].nunique()))


def load_arrays(paths: list[str | Path]) -> TraceArrays:
    """Read and concatenate traces; they must share layers, experts and top-k."""
    parts = [from_trace(read_trace(p)) for p in paths]
    first = parts[0].meta
    for path, part in zip(paths[1:], parts[1:]):
        m = part.meta
        if (m.num_layers, m.num_experts, m.top_k) != (first.num_layers, first.num_experts, first.top_k):
            raise PredictorError(f"trace {path} has {describe_shape(m)} but {paths[0]} has {describe_shape(first)}; "
                                 "train on traces of one model")
    if len(parts) == 1:
        return parts[0]
    spec = None if any(p.spec_experts is None for p in parts) else torch.cat([p.spec_experts for p in parts])
    return TraceArrays(first, torch.cat([p.experts for p in parts]), torch.cat([p.weights for p in parts]),
                       torch.cat([p.prev_experts for p in parts]), np.concatenate([p.phase for p in parts]),
                       spec, all(p.has_weights for p in parts), sum(p.requests for p in parts))


def multi_hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[..., k]`` expert ids -> ``[..., E]`` 0/1 float indicator (ids below zero are ignored)."""
    out = torch.zeros(*ids.shape[:-1], num_experts, dtype=torch.float32, device=ids.device)
    return out.scatter_add_(-1, ids.clamp(min=0), (ids >= 0).to(torch.float32))


def ranked_hits(scores: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """``[N, E]``: how many of the actual ids ``actual [N, k]`` are among each row's 1, 2, ... highest
    ``scores [N, E]`` (ties towards the lower expert id)."""
    truth = multi_hot(actual, scores.shape[1]).bool()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return truth.gather(1, order).long().cumsum(1)

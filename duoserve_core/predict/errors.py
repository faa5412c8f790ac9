"""The predictor's user-facing error (kept apart so every predict module can raise it)."""

from __future__ import annotations

from ..errors import DuoServeError
from ..traces import TraceMeta


class PredictorError(DuoServeError, ValueError):
    """A predictor file is missing or malformed, or does not fit the model/trace it is used with."""


def describe_shape(meta: TraceMeta) -> str:
    return f"{meta.num_layers} layers x {meta.num_experts} experts, top-{meta.top_k}"

"""Scheduling policies: decisions only (what to load, when, what to evict).

``base`` (the contract: events in, plans out), ``knobs`` (the knobs and their defaults),
``simple`` (on-demand, resident, lru, per-layer-lru, lru-speculative), ``duoserve`` (the dual-phase schedule and the
uniform strawman).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .base import NO_PLAN, CacheView, ExpertKey, Phase, Plan, Policy
from .duoserve import DuoServePolicy, UniformPolicy
from .knobs import DEFAULT_KNOBS, POLICIES, PolicyKnobs, make_policy, policy_class
from .simple import LRUPolicy, LRUSpeculativePolicy, OnDemandPolicy, PerLayerLRUPolicy, ResidentPolicy

if TYPE_CHECKING:  # for the hint only: the traces package loads pandas and pyarrow, which policies never need
    from ..traces import RoutingReplay


def routing_source(model_name: str, replay: RoutingReplay | None, num_layers: int) -> str:
    """Whose routing the policy sees: the trace's model where a routing trace is replayed layer for
    layer (``replay``), else the model's. Why: a predictor learns routing,
    so one trained on a trace's model fits that trace replayed on synthesized weights of another name
    (notebook 05's Mixtral-size experts on the bundled model's routing), and warning there would be
    noise; a trace tiled over more layers than it has is routing no model made, so the model's name."""
    if replay is not None and replay.trace_layers == num_layers:
        return replay.trace_model
    return model_name


def load_policy(knobs: PolicyKnobs, model: tuple[str, int, int, int]) -> Policy:
    """``make_policy`` after reading the predictor file, checked against ``model`` = (name, layers,
    experts, top-k); the file is read only when the policy uses a predictor."""
    predictor = None
    if knobs.predictor is not None and "predictor" in knobs.uses:
        from ..predict import load_predictor  # scikit-learn and the predictor stack load only when needed

        predictor = load_predictor(Path(knobs.predictor), expect=model, device="cpu")
    return make_policy(knobs, predictor)


__all__ = ["DEFAULT_KNOBS", "NO_PLAN", "POLICIES", "CacheView", "DuoServePolicy", "ExpertKey", "LRUPolicy", "LRUSpeculativePolicy",
           "OnDemandPolicy", "PerLayerLRUPolicy", "Phase", "Plan", "Policy", "PolicyKnobs", "ResidentPolicy", "UniformPolicy",
           "load_policy", "make_policy", "policy_class", "routing_source"]

"""Scheduling policies: decisions only (what to load, when, what to evict)."""

from __future__ import annotations

from .base import NO_PLAN, CacheView, ExpertKey, Phase, Plan, Policy
from .duoserve import DuoServePolicy
from .simple import LRUSpeculativePolicy, OnDemandPolicy, ResidentPolicy

POLICIES = ("duoserve", "uniform", "on-demand", "lru-speculative", "resident")


def make_policy(name: str | Policy, *, predictor=None, prefetch_depth: int = 2,
                predictor_threshold: float = 0.3, speculative_gate: bool = False) -> Policy:
    """A policy by its ``--policy`` name (or an instance, returned as is), with its knobs."""
    if isinstance(name, Policy):
        return name
    if name in ("duoserve", "uniform"):
        return DuoServePolicy(predictor, prefetch_depth, predictor_threshold, uniform=name == "uniform",
                              speculative_gate=speculative_gate)
    if name == "on-demand":
        return OnDemandPolicy()
    if name == "resident":
        return ResidentPolicy()
    if name == "lru-speculative":
        return LRUSpeculativePolicy()
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


__all__ = ["NO_PLAN", "POLICIES", "CacheView", "DuoServePolicy", "ExpertKey", "LRUSpeculativePolicy", "OnDemandPolicy", "Phase", "Plan", "Policy",
           "ResidentPolicy", "make_policy"]

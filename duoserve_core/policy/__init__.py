"""Scheduling policies: decisions only (what to load, when, what to evict)."""

from __future__ import annotations

from .base import NO_PLAN, CacheView, ExpertKey, Phase, Plan, Policy
from .simple import OnDemandPolicy, ResidentPolicy

POLICIES: dict[str, type[Policy]] = {
    OnDemandPolicy.name: OnDemandPolicy,
    ResidentPolicy.name: ResidentPolicy,
}


def make_policy(name: str | Policy, **knobs) -> Policy:
    """A policy by its ``--policy`` name (or an instance, returned as is)."""
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](**knobs)


__all__ = ["NO_PLAN", "POLICIES", "CacheView", "ExpertKey", "OnDemandPolicy", "Phase", "Plan", "Policy",
           "ResidentPolicy", "make_policy"]

"""The reference policies every other one is measured between.

- ``on-demand``: load each expert when the router asks for it; keep nothing beyond the layer
  in progress. Every use is a transfer: the floor of what offloading costs without a schedule.
- ``resident``: every expert on the device, loaded once; the speed of light for compute, and
  only possible where the budget holds the whole model.
- ``lru``: the plain cache: demand loads into one LRU cache over every slot, no speculation. Recency
  is counted per layer visit (ties: the lower expert id is older), not per acquisition, so that it is
  exactly the stack algorithm ``sim.reference`` sweeps over every budget at once (a test holds it).
- ``per-layer-lru``: mixtral-offloading's cache without its speculation: the victim is the least
  recently used expert of the layer that holds the most slots, so each layer keeps about an equal
  share.
- ``lru-speculative``: the mixtral-offloading approach: ``per-layer-lru`` plus speculative loading
  of layer l+1's experts guessed by applying layer l+1's router to layer l's hidden state.

What each keeps: on-demand nothing beyond the layer in progress; resident everything; lru the
experts used most recently, whatever their layer; per-layer-lru and lru-speculative the most
recent of each layer, about C / L slots a layer.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..errors import BudgetError
from .base import CacheView, ExpertKey, LayerVisits, Phase, Plan, Policy


class OnDemandPolicy(Policy):
    name = "on-demand"

    def layer_done(self, layer: int) -> Plan:
        return Plan(release=[k for k in self.cache.resident() if k[0] == layer])


class ResidentPolicy(Policy):
    name = "resident"
    holds_every_expert = True

    def attach(self, cache: CacheView) -> None:
        super().attach(cache)
        total = cache.num_layers * cache.num_experts
        if cache.capacity < total:
            raise BudgetError(
                f"policy 'resident' needs all {total} experts on the device, but the memory budget leaves room "
                f"for {cache.capacity} expert slots; raise --memory-budget or choose --policy on-demand"
            )

    def phase(self, phase: Phase) -> Plan:
        missing = [(l, e) for l in range(self.cache.num_layers) for e in range(self.cache.num_experts)
                   if not self.cache.is_resident((l, e))]
        return Plan(load=missing)


class LRUPolicy(Policy):
    name = "lru"

    def attach(self, cache: CacheView) -> None:
        super().attach(cache)
        self.visits = LayerVisits()

    def router_done(self, layer: int, topk: torch.Tensor, probs: torch.Tensor) -> Plan:
        self.visits.record(layer, set(topk.flatten().tolist()))
        return Plan()

    def eviction_order(self, candidates: Sequence[ExpertKey]) -> list[ExpertKey]:
        return sorted(candidates, key=lambda k: (self.visits.last(k), k[1]))


class PerLayerLRUPolicy(Policy):
    name = "per-layer-lru"

    def eviction_order(self, candidates: Sequence[ExpertKey]) -> list[ExpertKey]:
        """Least recently used within the layer holding the most experts: per-layer LRU caches."""
        per_layer = Counter(layer for layer, _ in self.cache.resident())
        return sorted(candidates, key=lambda k: (-per_layer[k[0]], self.cache.last_use(k)))


class LRUSpeculativePolicy(PerLayerLRUPolicy):
    name = "lru-speculative"
    wants_speculation = True

    def speculated(self, layer: int, topk: torch.Tensor) -> Plan:
        return Plan(load=sorted({(layer, int(e)) for e in topk.flatten().tolist()}))

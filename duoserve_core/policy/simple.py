"""The two reference policies every other one is measured between.

- ``on-demand``: load each expert when the router asks for it; keep nothing beyond the layer
  in progress. Every use is a transfer: the floor of what offloading costs without a schedule.
- ``resident``: every expert on the device, loaded once; the speed of light for compute, and
  only possible where the budget holds the whole model.
"""

from __future__ import annotations

from ..errors import BudgetError
from .base import CacheView, Phase, Plan, Policy


class OnDemandPolicy(Policy):
    name = "on-demand"

    def layer_done(self, layer: int) -> Plan:
        return Plan(release=[k for k in self.cache.resident() if k[0] == layer])


class ResidentPolicy(Policy):
    name = "resident"

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

"""The policy interface: events in, plans out. A policy never touches CUDA.

The executor (real or simulated) tells the policy what happens, in this order per forward:

    phase(prefill | decode)                        once per step
    layer_started(l)                               before layer l's attention
    router_done(l, topk, probs)                    after layer l's router (CPU tensors)
    layer_done(l)                                  after layer l's experts are queued

and, to a policy that sets ``wants_speculation``, ``speculated(l+1, topk)`` after layer l's router:
layer l+1's router applied to layer l's MoE input, the speculative gate of mixtral-offloading.

and carries out the ``Plan`` each call returns: ``load`` lists (layer, expert) pairs to copy
ahead of need, most urgent first; ``release`` lists experts whose slots may be reused now.
Loading what the router asks for and is not resident is the executor's job (a demand miss),
as is pinning the experts of the layer in progress until their kernels have been queued.

When the executor needs a slot and none is free, it asks ``eviction_order`` to rank the
unpinned resident experts, and evicts the first; for a prefetch it first asks
``worth_replacing(victim, incoming)``, so that a guess never pushes out something more needed.
The default rule is least recently used; policies override it (the decode scheduler ranks by
predicted reuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Protocol, Sequence

import torch

from ..events import ExpertKey  # noqa: F401  (layer, expert), re-exported


class Phase(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class Plan:
    load: list[ExpertKey] = field(default_factory=list)
    release: list[ExpertKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.load or self.release)


NO_PLAN = Plan()


class CacheView(Protocol):
    """What a policy may read of the executor's cache."""

    num_layers: int
    num_experts: int
    capacity: int  # slots

    def is_resident(self, key: ExpertKey) -> bool: ...
    def resident(self) -> set[ExpertKey]: ...
    def last_use(self, key: ExpertKey) -> int: ...


class LayerVisits:
    """Which layer visit last used each expert. Recency is counted per visit, so the experts one visit
    uses are equally recent: an acquisition clock would age the ones acquired first, the resident ones,
    which are the ones that repeat."""

    def __init__(self) -> None:
        self.count = 0
        self._last: dict[ExpertKey, int] = {}

    def record(self, layer: int, experts: Iterable[int]) -> None:
        self.count += 1
        for e in experts:
            self._last[(layer, int(e))] = self.count

    def last(self, key: ExpertKey) -> int:
        """The visit that last used ``key`` (-1: none yet)."""
        return self._last.get(key, -1)


class Policy:
    """Base policy: no prefetch, keep whatever is loaded, evict least recently used."""

    name = "base"
    # The knobs (``policy.knobs.PolicyKnobs`` field names) this policy reads: the runtime, the CLIs,
    # the bench and the widgets ask this, never the policy's name.
    uses: frozenset[str] = frozenset()
    wants_speculation = False
    # Whether this policy keeps every expert on the device (``resident``): a measured run keeps its
    # cache warm, and the simulator charges the host bookkeeping measured for a resident run.
    holds_every_expert = False
    # Whether an expert this policy releases may be taken back from its slot while no copy has
    # overwritten it (``ExpertCache``). Off for the baselines: on-demand keeps nothing by definition.
    reclaims_released = False
    def attach(self, cache: CacheView) -> None:
        """Called once when the runtime is built; may raise if the budget cannot serve the policy."""
        self.cache = cache

    def phase(self, phase: Phase) -> Plan:
        return NO_PLAN

    def layer_started(self, layer: int) -> Plan:
        return NO_PLAN

    def router_done(self, layer: int, topk: torch.Tensor, probs: torch.Tensor) -> Plan:
        return NO_PLAN

    def layer_done(self, layer: int) -> Plan:
        return NO_PLAN

    def speculated(self, layer: int, topk: torch.Tensor) -> Plan:
        return NO_PLAN

    def eviction_order(self, candidates: Sequence[ExpertKey]) -> list[ExpertKey]:
        return sorted(candidates, key=self.cache.last_use)

    def worth_replacing(self, victim: ExpertKey, incoming: ExpertKey) -> bool:
        """May a prefetch of ``incoming`` evict ``victim``? (Demand misses always may.)"""
        return True

    @property
    def prefill_window(self) -> int | None:
        """Layers whose experts the prefill keeps live at once, for a policy that bounds them (else None)."""
        return None

    def describe(self) -> dict:
        """Knobs worth reporting beside results."""
        return {"policy": self.name}

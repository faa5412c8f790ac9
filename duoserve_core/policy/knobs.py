"""The knobs of a schedule: one dataclass, one set of defaults, checked in one place.

Every entry point (``load``, ``Runtime.configure``, the CLIs, the bench, the simulator, the
notebooks' widgets) builds a ``PolicyKnobs`` and reads its defaults from here.

Why 0.5 for the threshold: in decode every copy is on the critical path, so a prefetch pays
only if it is more likely used than not: a right guess saves one copy, a wrong one costs one
(and may evict something useful). Below 0.5 a guess costs more than it saves on average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import KnobError
from .base import Policy
from .host_lane import HOST_LANE_MODES
from .duoserve import DuoServePolicy, UniformPolicy
from .simple import LRUPolicy, LRUSpeculativePolicy, OnDemandPolicy, PerLayerLRUPolicy, ResidentPolicy

_CLASSES: dict[str, type[Policy]] = {"duoserve": DuoServePolicy, "uniform": UniformPolicy,
                                     "on-demand": OnDemandPolicy, "lru-speculative": LRUSpeculativePolicy,
                                     "resident": ResidentPolicy, "lru": LRUPolicy,
                                     "per-layer-lru": PerLayerLRUPolicy}
POLICIES = tuple(_CLASSES)
LANE_KNOBS = ("cpu_experts", "cpu_threads", "cpu_split")  # every policy runs with them: ``effective`` keeps them


@dataclass(frozen=True)
class PolicyKnobs:
    """``policy``: a name of ``POLICIES`` (or a ``Policy`` instance, used as is); ``predictor``: a
    trained predictor file; ``prefetch_depth``: layers ahead a policy looks; ``predictor_threshold``:
    the score a guess needs to be prefetched; ``speculative_gate``: guess layer l+1 with its own
    router on layer l's input; ``copy_slack``: how many expert copies fit, in decode, between one layer's
    demand copies and the next layer's (the copy stream's idle stretch; see ``policy.duoserve``);
    ``cpu_experts``: the CPU lane (``policy.host_lane``: off, auto, or the forced all/half) and
    ``cpu_threads`` its intra-op threads (None: torch's default), for every policy alike; ``cpu_split``
    the share of one expert the lane may compute while the copy path moves the rest (int4 records laid
    out for it, ``experts.formats.SplitInt4Format``; 0: none), fixed when a runtime is built (it is the records' layout).
    A policy ignores the knobs it does not use (``Policy.uses``); the lane's knobs apply to all."""

    policy: str | Policy = "on-demand"
    predictor: str | None = None
    prefetch_depth: int = 2
    predictor_threshold: float = 0.5
    speculative_gate: bool = False
    copy_slack: float = 1.0
    cpu_experts: str = "off"
    cpu_threads: int | None = None
    cpu_split: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.policy, str) and self.policy not in POLICIES:
            raise KnobError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        depth = self.prefetch_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise KnobError(f"prefetch depth {depth!r}: give a whole number of layers, at least 1 (e.g. --prefetch-depth 2)")
        t = self.predictor_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t <= 1.0:
            raise KnobError(f"predictor threshold {t!r}: give a probability between 0 and 1 (e.g. --predictor-threshold 0.5)")
        if self.predictor is not None:
            object.__setattr__(self, "predictor", str(self.predictor) if isinstance(self.predictor, Path) else self.predictor)
        object.__setattr__(self, "predictor_threshold", float(t))
        c = self.copy_slack
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise KnobError(f"copy slack {c!r}: give a number of copies, 0 or more (e.g. --copy-slack 1)")
        object.__setattr__(self, "copy_slack", float(c))
        object.__setattr__(self, "speculative_gate", bool(self.speculative_gate))
        if self.cpu_experts not in HOST_LANE_MODES:
            raise KnobError(f"cpu experts {self.cpu_experts!r}: choose one of {', '.join(HOST_LANE_MODES)} "
                            "(e.g. --cpu-experts auto)")
        n = self.cpu_threads
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise KnobError(f"cpu threads {n!r}: give a whole number of threads, at least 1 (e.g. --cpu-threads 8)")
        f = self.cpu_split
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.0 <= f < 1.0:
            raise KnobError(f"cpu split {f!r}: give the lane's share of a shared expert, 0 (none) or more and below 1 "
                            "(e.g. --cpu-split 0.75)")
        object.__setattr__(self, "cpu_split", float(f))

    def changed(self, **changes) -> "PolicyKnobs":
        """A copy with ``changes`` applied; a change of ``None`` keeps the current value (so a
        predictor, once given, stays until another replaces it)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown knob(s) {', '.join(sorted(unknown))}; the knobs are "
                            + ", ".join(f.name for f in fields(self)))
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def uses(self) -> frozenset[str]:
        """The knobs this policy reads (the others make no difference to it)."""
        return self.policy.uses if isinstance(self.policy, Policy) else _CLASSES[self.policy].uses

    def effective(self) -> "PolicyKnobs":
        """These knobs with the ones the policy does not use at their defaults: what to report, and
        what makes two configurations the same."""
        default = PolicyKnobs()
        return replace(self, **{f.name: getattr(default, f.name) for f in fields(self)
                                if f.name not in LANE_KNOBS and f.name != "policy" and f.name not in self.uses})


DEFAULT_KNOBS = PolicyKnobs()  # the defaults every entry point shows (CLI flags, widgets, notebooks)


def policy_class(name: str) -> type[Policy]:
    """The class of policy ``name``: what it ``uses``, whether it ``holds_every_expert``, without building it."""
    return _CLASSES[PolicyKnobs(policy=name).policy]  # PolicyKnobs names the choices on a typo


def make_policy(knobs: PolicyKnobs, predictor=None) -> Policy:
    """The policy ``knobs`` name, given the loaded ``predictor`` (a ``LayerPredictor``) if it uses one."""
    if isinstance(knobs.policy, Policy):
        return knobs.policy
    cls = _CLASSES[knobs.policy]
    if cls.uses:
        return cls(predictor, knobs.prefetch_depth, knobs.predictor_threshold, knobs.speculative_gate, knobs.copy_slack)
    return cls()

"""Hit rate and loads of the reference caches at every slot count, from the routing alone.

Belady's farthest-next-use (the oracle), global LRU, per-layer LRU (each layer owns an equal share
of the slots, as mixtral-offloading's caches do) and LFU are all *stack algorithms* (Mattson et al.,
1970): at any moment the cache of C slots holds the top C entries of one priority stack, so one
pass over the routing yields every capacity at once. Each use's depth in the stack is recorded;
the use hits in every cache deeper than that, and ``loads(C)`` is the number of uses at depth C or
more. The stack update is the general one: the referenced key goes on top and, at each level
above its old place, the entry that a cache of that size would evict (the highest eviction score)
carries on down. It is exact for any eviction score read at the time of the use.

Uses come in groups, as the executor pins them: a decode step's k experts of one layer must be
resident together, so while a group is served its members cannot be evicted (score -inf).
Prefill experts are singletons, in layer and expert order, as ``bench.bounds`` counts them; so
the Belady figure here is ``oracle.belady_loads`` over the same groups, at every capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..traces import RoutingReplay
from .calibration import Calibration, format_name
from .sim_model import SimModel

POLICIES = ("belady", "lru", "per-layer-lru", "lfu")


@dataclass
class Workload:
    """Expert uses in order: ``keys`` (layer * E + expert), the group of each use, and which count
    (decode uses; prefill warms the cache but is not scored)."""

    keys: np.ndarray
    group_starts: np.ndarray   # index of each group's first use; one past the end appended
    counted: np.ndarray        # bool per use
    num_layers: int
    num_experts: int
    decode_tokens: int
    contexts: list[int]        # context length of every decode step

    @property
    def n_keys(self) -> int:
        return self.num_layers * self.num_experts


def workload(replay: RoutingReplay, requests: list[tuple[int, int, int]], num_layers: int,
             num_experts: int) -> Workload:
    """The uses of ``requests`` (request id, prompt tokens, new tokens) served one after another."""
    keys, starts, counted, contexts = [], [], [], []
    for request_id, prompt, new in requests:
        per_layer = [replay.routing(request_id, 0, prompt, layer)[0] for layer in range(num_layers)]
        for layer, experts in enumerate(per_layer):
            for e in sorted(set(experts.flatten().tolist())):
                starts.append(len(keys))
                keys.append(layer * num_experts + e)
                counted.append(False)
        for step in range(1, new):
            position = prompt + step - 1
            contexts.append(position + 1)
            for layer in range(num_layers):
                group = sorted(set(replay.routing(request_id, position, 1, layer)[0].flatten().tolist()))
                starts.append(len(keys))
                keys += [layer * num_experts + e for e in group]
                counted += [True] * len(group)
    starts.append(len(keys))
    return Workload(np.asarray(keys, dtype=np.int64), np.asarray(starts, dtype=np.int64),
                    np.asarray(counted, dtype=bool), num_layers, num_experts, len(contexts), contexts)


def _next_use(keys: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """For each use, the group index of the same key's next use (inf if none)."""
    out = np.full(len(keys), math.inf)
    seen: dict[int, int] = {}
    for g in range(len(starts) - 2, -1, -1):
        a, b = starts[g], starts[g + 1]
        for i in range(a, b):
            key = int(keys[i])
            if key in seen:
                out[i] = seen[key]
        for i in range(a, b):
            seen[int(keys[i])] = g
    return out


def stack_depths(keys: np.ndarray, starts: np.ndarray, policy: str, n_keys: int) -> np.ndarray:
    """Depth of every use in the priority stack of ``policy`` (``-1`` for a first use: a miss everywhere)."""
    if policy not in ("belady", "lru", "lfu"):
        raise ValueError(f"no stack algorithm for {policy!r}")
    stack = np.zeros(n_keys, dtype=np.int64)
    where = np.full(n_keys, -1, dtype=np.int64)
    score = np.zeros(n_keys)          # higher: evicted first
    count = np.zeros(n_keys)
    nxt = _next_use(keys, starts) if policy == "belady" else None
    depth = 0
    out = np.empty(len(keys), dtype=np.int64)
    arange = np.arange(n_keys + 1)
    for g in range(len(starts) - 1):
        a, b = starts[g], starts[g + 1]
        members = keys[a:b]
        score[members] = -math.inf    # the group in progress is pinned
        for i in range(a, b):
            x = int(keys[i])
            p = int(where[x])
            out[i] = p
            if p < 0:
                p = depth
                depth += 1
            if p > 0:
                seg = stack[:p].copy()
                sc = score[seg]
                before = np.maximum.accumulate(sc)
                new_max = np.empty(p, dtype=bool)
                new_max[0] = True
                new_max[1:] = sc[1:] > before[:-1]
                carry = np.maximum.accumulate(np.where(new_max, arange[:p], 0))
                stack[1:p] = np.where(new_max[1:], seg[carry[:-1]], seg[1:])
                stack[p] = seg[carry[-1]]
                where[stack[1:p + 1]] = arange[1:p + 1]
            stack[0] = x
            where[x] = 0
        recency = np.arange(a, b)  # the use's index: later uses are more recent, never tied
        if policy == "belady":
            score[members] = nxt[a:b]
        elif policy == "lru":
            score[members] = -recency
        else:
            count[members] += 1
            score[members] = -(count[members] * (len(keys) + 1) + recency)  # fewest uses, then least recent
    return out


def loads_by_capacity(depths: np.ndarray, counted: np.ndarray, max_capacity: int) -> np.ndarray:
    """``loads[C]`` for C = 0 .. max_capacity: counted uses at depth >= C, or first uses."""
    d = depths[counted]
    cold = int((d < 0).sum())
    hist = np.bincount(d[d >= 0], minlength=max_capacity + 1)[:max_capacity + 1]
    deeper = np.concatenate([np.cumsum(hist[::-1])[::-1], [0]])  # deeper[C] = #uses at depth >= C
    beyond = int((d >= max_capacity + 1).sum())
    return cold + deeper[:max_capacity + 1] + beyond


def per_layer_lru_loads(w: Workload) -> np.ndarray:
    """Per-layer LRU caches: layer l owns C // L slots, one more for the first C mod L layers."""
    total = w.n_keys
    per_layer = []
    layer_of = w.keys // w.num_experts
    group_of = np.repeat(np.arange(len(w.group_starts) - 1), np.diff(w.group_starts))
    for layer in range(w.num_layers):
        mask = layer_of == layer
        keys = w.keys[mask] % w.num_experts
        groups = group_of[mask]
        starts = np.concatenate([np.flatnonzero(np.diff(groups, prepend=-1) != 0), [len(keys)]])
        depths = stack_depths(keys, starts, "lru", w.num_experts)
        per_layer.append(loads_by_capacity(depths, w.counted[mask], w.num_experts))
    out = np.zeros(total + 1, dtype=np.int64)
    for capacity in range(total + 1):
        share, extra = divmod(capacity, w.num_layers)
        out[capacity] = sum(per_layer[l][min(share + (l < extra), w.num_experts)] for l in range(w.num_layers))
    return out


def sweep(w: Workload, policies: tuple[str, ...] = POLICIES) -> dict[str, np.ndarray]:
    """``{policy: loads[C]}`` for every capacity C = 0 .. all experts."""
    out = {}
    for policy in policies:
        if policy == "per-layer-lru":
            out[policy] = per_layer_lru_loads(w)
        else:
            out[policy] = loads_by_capacity(stack_depths(w.keys, w.group_starts, policy, w.n_keys), w.counted,
                                            w.n_keys)
    return out


def decode_step_compute_s(model: SimModel, cal: Calibration, context: int) -> float:
    """One decode token's time with every expert resident: attention, router, k experts and the
    host's per-layer and per-step work, from the calibration."""
    k, L = model.config.num_experts_per_tok, model.num_layers
    fmt = format_name(model.quant, cal)
    attention = max(cal.attention_device_s("decode", context), cal.attention_launch["decode"].at(context))
    expert = max(cal.expert_device_s(fmt, "decode", 1), cal.per_expert("decode"))
    per_layer = (attention + cal.router_device_s("decode", context) + cal.layer_base_s["offloaded"] + k * expert)
    return L * per_layer + cal.step_pre_s["decode"] + cal.step_post_s["decode"]


def table(w: Workload, model: SimModel, cal: Calibration, loads: dict[str, np.ndarray]) -> list[dict]:
    """One row per policy and slot count (from top-k to every expert): budget, hit rate, loads and
    two TPOT estimates: every copy hidden behind compute (a bound, as bench's oracle is), and
    every copy on the critical path (as on-demand loading is)."""
    plan, k = model.plan, model.config.num_experts_per_tok
    copy_s = cal.copy_s(plan.expert_bytes)
    counted = int(w.counted.sum())
    contexts = w.contexts or [1]
    compute = sum(decode_step_compute_s(model, cal, c) for c in contexts) / len(contexts)
    rows = []
    for policy, by_capacity in loads.items():
        for slots in range(k, w.n_keys + 1):
            n = int(by_capacity[slots])
            transfer = n * copy_s / max(w.decode_tokens, 1)
            budget = plan.fixed_bytes + slots * plan.expert_bytes
            rows.append({"policy": policy, "slots": slots, "budget_bytes": budget,
                         "budget_pct": 100.0 * budget / model.full_model_bytes, "decode_loads": n,
                         "hit_rate": 1 - n / counted if counted else None,
                         "tpot_overlapped_s": max(transfer, compute), "tpot_serial_s": transfer + compute})
    return rows

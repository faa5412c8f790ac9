"""DuoServe-MoE's dual-phase schedule, and the single-policy strawman it argues against.

Prefill (many tokens; nearly every expert of a layer is hit): a sliding window of layers. When
layer l starts, the experts of layers l .. l+depth-1 are queued on the copy stream, nearest layer
first, so they load while the compute stream runs attention; when layer l is done its experts
are released, so at most ``prefetch_depth`` layers of experts are ever live. A released slot keeps
its bytes until a copy overwrites it, and this policy takes such experts back without a copy
(``reclaims_released``; see ``ExpertCache``): a budget wider than the window leaves decode warm.

Decode (one token, k experts per layer): after layer l's router, the predictor scores every
expert of layers l+1 .. l+depth; those above ``predictor_threshold`` and not resident are queued,
nearest layer and most likely first. With ``speculative_gate``, layer l+1's experts are guessed by
the next router applied to this layer's input instead; each guess is scored by how often a guess
of that rank at that layer turned out right so far (counted online over every token, prefill's
included), so the same threshold governs both kinds of guess and a gate that guesses badly on
some layer stops costing bandwidth there. Experts stay cached across tokens under the budget; the
victim is the expert least likely to be used at its layer's next visit: the predictor's or the
gate's score for the layers just ahead, else the share of recent decode tokens that used it at its
layer. A prefetch never evicts an expert that is more likely to be needed than the one it brings.

Why the reuse estimate is counted per token, not per layer visit: one decode token visits the
layers in a cycle, so a cache smaller than the token's working set thrashes under any rule whose
values drift with the position in that cycle (LRU keeps nothing at all). A score decayed when
its own layer runs is such a rule: layers behind the current one have decayed once more than
those ahead. Counts decayed for every layer at the same moment (the token's start) rank the same
expert the same wherever the current layer is, so the cache holds a stable set of the experts
most often reused, which is what saves copies. (Guesses also expire once their layer's router has
run; before both changes this cache kept 1.8 experts per token across tokens instead of 7, at
Mixtral-8x7B scale with 21 slots.)

``uniform`` uses the decode rule in both phases: the strawman of one policy for both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import CacheView, ExpertKey, Phase, Plan, Policy

# Reuse estimate of an expert with no prediction: the share of decode tokens that used it at its
# layer, counts decayed by this factor per token (half-life ~70 tokens: popularity shifts slowly).
_USAGE_DECAY = 0.99


class DuoServePolicy(Policy):
    name = "duoserve"
    uses = frozenset({"predictor", "prefetch_depth", "predictor_threshold", "speculative_gate"})
    reclaims_released = True   # the prefill window's released layers serve decode while their slots are intact
    uniform = False            # True: the decode rule in both phases (``UniformPolicy``)

    def __init__(self, predictor=None, prefetch_depth: int = 2, predictor_threshold: float = 0.5,
                 speculative_gate: bool = False):
        """Knobs as ``policy.knobs.PolicyKnobs`` checks them (build through ``make_policy``)."""
        self.predictor, self.depth, self.threshold = predictor, prefetch_depth, predictor_threshold
        # The speculative gate (next router on this layer's input) names layer l+1's experts; the
        # trained predictor still covers l+2 .. l+depth, where the gate cannot see.
        self.wants_speculation = speculative_gate

    def attach(self, cache: CacheView) -> None:
        super().attach(cache)
        L, E = cache.num_layers, cache.num_experts
        self.usage = torch.zeros(L, E)    # decayed count of decode tokens that used (layer, expert)
        self.tokens = 0.0                  # decayed count of decode tokens
        self.scores: dict[ExpertKey, float] = {}
        self.current_layer = 0
        self.prefill = True
        self.prev_experts: torch.Tensor | None = None   # [L, k] of the previous token, -1 unknown
        self.this_experts: torch.Tensor | None = None
        self.this_weights: torch.Tensor | None = None
        # Online precision of the speculative gate's guess of rank r for layer l: right / made,
        # from a Beta(1, 1) prior. ``pending`` holds each layer's latest guess until its router runs.
        self.gate_right: torch.Tensor | None = None  # [L, k], sized by the first guess
        self.gate_made: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}

    # -- events ------------------------------------------------------------------------------
    def phase(self, phase: Phase) -> Plan:
        self.prefill = Phase(phase) is Phase.PREFILL and not self.uniform
        if Phase(phase) is Phase.PREFILL:
            self.prev_experts = None
        self.scores.clear()
        return Plan()

    def layer_started(self, layer: int) -> Plan:
        self.current_layer = layer
        if not self.prefill:
            return Plan()
        last = min(self.cache.num_layers, layer + self.depth)
        return Plan(load=[(l, e) for l in range(layer, last) for e in range(self.cache.num_experts)])

    def router_done(self, layer: int, topk: torch.Tensor, probs: torch.Tensor) -> Plan:
        L, E = self.cache.num_layers, self.cache.num_experts
        guess = self.pending.pop(layer, None)
        if guess is not None and guess.shape[0] == topk.shape[0]:
            right = (guess[:, :, None] == topk[:, None, :]).any(dim=2).sum(dim=0)  # per rank
            self.gate_right[layer] += right.float()
            self.gate_made[layer] += guess.shape[0]
        if self.prefill or topk.shape[0] != 1:
            return Plan()
        # Layer ``layer``'s routing is known now: its guesses have served their purpose.
        self.scores = {key: p for key, p in self.scores.items() if key[0] > layer}
        if layer == 0:  # a new token: every layer's counts decay at the same moment (see the module doc)
            self.usage *= _USAGE_DECAY
            self.tokens = _USAGE_DECAY * self.tokens + 1
        self.usage[layer] += (torch.bincount(topk.flatten(), minlength=E) > 0).float()
        if self.predictor is None:
            return Plan()
        if layer == 0 or self.this_experts is None:
            self.this_experts = torch.full((L, topk.shape[1]), -1, dtype=torch.int64)
            self.this_weights = torch.zeros(L, topk.shape[1])
        weights = probs.gather(1, topk)
        self.this_experts[layer] = topk[0]
        self.this_weights[layer] = (weights / weights.sum(dim=1, keepdim=True))[0]
        if layer == L - 1:
            self.prev_experts = self.this_experts.clone()
            return Plan()
        prev = self.prev_experts if self.prev_experts is not None else torch.full_like(self.this_experts, -1)
        feats = self.predictor.features(layer, self.this_experts[None, :layer + 1],
                                        self.this_weights[None, :layer + 1], prev[None])
        predicted = self.predictor.predict(layer, feats)[0]  # [depth_at(layer), E]
        rows = predicted[:self.depth].tolist()  # one conversion: indexing a tensor per element costs ~1 us each
        fresh = {(layer + 1 + d, e): p for d, row in enumerate(rows) for e, p in enumerate(row)}
        self.scores.update(fresh)
        wanted = [(key, p) for key, p in fresh.items() if p >= self.threshold]
        wanted.sort(key=lambda kp: (kp[0][0], -kp[1]))
        return Plan(load=[key for key, _ in wanted])

    def speculated(self, layer: int, topk: torch.Tensor) -> Plan:
        if self.gate_right is None:
            self.gate_right = torch.ones(self.cache.num_layers, topk.shape[1])
            self.gate_made = torch.full((self.cache.num_layers, topk.shape[1]), 2.0)
        self.pending[layer] = topk
        if self.prefill or topk.shape[0] != 1:
            return Plan()
        precision = self.gate_right[layer] / self.gate_made[layer]
        wanted = []
        for rank, e in enumerate(topk[0].tolist()):
            p = float(precision[rank])
            self.scores[(layer, int(e))] = max(p, self.scores.get((layer, int(e)), 0.0))
            if p >= self.threshold:
                wanted.append((layer, int(e)))
        return Plan(load=wanted)

    def gate_precision(self) -> torch.Tensor | None:
        """``[layers, k]``: how often the gate's guess of each rank was right, per layer, so far."""
        return None if self.gate_right is None else self.gate_right / self.gate_made

    def layer_done(self, layer: int) -> Plan:
        if self.prefill:
            return Plan(release=[k for k in self.cache.resident() if k[0] == layer])
        return Plan()

    @property
    def prefill_window(self) -> int | None:
        return None if self.uniform else self.depth

    # -- eviction ----------------------------------------------------------------------------
    def _value(self, key: ExpertKey) -> float:
        """How much keeping ``key`` is worth: higher is more likely needed soon."""
        layer = key[0]
        if self.prefill:
            if layer < self.current_layer:
                return -1.0                                  # its layer is done
            return 1.0 / (1 + layer - self.current_layer)    # nearer layers first
        if key in self.scores:
            return self.scores[key]
        return float(self.usage[key]) / self.tokens if self.tokens else 0.0

    def eviction_order(self, candidates: Sequence[ExpertKey]) -> list[ExpertKey]:
        return sorted(candidates, key=lambda k: (self._value(k), self.cache.last_use(k)))

    def worth_replacing(self, victim: ExpertKey, incoming: ExpertKey) -> bool:
        return self._value(victim) < self._value(incoming)

    def describe(self) -> dict:
        return {"policy": self.name, "prefetch_depth": self.depth, "predictor_threshold": self.threshold,
                "predictor": None if self.predictor is None else "layer-mlp",
                "speculative_gate": self.wants_speculation}


class UniformPolicy(DuoServePolicy):
    """The strawman: DuoServe's decode rule in both phases (no prefill window)."""

    name = "uniform"
    uniform = True

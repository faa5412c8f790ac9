"""DuoServe-MoE's dual-phase schedule, and the single-policy strawman it argues against.

Prefill (many tokens; nearly every expert of a layer is hit): a sliding window of layers. When
layer l starts, the experts of layers l .. l+depth-1 are queued on the copy stream, nearest layer
first, so they load while the compute stream runs attention; when layer l is done its experts
are released, so at most ``prefetch_depth`` layers of experts are ever live. A released slot keeps
its bytes until a copy overwrites it, and this policy takes such experts back without a copy
(``reclaims_released``; see ``ExpertCache``): a budget wider than the window leaves decode warm.

Decode (one token, k experts per layer): after layer l's router, every source of guesses names
experts of layers l+1 .. l+depth: the trained predictor (if given), the speculative gate (layer
l+1's router on this layer's input, with ``speculative_gate``), the previous token's experts at
those layers, and each expert's measured popularity. No source is taken at its word: each is
scored online by how often its guesses turned out right (``SourceCalibration``: per depth and
score bin for the predictor, per layer and rank for the gate, per layer for the previous token;
popularity is a measured frequency already), so a guess's score is a calibrated probability of
use and the threshold keeps that meaning across sources. An expert's probability is the best of
its sources'.

What a prefetch is worth, in copies. In decode the router's device->host sync serialises the
layers: layer l+1's demand copies are issued only once layer l's have landed and its experts,
layer l+1's attention and the host's work in between have run. The copy stream idles for that
stretch, ``copy_slack`` copies long (a knob: about 1.2 on the H200, where a decode layer's host and
compute work takes ~2.2 ms and one NF4 expert's copy 1.8 ms). Prefetches fill it: the i-th
speculative copy of a layer step is hidden for the fraction h_i = clamp(slack - (i - 1), 0, 1) of
a copy. A right guess saves that much waiting later; a wrong one delays the next demand loads by
the rest, 1 - h_i; an eviction it forces costs the victim's value v. So a guess of probability p
is prefetched when p reaches the threshold and its expected gain is positive, p - (1 - h_i) - v > 0:
with slack 1 the first prefetch of a layer step needs p > v, a second never pays, and a demand
load never queues behind more than one speculative copy. On routing no source predicts, nothing
qualifies and the policy is a cache with a reuse-based eviction.

Experts stay cached across tokens under the budget. An expert's probability of use at its layer's
next visit is the best of its sources: a current guess, its share of recent tokens (popularity: the
prompt's tokens and the decode tokens), and, if the latest token used it there, the measured
probability that a token repeats its predecessor's experts at that layer (recency, the bet an LRU
cache makes, but weighed against popularity by its record). What keeping it is worth is less than
that probability: the copy stream idles for about ``copy_slack`` copies per decode layer anyway, so
a layer costs about max(slack, its misses) copies and a hit saves a full copy only when it is the
layer's first; a second cached expert of a layer is worth p (1 - slack), the first p. The victim
is the expert with the fewest expected saved copies per layer it would occupy until its layer's
next visit (``eviction_order``). Counting misses alone (Belady's rule on expectations, the first
version) kept two experts of some layers and none of others, and lost 2-6% to LRU at one token's
worth of slots, where LRU keeps exactly each layer's latest experts.

``uniform`` uses the decode rule in both phases: the strawman of one policy for both.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .base import CacheView, ExpertKey, LayerVisits, Phase, Plan, Policy

# Reuse estimate of an expert with no prediction: the share of tokens that used it at its layer,
# counts decayed by this factor per token (half-life ~70 tokens: popularity shifts slowly), starting
# from this many tokens of uniform routing, so that a share needs evidence before it tells experts
# apart (with a few dozen tokens, noise alone made some experts look twice as popular as others).
_USAGE_DECAY = 0.99
_PRIOR_TOKENS = 32.0
_BINS = 10  # score bins of the predictor's calibration


def _score_bins(scores: torch.Tensor) -> torch.Tensor:
    """The calibration bin of each of the predictor's scores."""
    return (scores * _BINS).long().clamp_(0, _BINS - 1)


class SourceCalibration:
    """How often a guess source's guesses are right, per cell (a layer, a rank, a score bin...).

    Each cell starts from a Beta prior of ``prior_weight`` pseudo-guesses at the source's own claim
    (``prior``), so a source is believed until its record says otherwise, and a record of a few
    dozen guesses outweighs the claim. Counts are plain floats in row-major order: decode reads and
    records one cell at a time, where a tensor op per cell cost more than the rest of the policy.
    """

    def __init__(self, shape: tuple[int, ...], prior: torch.Tensor | float, prior_weight: float = 4.0):
        self.shape = shape
        claims = torch.as_tensor(prior, dtype=torch.float64).expand(shape).flatten().tolist()
        self.right = [c * prior_weight for c in claims]
        self.made = [prior_weight] * len(claims)

    def p(self, cell: int) -> float:
        """The probability of cell ``cell`` (its row-major index)."""
        return self.right[cell] / self.made[cell]

    def probability(self) -> torch.Tensor:
        return (torch.tensor(self.right) / torch.tensor(self.made)).view(self.shape)

    def record_one(self, cell: int, right: bool) -> None:
        self.right[cell] += right
        self.made[cell] += 1

    def record(self, cells: tuple, right: torch.Tensor) -> None:
        """``right``: 1.0 per guess that came true, 0.0 otherwise, at ``cells`` (an index into the shape)."""
        flat = torch.zeros_like(cells[0])
        for index, size in zip(cells, self.shape):
            flat = flat * size + index
        n = len(self.made)
        hits = torch.bincount(flat.flatten(), weights=right.flatten().double(), minlength=n).tolist()
        made = torch.bincount(flat.flatten(), minlength=n).tolist()
        self.right = [r + h for r, h in zip(self.right, hits)]
        self.made = [m + c for m, c in zip(self.made, made)]


class DuoServePolicy(Policy):
    name = "duoserve"
    uses = frozenset({"predictor", "prefetch_depth", "predictor_threshold", "speculative_gate", "copy_slack"})
    reclaims_released = True   # the prefill window's released layers serve decode while their slots are intact
    uniform = False            # True: the decode rule in both phases (``UniformPolicy``)

    def __init__(self, predictor=None, prefetch_depth: int = 2, predictor_threshold: float = 0.5,
                 speculative_gate: bool = False, copy_slack: float = 1.0):
        """Knobs as ``policy.knobs.PolicyKnobs`` checks them (build through ``make_policy``)."""
        self.predictor, self.depth, self.threshold = predictor, prefetch_depth, predictor_threshold
        self.slack = copy_slack
        self.hidden: dict[ExpertKey, float] = {}  # this layer step's prefetches: the hidden share of each copy
        # The speculative gate (next router on this layer's input) names layer l+1's experts; the
        # trained predictor still covers l+2 .. l+depth, where the gate cannot see.
        self.wants_speculation = speculative_gate

    def attach(self, cache: CacheView) -> None:
        super().attach(cache)
        L, E = cache.num_layers, cache.num_experts
        # Decode's state is plain Python: a decode layer step reads and writes a handful of numbers, and
        # torch's per-op cost (~5-10 us) on tiny tensors made this policy the largest host cost of a token.
        self.usage = [[0.0] * E for _ in range(L)]  # decayed count of tokens that used (layer, expert)
        self.tokens = 0.0                             # decayed count of tokens
        self.top_k = 0                                # known from the first routing
        self.batch = 1                                # requests in this decode step (``_batch_router_done``)
        self._values_now: dict[ExpertKey, float] | None = None  # this layer step's values, see _savings
        self.prompt_routing: list[tuple[torch.Tensor, torch.Tensor]] = []  # this prompt's, per layer so far
        self.scores: dict[ExpertKey, float] = {}
        self.current_layer = 0
        self.prefill = self.in_prompt = True
        self.prev_ids: list[list[int]] | None = None   # the previous token's experts per layer (decode)
        self.this_ids: list[list[int]] = []             # this token's, filled layer by layer
        self.this_weights: list[list[float]] = []       # its normalised router weights (the predictor's input)
        # Each source's record (sized by the first top-k seen): the gate per (layer, rank), the previous
        # token per layer, the predictor per (depth, score bin) with its own scores as the prior.
        self.gate: SourceCalibration | None = None
        self.repeat = SourceCalibration((L,), 1.0 / E)
        bins = torch.arange(_BINS, dtype=torch.float32)
        self.predicted = SourceCalibration((self.depth, _BINS), (bins + 0.5) / _BINS)
        # Guesses awaiting their layer's router: the gate's top-k (a tensor for a prompt, a list for a
        # decode token), the predictor's score bins [E] per depth index.
        self.pending: dict[int, torch.Tensor | list[int]] = {}
        self.pending_predicted: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.held: list[tuple[ExpertKey, float]] = []   # router_done's guesses, merged with the gate's
        # Recency as a source: the experts the latest decode token used at each layer come back with the
        # previous-token source's measured probability at that layer (an LRU cache's bet, calibrated).
        self.latest: list[set[int]] = [set() for _ in range(L)]
        self.visits = LayerVisits()  # decode layer visits: the tie-break among equally distant experts

    # -- events ------------------------------------------------------------------------------
    def phase(self, phase: Phase) -> Plan:
        self.in_prompt = Phase(phase) is Phase.PREFILL
        self.prefill = self.in_prompt and not self.uniform  # whether the prefill rule applies
        if self.in_prompt:
            self.prev_ids = None
        self.scores.clear()
        self.pending_predicted.clear()
        self._values_now = None
        return Plan()

    def layer_started(self, layer: int) -> Plan:
        self.current_layer = layer
        if not self.prefill:
            return Plan()
        last = min(self.cache.num_layers, layer + self.depth)
        return Plan(load=[(l, e) for l in range(layer, last) for e in range(self.cache.num_experts)])

    def router_done(self, layer: int, topk: torch.Tensor, probs: torch.Tensor) -> Plan:
        self.top_k = topk.shape[1]
        self._values_now = None
        self.batch = 1 if self.in_prompt else topk.shape[0]
        if self.batch > 1:
            return self._batch_router_done(layer, topk)
        if topk.shape[0] > 1:
            self._score_prompt_guesses(layer, topk)
            if self.in_prompt:
                self._count_prompt(layer, topk)
                self._score_predictor_on_prompt(layer, topk, probs)
            return Plan()
        ids = topk[0].tolist()
        self._score_guesses(layer, ids)
        if self.prefill:
            return Plan()
        L = self.cache.num_layers
        # Layer ``layer``'s routing is known now: its guesses have served their purpose.
        self.scores = {key: p for key, p in self.scores.items() if key[0] > layer}
        if layer == 0:  # a new token: every layer's counts decay at the same moment (see the module doc)
            self._age_usage(1)
            self.this_ids = [[-1] * len(ids) for _ in range(L)]
            self.this_weights = [[0.0] * len(ids) for _ in range(L)]
        used = self.latest[layer] = set(ids)
        for e in used:
            self.usage[layer][e] += 1.0
        self.visits.record(layer, used)
        self.this_ids[layer] = ids
        if self.predictor is not None:
            weights = probs[0, ids].tolist()
            total = sum(weights)
            self.this_weights[layer] = [w / total for w in weights]
        if layer == L - 1:
            self.prev_ids = self.this_ids
            return Plan()
        guesses = self._popularity_and_repeat(layer) + self._predicted(layer)
        if self.wants_speculation:  # the gate's guess for layer+1 comes next: one plan for both
            self.held = guesses
            return Plan()
        return self._plan(guesses)

    def _batch_router_done(self, layer: int, topk: torch.Tensor) -> Plan:
        """A decode step of B requests (continuous batching): the step's rows are different requests, in an
        order that changes as requests join and leave, so the per-token sources (the previous token, the
        trained predictor, which read one request's history) sit out; popularity stays, as the chance
        that at least one of the B tokens uses an expert: 1 - (1 - share)^B (tokens taken as
        independent draws). The gate's guesses are per row and are scored as a prompt's are. At batch
        16 and more that chance nears 1 for most experts, and the rule becomes the prefill window's:
        load the next layers whole."""
        self._score_gate_rows(layer, topk)
        self.prev_ids = None  # the next lone token has no predecessor on record
        self.scores = {key: p for key, p in self.scores.items() if key[0] > layer}
        if layer == 0:
            self._age_usage(topk.shape[0])
        used = topk.flatten().tolist()
        for e in used:
            self.usage[layer][e] += 1.0
        self.latest[layer] = set(used)
        self.visits.record(layer, self.latest[layer])
        if layer == self.cache.num_layers - 1:
            return Plan()
        last = min(self.cache.num_layers, layer + 1 + self.depth)
        guesses = [((target, e), self._union(self._share(target, e))) for target in range(layer + 1, last)
                   for e in range(self.cache.num_experts)]
        if self.wants_speculation:
            self.held = guesses
            return Plan()
        return self._plan(guesses)

    def _union(self, p: float) -> float:
        """The chance that at least one of this step's tokens does what one does with chance ``p``."""
        return 1.0 - (1.0 - p) ** self.batch

    def _age_usage(self, new_tokens: int) -> None:
        """A step starts: every count decays once, and ``new_tokens`` more tokens are on record."""
        self.usage = [[u * _USAGE_DECAY for u in row] for row in self.usage]
        self.tokens = _USAGE_DECAY * self.tokens + new_tokens

    def _count_prompt(self, layer: int, topk: torch.Tensor) -> None:
        """A prompt's tokens join the popularity record: hundreds of tokens of the request's own routing
        where decode has seen none yet (a prompt ages the record like one decode token)."""
        if layer == 0:
            self._age_usage(topk.shape[0])
        counts = torch.bincount(topk.flatten(), minlength=self.cache.num_experts).tolist()
        self.usage[layer] = [u + c for u, c in zip(self.usage[layer], counts)]

    def _score_predictor_on_prompt(self, layer: int, topk: torch.Tensor, probs: torch.Tensor) -> None:
        """Once the prompt's routing is known at every layer, the predictor's guesses for the prompt's
        tokens are scored against it: by the first decode token its calibration rests on thousands of
        guesses, so a predictor trained on other routing is not trusted for a single prefetch."""
        if self.predictor is None:
            return
        if layer == 0:
            self.prompt_routing = []
        weights = probs.gather(1, topk)
        self.prompt_routing.append((topk, weights / weights.sum(dim=1, keepdim=True)))
        L = self.cache.num_layers
        if layer < L - 1 or len(self.prompt_routing) != L:
            return
        experts = torch.stack([t for t, _ in self.prompt_routing], 1)   # [tokens, L, k]
        weights = torch.stack([w for _, w in self.prompt_routing], 1)
        prev = torch.cat([torch.full_like(experts[:1], -1), experts[:-1]])  # each token's predecessor
        self.prompt_routing = []
        E = self.cache.num_experts
        for source in range(L - 1):
            feats = self.predictor.features(source, experts[:, :source + 1], weights[:, :source + 1], prev)
            rows = self.predictor.predict(source, feats)[:, :self.depth]  # [tokens, depth_at, E]
            for d in range(rows.shape[1]):
                used = torch.zeros(rows.shape[0], E, dtype=torch.bool)
                used.scatter_(1, experts[:, source + 1 + d], True)
                self._record_predicted(d, _score_bins(rows[:, d]), used)

    def _share(self, layer: int, expert: int) -> float:
        """The expert's share of the tokens that used its layer, shrunk towards uniform routing."""
        prior = _PRIOR_TOKENS * self.top_k / self.cache.num_experts
        return (self.usage[layer][expert] + prior) / (self.tokens + _PRIOR_TOKENS)

    def speculated(self, layer: int, topk: torch.Tensor) -> Plan:
        self._values_now = None
        k = topk.shape[1]
        if self.gate is None:
            self.gate = SourceCalibration((self.cache.num_layers, k), 0.5)
        if self.prefill or (self.in_prompt and topk.shape[0] != 1):
            self.pending[layer] = topk
            return Plan()
        if topk.shape[0] > 1:  # a decode batch: an expert is used if any row's guess of it is right
            self.pending[layer] = topk
            miss: dict[int, float] = {}
            for rank, column in enumerate(topk.t().tolist()):
                for e in column:
                    miss[e] = miss.get(e, 1.0) * (1.0 - self.gate.p(layer * k + rank))
            held, self.held = self.held, []
            return self._plan(held + [((layer, e), 1.0 - m) for e, m in miss.items()])
        ids = self.pending[layer] = topk[0].tolist()
        guesses = [((layer, e), self.gate.p(layer * k + rank)) for rank, e in enumerate(ids)]
        held, self.held = self.held, []
        return self._plan(held + guesses)

    def gate_precision(self) -> torch.Tensor | None:
        """``[layers, k]``: how often the gate's guess of each rank was right, per layer, so far."""
        return None if self.gate is None else self.gate.probability()

    def layer_done(self, layer: int) -> Plan:
        if self.prefill:
            return Plan(release=[k for k in self.cache.resident() if k[0] == layer])
        return Plan()

    # -- guesses -----------------------------------------------------------------------------
    def _score_prompt_guesses(self, layer: int, topk: torch.Tensor) -> None:
        """The gate's guesses for a prompt's tokens at ``layer``, and how often consecutive prompt tokens
        repeat their predecessor's experts there (the previous-token source's record)."""
        self._score_gate_rows(layer, topk)
        right = (topk[:-1, :, None] == topk[1:, None, :]).any(dim=2).flatten()
        self.repeat.record((torch.full_like(right, layer, dtype=torch.int64),), right)

    def _score_gate_rows(self, layer: int, topk: torch.Tensor) -> None:
        """The gate's guesses for several tokens at ``layer`` (row by row) against their experts there."""
        guess = self.pending.pop(layer, None)
        if isinstance(guess, torch.Tensor) and guess.shape[0] == topk.shape[0] and self.gate is not None:
            right = (guess[:, :, None] == topk[:, None, :]).any(dim=2)  # [tokens, rank]
            ranks = torch.arange(right.shape[1]).expand_as(right)
            self.gate.record((torch.full_like(ranks, layer), ranks), right)

    def _score_guesses(self, layer: int, ids: list[int]) -> None:
        """Every source's earlier guesses for ``layer`` against a decode token's experts there."""
        guess = self.pending.pop(layer, None)
        if isinstance(guess, list) and self.gate is not None:
            k = len(guess)
            for rank, e in enumerate(guess):
                self.gate.record_one(layer * k + rank, e in ids)
        if self.prev_ids is not None and self.prev_ids[layer][0] >= 0:
            for e in self.prev_ids[layer]:
                self.repeat.record_one(layer, e in ids)
        predicted = self.pending_predicted.pop(layer, [])
        if predicted:
            used = torch.zeros(self.cache.num_experts, dtype=torch.bool)
            used[ids] = True
            for d, bins in predicted:
                self._record_predicted(d, bins, used)

    def _record_predicted(self, d: int, bins: torch.Tensor, used: torch.Tensor) -> None:
        """The predictor's guesses ``d`` layers ahead, by score bin, against which experts were ``used``."""
        self.predicted.record((torch.full_like(bins, d), bins), used)

    def _popularity_and_repeat(self, layer: int) -> list[tuple[ExpertKey, float]]:
        """The previous token's experts and each expert's frequency, for layers layer+1..+depth."""
        out = []
        last = min(self.cache.num_layers, layer + 1 + self.depth)
        for target in range(layer + 1, last):
            if self.tokens:
                out += [((target, e), p) for e in range(self.cache.num_experts)
                        if (p := self._share(target, e)) >= self.threshold]
            if self.prev_ids is not None:
                p = self.repeat.p(target)
                out += [((target, e), p) for e in self.prev_ids[target] if e >= 0]
        return out

    def _predicted(self, layer: int) -> list[tuple[ExpertKey, float]]:
        """The trained predictor's guesses for layers layer+1..+depth, calibrated by its record."""
        if self.predictor is None:
            return []
        k = len(self.this_ids[layer])
        prev = torch.tensor(self.prev_ids) if self.prev_ids is not None else torch.full((self.cache.num_layers, k), -1)
        feats = self.predictor.features(layer, torch.tensor(self.this_ids[:layer + 1])[None],
                                        torch.tensor(self.this_weights[:layer + 1])[None], prev[None])
        rows = self.predictor.predict(layer, feats)[0][:self.depth]  # [depth_at(layer), E]; row 0 is layer+1
        out = []
        for d, row in enumerate(rows):
            bins = _score_bins(row)
            self.pending_predicted.setdefault(layer + 1 + d, []).append((d, bins))
            out += [((layer + 1 + d, e), self.predicted.p(d * _BINS + b)) for e, b in enumerate(bins.tolist())]
        return out

    def _plan(self, guesses: list[tuple[ExpertKey, float]]) -> Plan:
        """The best probability per expert becomes its score; those at the threshold, not resident and
        worth their copy at their place in the layer step's queue are loaded, nearest layer then most
        likely first (the victim's value is weighed when a slot must be freed: ``worth_replacing``)."""
        best: dict[ExpertKey, float] = {}
        for key, p in guesses:
            if p > best.get(key, -1.0):
                best[key] = p
        for key, p in best.items():
            self.scores[key] = max(p, self.scores.get(key, 0.0))
        wanted = sorted(((k, p) for k, p in best.items() if p >= self.threshold and not self.cache.is_resident(k)),
                        key=lambda kp: (kp[0][0], -kp[1]))
        self.hidden = {}
        for key, p in wanted:
            hidden = min(1.0, max(0.0, self.slack - len(self.hidden)))
            if p - (1.0 - hidden) > 0:
                self.hidden[key] = hidden
        return Plan(load=list(self.hidden))

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
        share = self._union(self._share(layer, key[1])) if self.tokens else 0.0
        recent = self.repeat.p(layer) if key[1] in self.latest[layer] else 0.0
        return max(self.scores.get(key, 0.0), share, recent)  # the best of its sources

    def eviction_order(self, candidates: Sequence[ExpertKey]) -> list[ExpertKey]:
        """Prefill: least valuable first. Decode: the fewest expected saved copies per layer of occupancy
        first. An expert of value p whose layer comes d layers from now saves, at that visit, a copy if
        it is used and no other cached expert of its layer is (else only 1 - slack of one: see the
        module doc), and holds its slot for d layers until then: rank by that saving over d. Where no
        source tells experts apart (random routing) this evicts the experts of the layer just visited
        beyond its latest token's, as LRU does."""
        if self.prefill:
            return sorted(candidates, key=lambda k: (self._value(k), self.cache.last_use(k)))
        L, now = self.cache.num_layers, self.current_layer
        saving = self._savings()
        return sorted(candidates, key=lambda k: (saving(k) / ((k[0] - now - 1) % L + 1), self.visits.last(k),
                                                 self.cache.last_use(k)))

    def _savings(self) -> Callable[[ExpertKey], float]:
        """The copies an expert is expected to save at its layer's next visit if it is resident then: its
        value p, reduced by the slack when another cached expert of its layer is used too (independence
        assumed between them), against what is resident now. Values are kept for the layer step (they
        change only with the next router); which experts share a layer is read afresh each time."""
        if self._values_now is None:
            self._values_now = {}
        values = self._values_now

        def value(k: ExpertKey) -> float:
            if k not in values:
                values[k] = min(self._value(k), 0.999)
            return values[k]

        overlap = min(1.0, self.slack)
        resident = self.cache.resident()
        none_used: dict[int, float] = {}  # per layer: P(no cached expert of it is used)
        for k in resident:
            none_used[k[0]] = none_used.get(k[0], 1.0) * (1.0 - value(k))

        def saving(k: ExpertKey) -> float:
            p = value(k)
            others_unused = none_used.get(k[0], 1.0) / (1.0 - p) if k in resident else none_used.get(k[0], 1.0)
            return p * (1.0 - overlap * (1.0 - others_unused))
        return saving

    def worth_replacing(self, victim: ExpertKey, incoming: ExpertKey) -> bool:
        """In decode, a guess hidden for the fraction h of its copy (see the module doc) is worth evicting
        the victim when the copies it is expected to save, less the unhidden part of its own copy, exceed
        the victim's: s(incoming) - (1 - h) > s(victim)."""
        if self.prefill:
            return self._value(victim) < self._value(incoming)
        saving = self._savings()
        return saving(incoming) - (1.0 - self.hidden.get(incoming, 0.0)) > saving(victim)

    def describe(self) -> dict:
        return {"policy": self.name, "prefetch_depth": self.depth, "predictor_threshold": self.threshold,
                "copy_slack": self.slack,
                "predictor": None if self.predictor is None else "layer-mlp",
                "speculative_gate": self.wants_speculation}


class UniformPolicy(DuoServePolicy):
    """The strawman: DuoServe's decode rule in both phases (no prefill window)."""

    name = "uniform"
    uniform = True

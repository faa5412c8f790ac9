"""Synthetic routing traces with chosen statistics, and the statistics that check them.

A recorded trace holds one model's routing. The simulator and the predictor also need routing of
a chosen predictability: none at all (the floor every prefetcher must beat), Mixtral-8x7B's (what
the lab serves), the bundled model's (far more predictable). ``synthesize`` draws such traces from
a per-layer Markov model with three knobs; the functions below measure what came out, and a knob
value is trusted only once its statistic has been measured back (``measure``, which the CLI prints
for every trace it writes and the tests hold to the presets' targets).

Statistics. All are over decode tokens (what decode-phase prefetch and caching serve). A *pair* is
a decode token t and the token t-1 just before it in the same request (for the first decode token,
the last prompt token). S(t, l) is token t's top-k list at layer l (``S(t, l)[0]`` its first
choice), k = top_k, E = num_experts, L = num_layers.

    popularity_skew[l]          Gini coefficient of the experts' shares of layer l's assignments:
                                0 = uniform, (E-1)/E = one expert takes all. Not the top-k share,
                                because that is popularity_recall_at_k again and ignores the tail;
                                not an entropy deficit, because Gini is linear in the shares: the
                                bundled model's mild imbalance (busiest expert 15-19%, idlest 7-10%)
                                reads 0.08-0.17 where 1 - H / log E reads 0.005-0.02.
    first_expert_repeat[l]      P(S(t, l)[0] == S(t-1, l)[0]) over pairs: the Mixtral paper's Table 5
                                figure (uniform random routing: 1/E).
    layer_affinity[l], l < L-1  recall@k at layer l+1 of the affinity guess: score each expert e' by
                                the sum over e in S(t, l) of P(e' in S(t, l+1) | e in S(t, l)) and
                                take the k best (ties to the lower id). This is the predictor's
                                ``affinity`` baseline with its frequencies fitted on the tokens it is
                                measured on: optimistic by about 2 points at 4,096 tokens (the
                                random preset reads 0.27 where nothing beats 0.25), under 1 point on
                                the bundled trace's 12,600. Recall@k rather than mutual
                                information because it says what a k-expert prefetch would hit;
                                read it against popularity_recall_at_k, the no-affinity level.
    previous_token_recall_at_k  mean over pairs and layers of |S(t-1, l) ∩ S(t, l)| / k: prefetch
                                the previous token's k experts (k guesses: equal bytes).
    popularity_recall_at_k      mean over layers of the share of layer l's assignments taken by its
                                k most used experts: prefetch the k most popular (uniform: k/E).
    speculative_gate_precision  traces with ``spec_experts`` only: mean over decode tokens and layers
                                l < L-1 of |spec(t, l) ∩ S(t, l+1)| / k.

Generator. Each token (prompt tokens first, then decode tokens) fills its k ranks at layer l in
order; rank j takes

    with probability repeat[l]:          one of the previous token's experts at layer l, drawn in
                                         proportion to its router weight;
    else with probability affinity[l]:   the successor of this token's rank-j expert at layer l-1
                                         under a fixed random permutation of the experts (one per
                                         layer);
    otherwise:                           a draw from layer l's popularity, Zipf-like:
                                         p ∝ (i + 1) ** -skew over a fixed random order of the
                                         experts (one per layer; skew 0 is uniform).

A source that does not exist (a request's first token, layer 0) passes to the next one, and no
expert is taken twice (a copy draws among the previous token's experts this token has not taken; a
successor already taken falls through to popularity), so the k experts are distinct. Prompt tokens
are drawn the same way; only the statistics leave them out.

The copy is by weight rather than rank to rank because real routing keeps experts across ranks: on
the bundled model's held-out trace a token's first choice is the previous token's second 17% of the
time and its second choice the previous first 18%, as often as second follows second (18%).
Copying rank to rank, tuned to the same first-expert repeats, gives 10%, 10% and 26% there and a
previous-token recall of 0.37 against the trace's 0.40 (copying by weight: 15%, 21%, 20% and
0.42). The affinity kernel is a permutation (one successor per expert) so that its strength alone
sets how predictable layer l+1 is from layer l: not at all at 0, fully at 1 (with repeat 0).
``repeat`` and ``affinity`` take one number or a per-layer profile (``layer_profile``). Weights: a
flat Dirichlet draw sorted descending, as a router's renormalised top-k is; the bundled model's mean
first-choice weight is 0.750, the flat Dirichlet's 0.75. With ``gate_precision`` g,
``spec_experts`` at layer l < L-1 holds layer l+1's rank-r expert with probability g and otherwise
an expert outside layer l+1's top-k (each guess distinct), as a speculative gate of precision g
would.

    python -m duoserve_core.traces synth --preset mixtral-like --out T.parquet [--json]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import Trace, TraceError, TraceMeta

Profile = float | Sequence[float]

# Presets: every argument of ``synthesize`` but the prompt length and the gate. Tuned with ``measure``
# at these sizes (seeds 0-2 agree within about 2 points); data/README.md lists what they measure.
_SIZE = {"tokens": 64, "requests": 64, "seed": 0}
PRESETS: dict[str, dict] = {
    # no structure: the floor (first-expert repeats 1/E, recalls k/E)
    "random": {"layers": 32, "experts": 8, "top_k": 2, **_SIZE, "repeat": 0.0, "affinity": 0.0, "skew": 0.0},
    # a real Mixtral-8x7B-Instruct decode trace: first-expert repeats about 12% at layer 0, 31% at the
    # middle layer and 21% at the last, previous-token recall@2 about 0.35, popularity recall@2 about
    # 0.26. Its layer affinity was not measured: 0.2 is a moderate guess, not a target.
    "mixtral-like": {"layers": 32, "experts": 8, "top_k": 2, **_SIZE,
                     "repeat": (0.0, 0.1, 0.31, 0.12, 0.12), "affinity": 0.2, "skew": 0.05},
    # the bundled model's held-out routing (data/traces/small-moe-heldout.parquet), layer by layer
    "bundled-like": {"layers": 8, "experts": 8, "top_k": 2, **_SIZE,
                     "repeat": (0.0, 0.15, 0.14, 0.3, 0.3, 0.35, 0.2, 0.15), "affinity": 0.47, "skew": 0.47},
}


def preset_arguments(preset: str, **overrides) -> dict:
    """``synthesize``'s arguments: the preset's, then every override that is not None."""
    if preset not in PRESETS:
        raise TraceError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}


def layer_profile(value: Profile, layers: int, name: str) -> np.ndarray:
    """A knob per layer, each in [0, 1]: one number for every layer, or values at evenly spaced
    depths from the first layer to the last, linearly interpolated (a list of ``layers`` values is
    taken as is), so that one preset serves models of any depth."""
    try:
        values = np.atleast_1d(np.asarray(value, dtype=float))
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if values.ndim != 1 or not len(values) or not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise TraceError(f"{name} must be a probability in [0, 1] (one number, or one per depth such as "
                         f"0.1,0.3,0.2), got {value!r}")
    if len(values) == 1:
        return np.full(layers, values[0])
    return np.interp(np.linspace(0, 1, layers), np.linspace(0, 1, len(values)), values)


def _check_arguments(layers: int, experts: int, top_k: int, tokens: int, requests: int, prompt_len: int,
                     skew: float, seed: int, gate_precision: float | None) -> None:
    for name, value, least in (("--layers", layers, 1), ("--experts", experts, 1), ("--top-k", top_k, 1),
                               ("--tokens", tokens, 1), ("--requests", requests, 1), ("--prompt-len", prompt_len, 0),
                               ("--seed", seed, 0)):
        if value < least:
            raise TraceError(f"{name} must be at least {least}, got {value}")
    if top_k > experts:
        raise TraceError(f"--top-k {top_k} exceeds --experts {experts}: a token routes to k distinct experts; "
                         f"lower --top-k to at most {experts} or raise --experts")
    if not (np.isfinite(skew) and skew >= 0):
        raise TraceError(f"--skew must be a number >= 0 (0 = uniform popularity), got {skew}")
    if gate_precision is not None:
        if not 0 <= gate_precision <= 1:
            raise TraceError(f"--gate-precision must be in [0, 1], got {gate_precision}")
        if layers < 2:
            raise TraceError("--gate-precision needs --layers at least 2: the gate guesses the next layer's experts")
        if experts < 2 * top_k:
            raise TraceError(f"--gate-precision needs --experts at least 2 x --top-k = {2 * top_k} (a wrong guess for "
                             f"every rank), got {experts}; raise --experts or leave the gate out")


def synthesize(layers: int, experts: int, top_k: int, tokens: int, requests: int, repeat: Profile,
               affinity: Profile, skew: float, seed: int, prompt_len: int = 0,
               gate_precision: float | None = None) -> tuple[pd.DataFrame, TraceMeta]:
    """Trace rows (``requests`` x (``prompt_len`` prefill + ``tokens`` decode) tokens x ``layers``)
    drawn from the model in the module docstring; the same ``seed`` gives the same trace."""
    _check_arguments(layers, experts, top_k, tokens, requests, prompt_len, skew, seed, gate_precision)
    rep, aff = layer_profile(repeat, layers, "--repeat"), layer_profile(affinity, layers, "--affinity")
    rng = np.random.default_rng(seed)
    order = rng.permuted(np.tile(np.arange(experts), (layers, 1)), axis=1)  # [l, i]: layer l's i-th most popular
    popularity = np.empty((layers, experts))
    np.put_along_axis(popularity, order, (np.arange(experts)[None] + 1.0) ** -skew, axis=1)
    log_pop = np.log(popularity / popularity.sum(1, keepdims=True))
    successor = rng.permuted(np.tile(np.arange(experts), (layers, 1)), axis=1)  # row 0 unused
    T = prompt_len + tokens
    weights = -np.sort(-rng.dirichlet(np.ones(top_k), size=(requests, T, layers)), axis=-1)
    ids = _route(weights, rep, aff, log_pop, successor, rng)

    token_index = np.tile(np.repeat(np.arange(T), layers), requests)
    columns = {"request_id": np.repeat(np.arange(requests), T * layers), "token_index": token_index,
               "phase": np.where(token_index < prompt_len, "prefill", "decode"),
               "layer": np.tile(np.arange(layers), requests * T), "experts": ids.reshape(-1, top_k).tolist(),
               "weights": weights.reshape(-1, top_k).tolist()}
    if gate_precision is not None:
        spec = _speculate(ids, gate_precision, experts, rng)
        columns["spec_experts"] = [None if r[0] < 0 else r for r in spec.reshape(-1, top_k).tolist()]
    model = f"synthetic: repeat {_describe(rep)}, affinity {_describe(aff)}, skew {skew:g}, seed {seed}"
    return pd.DataFrame(columns), TraceMeta(model, layers, experts, top_k)


def _route(weights: np.ndarray, repeat: np.ndarray, affinity: np.ndarray, log_pop: np.ndarray,
           successor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Expert ids ``[requests, tokens, layers, k]`` drawn rank by rank as the module docstring says,
    every request at once; ``weights`` (same shape) are the router weights a copy draws by."""
    R, T, L, k = weights.shape
    E = log_pop.shape[1]
    rows = np.arange(R)
    ids = np.empty((R, T, L, k), dtype=np.int64)
    for t in range(T):
        for l in range(L):
            taken = np.zeros((R, E), dtype=bool)
            u = rng.random((2, R, k))
            for j in range(k):
                pick = np.full(R, -1)
                if t > 0:  # j < k experts are taken, so one of the previous token's k is still free
                    free = np.where(taken[rows[:, None], ids[:, t - 1, l]], 0.0, weights[:, t - 1, l])
                    with np.errstate(divide="ignore"):  # log 0 = -inf: a taken expert is never drawn
                        rank = (np.log(free) + rng.gumbel(size=(R, k))).argmax(1)  # by weight (Gumbel-max)
                    pick = np.where(u[0, :, j] < repeat[l], ids[rows, t - 1, l, rank], pick)
                if l > 0:
                    follow = (pick < 0) & (u[1, :, j] < affinity[l])
                    pick = np.where(follow, successor[l, ids[:, t, l - 1, j]], pick)
                fall = (pick < 0) | taken[rows, np.maximum(pick, 0)]
                scores = np.where(taken, -np.inf, log_pop[l] + rng.gumbel(size=(R, E)))
                pick = np.where(fall, scores.argmax(1), pick)
                ids[:, t, l, j] = pick
                taken[rows, pick] = True
    return ids


def _speculate(ids: np.ndarray, precision: float, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """``spec[..., l, r]``: ``ids[..., l+1, r]`` with probability ``precision``, else an expert outside
    layer l+1's top-k (and unused by this guess); ``-1`` at the last layer."""
    truth = ids[:, :, 1:]
    k = truth.shape[-1]
    outside = np.zeros(truth.shape[:-1] + (num_experts,), dtype=bool)
    np.put_along_axis(outside, truth, True, axis=-1)  # marks the excluded: the truth, then wrong guesses
    spec = np.empty_like(truth)
    for r in range(k):
        wrong = np.where(outside, -np.inf, rng.random(outside.shape)).argmax(-1)
        spec[..., r] = np.where(rng.random(truth.shape[:-1]) < precision, truth[..., r], wrong)
        np.put_along_axis(outside, spec[..., r, None], True, axis=-1)
    return np.concatenate([spec, np.full_like(ids[:, :, :1], -1)], axis=2)


def _describe(profile: np.ndarray) -> str:
    """A knob as the trace's model name gives it: its value, or its range over the layers."""
    lo, hi = profile.min(), profile.max()
    return f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f}"


# --- statistics --------------------------------------------------------------------------------

def _decode(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into ``trace.expert_array()``: the decode tokens, and each one's previous token in
    its request (``-1`` where it has none)."""
    tokens = trace.tokens()
    decode = np.flatnonzero(tokens["phase"].to_numpy() == "decode")
    if not len(decode):
        raise TraceError(f"trace of {trace.meta.model} has no decode tokens; the routing statistics are over "
                         "decode tokens (record or synthesize with generated tokens)")
    request = tokens["request_id"].to_numpy()
    has_prev = (decode > 0) & (request[np.maximum(decode - 1, 0)] == request[decode])
    return decode, np.where(has_prev, decode - 1, -1)


def _pairs(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Expert ids ``[pairs, L, k]`` of each pair's earlier token and of its decode token."""
    decode, prev = _decode(trace)
    ids = trace.expert_array()
    keep = prev >= 0
    if not keep.any():
        raise TraceError(f"trace of {trace.meta.model} has no decode token with a previous token in its request")
    return ids[prev[keep]], ids[decode[keep]]


def _counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` how often each expert is in a token's top-k, per layer."""
    L = ids.shape[1]
    flat = (np.arange(L)[None, :, None] * num_experts + ids).ravel()
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores along the last axis, ties to the lower index."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def popularity_skew(trace: Trace) -> np.ndarray:
    """``[L]`` Gini coefficient of the experts' shares of each layer's assignments (decode tokens)."""
    decode, _ = _decode(trace)
    E = trace.meta.num_experts
    shares = np.sort(_counts(trace.expert_array()[decode], E), axis=1).astype(float)
    rank = np.arange(1, E + 1)
    return ((2 * rank - E - 1) * shares).sum(1) / (E * shares.sum(1))


def first_expert_repeat(trace: Trace) -> np.ndarray:
    """``[L]`` P(a decode token's first choice equals the previous token's), per layer."""
    before, after = _pairs(trace)
    return (before[:, :, 0] == after[:, :, 0]).mean(0)


def layer_affinity(trace: Trace) -> np.ndarray:
    """``[L-1]`` recall@k at layer l+1 of the conditional-frequency guess from layer l (in-sample)."""
    decode, _ = _decode(trace)
    ids = trace.expert_array()[decode]
    n, L, k = ids.shape
    E = trace.meta.num_experts
    hot = np.zeros((n, L, E))
    np.put_along_axis(hot, ids, 1.0, axis=-1)
    recall = np.empty(L - 1)
    for l in range(L - 1):
        seen = hot[:, l].sum(0)
        cond = np.where(seen[:, None] > 0, hot[:, l].T @ hot[:, l + 1] / np.maximum(seen, 1)[:, None],
                        hot[:, l + 1].mean(0))
        guess = _top(hot[:, l] @ cond, k)
        recall[l] = np.take_along_axis(hot[:, l + 1], guess, axis=1).sum() / (n * k)
    return recall


def previous_token_recall_at_k(trace: Trace) -> float:
    """Mean over pairs and layers of the share of a decode token's top-k the previous token held."""
    before, after = _pairs(trace)
    return float((before[..., :, None] == after[..., None, :]).any(-2).mean())


def popularity_recall_at_k(trace: Trace) -> float:
    """Mean over layers of the share of assignments of the layer's k most used experts."""
    decode, _ = _decode(trace)
    counts = _counts(trace.expert_array()[decode], trace.meta.num_experts)
    top = np.take_along_axis(counts, _top(counts, trace.meta.top_k), axis=1)
    return float((top.sum(1) / counts.sum(1)).mean())


def speculative_gate_precision(trace: Trace) -> float | None:
    """Mean share of layer l+1's top-k that ``spec_experts`` at layer l guessed (decode tokens), or
    None where the trace holds no guesses."""
    if "spec_experts" not in trace.df or trace.df["spec_experts"].isna().all():
        return None
    decode, _ = _decode(trace)
    spec, ids = trace.expert_array("spec_experts")[decode, :-1], trace.expert_array()[decode, 1:]
    known = (spec >= 0).all(-1)
    hits = (spec[..., :, None] == ids[..., None, :]).any(-1).sum(-1)
    return float(hits[known].sum() / (known.sum() * trace.meta.top_k)) if known.any() else None


def measure(trace: Trace) -> dict:
    """Every statistic of the module docstring as plain numbers (per-layer ones as lists)."""
    m = trace.meta
    decode, _ = _decode(trace)
    affinity, gate = layer_affinity(trace), speculative_gate_precision(trace)
    return {
        "layers": m.num_layers, "experts": m.num_experts, "top_k": m.top_k, "decode_tokens": len(decode),
        "popularity_skew": popularity_skew(trace).round(4).tolist(),
        "first_expert_repeat": first_expert_repeat(trace).round(4).tolist(),
        "layer_affinity": affinity.round(4).tolist(),
        "layer_affinity_mean": round(float(affinity.mean()), 4) if len(affinity) else None,
        "previous_token_recall_at_k": round(previous_token_recall_at_k(trace), 4),
        "popularity_recall_at_k": round(popularity_recall_at_k(trace), 4),
        "speculative_gate_precision": None if gate is None else round(gate, 4),
    }

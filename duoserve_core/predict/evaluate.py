"""How well the predictor and the baselines foresee the experts of later layers, on a held-out trace.

For every method and depth d, each (token, target layer t) pair is scored with the scores made
at source layer t-d. Metrics (micro-averaged over pairs; per target layer and overall):

    exact_topk        the method's top-k set equals the actual set
    half_correct      |top-k ∩ actual| >= ceil(k/2)
    recall/precision  of the set {experts with score >= threshold}
    experts_per_layer that set's mean size: what a threshold prefetch loads per token and layer
    bytes_per_token   experts_per_layer x expert_bytes, summed over the target layers
    recall_at[m]      recall of the m highest-scoring experts, m = k, k+1, 2k: equal bytes for
                      every method, so these compare methods at the same transfer cost; None for
                      m > k where a method scores only its top-k (``baselines.TOP_K_ONLY``: the gate)
    calibration       (overall only) whether a score of p means "used with probability p": every
                      (token, target layer, expert) triple is one event, binned by its score into
                      10 equal bins of [0, 1]; per bin the mean score and the observed frequency
                      (the reliability curve), and the expected calibration error
                      ECE = sum over bins of (events in bin / events) x |mean score - frequency|.
                      A threshold policy reads scores as probabilities, so this says whether
                      ``--threshold 0.6`` loads experts used 60% of the time. None for a method
                      whose scores leave [0, 1]; a 0/1 baseline (previous token) has only the
                      end bins, and its ECE says how far from certain its guesses are.

Only the tokens of one phase are scored (decode by default: that is what the predictor is for).
Ties in a score are broken towards the lower expert id, so results are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..units import format_bytes
from .baselines import TOP_K_ONLY, Baseline
from .data import TraceArrays, multi_hot, ranked_hits
from .errors import PredictorError
from .layer_predictor import LayerPredictor

# one Mixtral-8x7B expert in NF4 (w1, w2, w3 packed weights plus their absmax/quant state)
MIXTRAL_NF4_EXPERT_BYTES = 99090432


def recall_sizes(top_k: int, num_experts: int) -> list[int]:
    return sorted({min(m, num_experts) for m in (top_k, top_k + 1, 2 * top_k)})


@dataclass
class Counts:
    """Sums over (token, target layer) pairs, from which every metric is a ratio."""

    pairs: int = 0
    exact: int = 0
    half: int = 0
    actual: int = 0
    hits: int = 0       # |{score >= threshold} ∩ actual|
    predicted: int = 0  # |{score >= threshold}|
    hits_at: dict[int, int] = field(default_factory=dict)

    def __iadd__(self, other: Counts) -> Counts:
        for name in ("pairs", "exact", "half", "actual", "hits", "predicted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for m, v in other.hits_at.items():
            self.hits_at[m] = self.hits_at.get(m, 0) + v
        return self


def count(scores: torch.Tensor, actual: torch.Tensor, threshold: float, ms: list[int]) -> Counts:
    """Counts for ``scores [N, E]`` against the actual top-k ids ``actual [N, k]``."""
    k = actual.shape[1]
    truth = multi_hot(actual, scores.shape[1]).bool()
    ranked = ranked_hits(scores, actual)  # [N, E]: hits among the top-1, top-2, ...
    in_top_k = ranked[:, k - 1]
    above = scores >= threshold
    return Counts(pairs=scores.shape[0], exact=int((in_top_k == k).sum()),
                  half=int((in_top_k >= math.ceil(k / 2)).sum()), actual=int(truth.sum()),
                  hits=int((above & truth).sum()), predicted=int(above.sum()),
                  hits_at={m: int(ranked[:, m - 1].sum()) for m in ms})


CALIBRATION_BINS = 10


@dataclass
class Reliability:
    """Per bin of score (``CALIBRATION_BINS`` equal bins of [0, 1], a score of 1 in the last): the
    (token, target layer, expert) events in it, the sum of their scores and how many were used."""

    events: torch.Tensor = field(default_factory=lambda: torch.zeros(CALIBRATION_BINS, dtype=torch.float64))
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(CALIBRATION_BINS, dtype=torch.float64))
    used: torch.Tensor = field(default_factory=lambda: torch.zeros(CALIBRATION_BINS, dtype=torch.float64))

    def __iadd__(self, other: Reliability) -> Reliability:
        self.events += other.events
        self.scores += other.scores
        self.used += other.used
        return self


def reliability(scores: torch.Tensor, actual: torch.Tensor) -> Reliability | None:
    """Binned ``scores [N, E]`` against the actual ids ``[N, k]``; None if a score is outside [0, 1]."""
    if scores.numel() and (scores.min() < 0 or scores.max() > 1):
        return None
    p = scores.reshape(-1).to(torch.float64)
    truth = multi_hot(actual, scores.shape[1]).reshape(-1).to(torch.float64)
    bins = (p * CALIBRATION_BINS).long().clamp_(max=CALIBRATION_BINS - 1)
    zeros = torch.zeros(CALIBRATION_BINS, dtype=torch.float64)
    return Reliability(zeros.index_add(0, bins, torch.ones_like(p)), zeros.index_add(0, bins, p),
                       zeros.index_add(0, bins, truth))


def calibration(r: Reliability) -> dict:
    """The ECE and the reliability curve (bins with no event are left out)."""
    total = r.events.sum().item()
    ece = sum((r.events[b] / total * (r.scores[b] / r.events[b] - r.used[b] / r.events[b]).abs()).item()
              for b in range(CALIBRATION_BINS) if r.events[b] > 0)
    bins = [{"bin": [b / CALIBRATION_BINS, (b + 1) / CALIBRATION_BINS], "events": int(r.events[b]),
             "mean_score": (r.scores[b] / r.events[b]).item(), "observed": (r.used[b] / r.events[b]).item()}
            for b in range(CALIBRATION_BINS) if r.events[b] > 0]
    return {"ece": ece, "bins": bins}


def metrics(c: Counts, expert_bytes: int, target_layers: int, ranked: int | None = None) -> dict:
    """Ratios of ``c``; bytes are per token over ``target_layers`` layers; ``ranked``: how many experts
    the method's scores rank (None: all), recall of more is None."""
    per_layer = c.predicted / c.pairs
    return {"pairs": c.pairs, "exact_topk": c.exact / c.pairs, "half_correct": c.half / c.pairs,
            "recall": c.hits / c.actual, "precision": c.hits / c.predicted if c.predicted else None,
            "experts_per_layer": per_layer, "bytes_per_token": per_layer * target_layers * expert_bytes,
            "recall_at": {str(m): None if ranked is not None and m > ranked else v / c.actual
                          for m, v in sorted(c.hits_at.items())}}


def ranked_by(name: str, top_k: int) -> int | None:
    """How many experts method ``name``'s scores rank: ``top_k`` for ``TOP_K_ONLY``, else all (None)."""
    return top_k if name in TOP_K_ONLY else None


def format_recall(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.3f}"


def evaluate(test: TraceArrays, predictor: LayerPredictor, baselines: list[Baseline], *, threshold: float = 0.5,
             expert_bytes: int = MIXTRAL_NF4_EXPERT_BYTES, phase: str = "decode") -> dict:
    """Every method's metrics per depth, per target layer and overall, on the ``phase`` tokens of ``test``."""
    data = test.select((phase,))
    if data.num_tokens == 0:
        raise PredictorError(f"the test trace has no {phase} tokens to evaluate on")
    meta = data.meta
    ms = recall_sizes(meta.top_k, meta.num_experts)
    feats = {layer: predictor.features(layer, data.experts, data.weights, data.prev_experts)
             for layer in range(meta.num_layers - 1)}
    with torch.inference_mode():
        predicted = {layer: predictor.predict(layer, f.to(predictor.device)).cpu() for layer, f in feats.items()}

    def predictor_scores(layer: int, d: int, _: TraceArrays) -> torch.Tensor:
        return predicted[layer][:, d - 1]

    methods = [("predictor", predictor_scores)] + [(b.name, b.scores) for b in baselines]
    results: dict = {}
    for name, score_fn in methods:
        per_depth = {}
        for d in range(1, predictor.depth + 1):
            per_layer, total, binned = {}, Counts(), Reliability()
            for target in range(d, meta.num_layers):
                scores = score_fn(target - d, d, data)
                if scores is None:
                    break
                c = count(scores, data.experts[:, target], threshold, ms)
                per_layer[str(target)] = metrics(c, expert_bytes, 1, ranked_by(name, meta.top_k))
                total += c
                if binned is not None:  # None from the first score outside [0, 1] on
                    r = reliability(scores, data.experts[:, target])
                    if r is None:
                        binned = None
                    else:
                        binned += r
            if per_layer:
                overall = metrics(total, expert_bytes, len(per_layer), ranked_by(name, meta.top_k))
                overall["calibration"] = None if binned is None else calibration(binned)
                per_depth[str(d)] = {"overall": overall, "per_layer": per_layer}
        if per_depth:
            results[name] = per_depth
    return {"model": meta.model, "num_layers": meta.num_layers, "num_experts": meta.num_experts,
            "top_k": meta.top_k, "depth": predictor.depth, "phase": phase, "tokens": data.num_tokens,
            "threshold": threshold, "expert_bytes": expert_bytes, "recall_at_sizes": ms, "methods": results}


def format_report(result: dict) -> str:
    """Tables for people: overall per method and depth (ECE beside recall), the predictor's reliability
    curve, then recall at k per target layer."""
    k, ms = result["top_k"], result["recall_at_sizes"]
    lines = [f"{result['model']}: {result['num_layers']} layers x {result['num_experts']} experts, top-{k}; "
             f"scored on {result['phase']} tokens only ({result['tokens']}); threshold {result['threshold']}; "
             f"expert = {format_bytes(result['expert_bytes'])}", ""]
    head = (f"{'method':<17}{'depth':>5}{'exact':>8}{'half':>8}{'recall':>8}{'prec':>8}{'exp/lyr':>9}"
            f"{'per token':>12}" + "".join(f"{'R@' + str(m):>8}" for m in ms) + f"{'ECE':>8}")
    lines.append(head)
    for name, per_depth in result["methods"].items():
        for d, r in per_depth.items():
            o = r["overall"]
            prec = "-" if o["precision"] is None else f"{o['precision']:.3f}"
            ece = "-" if o.get("calibration") is None else f"{o['calibration']['ece']:.3f}"
            lines.append(f"{name:<17}{d:>5}{o['exact_topk']:>8.3f}{o['half_correct']:>8.3f}{o['recall']:>8.3f}"
                         f"{prec:>8}{o['experts_per_layer']:>9.2f}{format_bytes(o['bytes_per_token']):>12}"
                         + "".join(format_recall(o["recall_at"][str(m)]) for m in ms) + f"{ece:>8}")
    for d, r in result["methods"]["predictor"].items():
        cal = r["overall"].get("calibration")
        if cal is None:
            continue
        lines += ["", f"predictor reliability, depth {d} (ECE {cal['ece']:.3f}): per bin of predicted "
                      "probability, the (token, layer, expert) events and how often the expert was used",
                  f"{'bin':>11}{'events':>10}{'predicted':>11}{'observed':>10}"]
        lines += [f"{b['bin'][0]:>5.1f}-{b['bin'][1]:<5.1f}{b['events']:>10}{b['mean_score']:>11.3f}"
                  f"{b['observed']:>10.3f}" for b in cal["bins"]]
    for d in range(1, result["depth"] + 1):
        names = [n for n, per_depth in result["methods"].items() if str(d) in per_depth]
        lines += ["", f"recall@{k} (equal bytes) per target layer, depth {d}",
                  f"{'layer':>5}" + "".join(f"{n[:16]:>17}" for n in names)]
        for target in result["methods"]["predictor"][str(d)]["per_layer"]:
            lines.append(f"{target:>5}" + "".join(
                f"{result['methods'][n][str(d)]['per_layer'][target]['recall_at'][str(k)]:>17.3f}" for n in names))
    return "\n".join(lines)

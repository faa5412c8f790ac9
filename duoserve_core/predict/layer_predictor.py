"""``LayerPredictor``: at layer l, the probability of every expert at layers l+1..l+depth.

Model. For source layer l, depth d (target t = l + d) and expert e, the probability is

    P(e at t) = sigmoid( b[e] + (w_prev + w_sim * s) * prev[t, e] + MLP(x)[e] )

where ``prev[t, e]`` says whether the previous token used e at t, ``s`` is how much the current
token's routing at l overlaps the previous token's (``features.prev_token_similarity``) and ``x``
the feature row (``features.layer_features``). The first two terms are a *prior* of E + 2 numbers
per (l, d): per-expert popularity and temporal locality, with one lift shared by every expert. The
MLP is a *correction* on top of it, for what the prior cannot say (which experts follow which
across layers), trained from zero with an L2 penalty and stopped early on held-out tokens.

Why this shape. The old predictor (one free MLP per (l, d) on the same features) had to learn
"the previous token's experts come back" once per expert, from a one-hot among 288 inputs: trained
on 200 to 1,000 mixtral-like tokens it scored R@2 0.26-0.28 on held-out routing, chance level, where
the previous-token baseline scores 0.36 (real Mixtral, 333 tokens: 0.32 against 0.35). Shared across
experts, the lift is learnt from a few hundred tokens; with the MLP's last layer starting at zero,
the model starts as the prior and moves away only as far as held-out data supports.

Training (:func:`fit_predictor`). The last ``holdout`` share of the training tokens (in trace order,
so whole requests but for the one the cut falls in) is held out. Per (l, d), a ladder from the
simplest model, each step kept only if it adds held-out hits at recall@k (k = top-k: equal bytes)
beyond noise (``_significant_gain``): (1) the previous token's experts, lifted over uniform
popularity (``_fit_prior``: L-BFGS, the lift never negative); (2) plus per-expert popularity,
shrunk towards uniform by what the data supports (``_popularity_precision``); (3) plus the MLP
correction (Adam, minibatches; the epoch of lowest held-out loss). A dropped step is recorded in
the file (``training.fits``) and a dropped correction's output weights are zero: where data is
scarce the predictor ranks experts exactly as the previous-token baseline does, and it departs from
that only where held-out tokens show a gain. Then (4) Platt scaling on the
held-out tokens, ``sigmoid(a * z + c)`` with one (a, c) per (l, d), so that a probability of 0.6
means the expert is used about 60% of the time and ``predictor_threshold`` is a calibrated
probability; (5) the chosen model is refitted on every token (same initial weights, the chosen
epochs) and (a, c) are folded into its weights, so serving pays nothing for them. The calibration
is measured on tokens the split model had not seen and carried over to the refit; ``predict eval``
reports how well it holds on the test trace (ECE).

Serving. At load time the ``depth`` MLPs of a layer are fused into one stack of matrices (first
layers side by side, later layers block-diagonal), so a prediction is two kernels per MLP layer
whatever the depth, plus four small ones for the prior. Pure torch, on the runtime's device.
Targets beyond the last layer do not exist: layer l predicts ``depth_at(l) = min(depth, L-1-l)``
layers, none at the last layer.

The file is one safetensors file: the per-(l, d) weights as tensors and a JSON description (shape,
feature spec, training data and every (l, d)'s fit) in its metadata, so a file can be checked
against the model it is used with before any tensor is read. Format 2 adds the prior's two weights
per (l, d); format 1 files (free MLPs with sigmoid outputs, fitted by scikit-learn) still load, as
a predictor whose prior weights are zero, which computes exactly what they computed.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from joblib import Parallel, delayed
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from ..atomic import atomic_write_bytes
from ..progress import progress
from ..traces import TraceMeta
from .data import TraceArrays, load_arrays, multi_hot, ranked_hits
from .errors import PredictorError, describe_shape
from .features import FeatureSpec, layer_features, prev_token_similarity, prev_token_targets

FORMAT = "duoserve-predictor/2"
FORMAT_V1 = "duoserve-predictor/1"  # no prior terms: loaded with zero prior weights
RETRAIN = "python -m duoserve_core.predict train --trace T.parquet --depth D --out P"

# per MLP: [(coef, intercept), ...] for each of its layers, coef is [in, out]; the last outputs logits
MLPParams = list[tuple[torch.Tensor, torch.Tensor]]

BATCH = 256      # minibatch of the correction's Adam steps
PATIENCE = 10    # epochs without a better held-out loss at any depth before training stops
LEARNING_RATE = 1e-3
SIGNIFICANCE = 3.0  # standard errors of held-out gain a model step must show to be kept
MIN_LIFT = 0.01     # logit: the least the previous token's use raises an expert's (see _fit_prior)


@dataclass
class Fitted:
    """One (source layer, depth)'s model: the MLP (its last intercept holds the popularity term), the
    prior's ``[w_prev, w_sim]``, and what the fit measured on the held-out tokens."""

    mlp: MLPParams
    prior: torch.Tensor
    report: dict


def _split(n: int, holdout: float) -> int:
    """How many of ``n`` tokens are fitted on; the rest (at least one) are held out."""
    if n < 2:
        raise PredictorError(f"training needs at least 2 tokens (one to fit, one held out), got {n}")
    return n - min(n - 1, max(1, round(n * holdout)))


def _bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[D]`` loss per depth of logits ``z [D, N, E]``: summed over experts, mean over tokens."""
    return F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1).mean(-1)


def _prior_terms(prior: torch.Tensor, prev: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """``prev [D, N, E] * (w_prev + w_sim * sim [N, 1])`` with ``prior [D, 2] = [w_prev, w_sim]``."""
    return prev * (prior[:, :1, None] + prior[:, 1:, None] * sim)


class _Stack:
    """The D models of one source layer, trained side by side: every tensor has a leading depth axis
    and no parameter is shared across depths, so this equals D separate fits at a D-th of the calls."""

    def __init__(self, depths: int, sizes: list[int], gen: torch.Generator):
        self.weights, self.biases = [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i == len(sizes) - 2:  # the correction starts at zero: the model starts as the prior
                self.weights.append(torch.zeros(depths, fan_in, fan_out))
                self.biases.append(torch.zeros(depths, fan_out))  # the popularity intercepts (_fit_prior)
            else:  # Glorot-uniform for relu, as scikit-learn's MLP initialises
                bound = math.sqrt(6 / (fan_in + fan_out))
                self.weights.append((torch.rand(depths, fan_in, fan_out, generator=gen) * 2 - 1) * bound)
                self.biases.append((torch.rand(depths, fan_out, generator=gen) * 2 - 1) * bound)
        self.prior = torch.zeros(depths, 2)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases, self.prior]

    def logits(self, x: torch.Tensor, prev: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """``[D, N, E]`` from features ``x [N, F]``, previous-token targets ``prev [D, N, E]``, ``sim [N, 1]``."""
        h = x.expand(len(self.prior), -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.unsqueeze(1), h, w)
            if i < len(self.weights) - 1:
                h = h.relu()
        return h + _prior_terms(self.prior, prev, sim)

    def penalty(self) -> torch.Tensor:
        """Sum of squared weights (not intercepts, not the prior), as scikit-learn's ``alpha`` penalises."""
        return sum(w.pow(2).sum() for w in self.weights)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors()]

    def restore(self, state: list[torch.Tensor], depths: torch.Tensor) -> None:
        """Put ``state``'s values back at these depths."""
        with torch.no_grad():
            for t, s in zip(self.tensors(), state):
                t[depths] = s[depths]


def _popularity_precision(y: torch.Tensor, uniform: float) -> torch.Tensor:
    """``[D]``: how strongly each depth's popularity intercepts are pulled towards uniform, by empirical
    Bayes: the spread of the experts' observed log-odds around uniform, less the part that binomial
    sampling noise alone would make, is the variance tau^2 of the true log-odds; the precision is
    1 / tau^2.

    Why. Popularity estimated from a few hundred tokens is mostly noise where routing is nearly
    balanced (mixtral-like: 11% between the most and least used expert; 160 tokens give each share a
    13% standard error), and noise-popular experts then outrank the previous token's: unshrunk, the
    prior scored R@2 0.351 against the previous token's 0.356 at 200 tokens, up to 0.037 lower at
    single layers; shrunk, 0.356. Where popularity is real (the bundled model: 15-18% for the busiest
    expert, 7-10% for the idlest) tau^2 is far above the noise and the estimate is kept. Tokens of a
    request are not independent draws, so a few requests can still show a spread that is not there;
    popularity must then also pass the held-out test (``_significant_gain``)."""
    n = y.shape[1]
    rate = y.mean(1).clamp(0.5 / n, 1 - 0.5 / n)  # [D, E]; half a token keeps log-odds finite
    spread = (torch.logit(rate) - uniform).pow(2).mean(1)
    noise = (1 / (n * rate * (1 - rate))).mean(1)  # variance of an observed log-odds (delta method)
    return 1 / (spread - noise).clamp(min=1e-4)


def _fit_prior(stack: _Stack, y: torch.Tensor, prev: torch.Tensor, sim: torch.Tensor, popularity: torch.Tensor) -> None:
    """The prior alone (the correction is still zero), by L-BFGS: the previous-token weights, and at
    the depths where ``popularity [D]`` is set the per-expert intercepts (elsewhere uniform). Maximum
    a posteriori: the intercepts' Gaussian prior around uniform is :func:`_popularity_precision`'s.

    The previous token's experts are never made less likely: the lift ``w_prev + w_sim * s`` is kept
    at least ``MIN_LIFT`` at overlap s = 0 and s = 1 (so for every s between), and carries a unit
    Gaussian prior at both ends. Free, the two weights came out negative at layers where tokens
    hardly repeat (fitted on 200 mixtral-like tokens: -0.09 at layer 1, 0.03 - 0.19 s at layer 2),
    which ranked the previous token's experts last and cost up to 0.027 R@2 at a layer against the
    previous-token baseline; real routing repeats more often than chance at every layer measured
    (Mixtral: 14-26% first-expert repeats against 12.5%; the bundled model 14-35%). ``MIN_LIFT`` makes
    them win ties with equally popular experts."""
    n, E = y.shape[1], y.shape[2]
    k = y.sum(-1).mean().item()
    uniform = math.log(k / (E - k)) if E > k else 0.0
    precision = _popularity_precision(y, uniform)[:, None]
    mask = popularity[:, None].to(y.dtype)
    shift = torch.zeros(y.shape[0], E, requires_grad=True)  # the intercepts' distance from uniform
    raw = torch.zeros(y.shape[0], 2, requires_grad=True)  # the lifts at s = 0 and s = 1, before softplus

    def weights() -> tuple[torch.Tensor, torch.Tensor]:
        lift = F.softplus(raw) + MIN_LIFT
        return lift, torch.stack([lift[:, 0], lift[:, 1] - lift[:, 0]], 1)  # [w_prev, w_sim]

    opt = torch.optim.LBFGS([shift, raw], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        lift, prior = weights()
        loss = (_bce(uniform + mask[:, None] * shift[:, None] + _prior_terms(prior, prev, sim), y).sum()
                + ((precision * shift.pow(2)).sum() + lift.pow(2).sum()) / (2 * n))
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        stack.biases[-1].copy_(uniform + mask * shift)
        stack.prior.copy_(weights()[1])


def _hits(z: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """``[D, N]`` hits among each token's k best logits (``z [D, N, E]``, ``actual [D, N, k]``)."""
    k = actual.shape[-1]
    return torch.stack([ranked_hits(zd, ad)[:, k - 1] for zd, ad in zip(z, actual)]).double()


def _significant_gain(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``[D]``: does ``new`` add hits@k on the held-out tokens (``[D, N]`` each) by more than
    ``SIGNIFICANCE`` standard errors of the paired per-token difference?

    Strict, because a step kept on noise loses recall on other tokens, and the test runs twice per
    (l, d) (122 times for Mixtral at depth 2). Kept whenever its held-out recall was not lower, 56 of
    61 corrections were kept at 200 mixtral-like tokens and R@2 came out at 0.345 against the previous
    token's 0.356; at two standard errors a bundled-like predictor trained on 300 tokens still kept one
    on 60 held-out tokens and lost 0.0024 R@2 to the previous token on new requests; and popularity
    kept without the test cost 0.022 at the last layer of an 8-layer mixtral-like model trained on
    300 tokens, whose 6 requests happened to use one expert 35% of the time (new requests: 27%)."""
    gain = new - base
    if gain.shape[1] < 2:  # one held-out token has no spread to judge by
        return torch.zeros(gain.shape[0], dtype=torch.bool)
    return gain.mean(1) > SIGNIFICANCE * gain.std(1) / math.sqrt(gain.shape[1])


def _epochs(stack: _Stack, x: torch.Tensor, y: torch.Tensor, prev: torch.Tensor, sim: torch.Tensor, *, n: int,
            alpha: float, gen: torch.Generator, max_epochs: int, after_epoch: Callable[[int], bool]) -> int:
    """Adam in minibatches over the first ``n`` tokens, until ``after_epoch(epoch)`` says stop or
    ``max_epochs``; returns the epochs run. The loss is the mean log loss plus ``alpha / (2 n) |W|^2``."""
    params = stack.tensors()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=LEARNING_RATE)
    epoch = 0
    while epoch < max_epochs:
        epoch += 1
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            idx = order[i:i + BATCH]
            loss = (_bce(stack.logits(x[idx], prev[:, idx], sim[idx]), y[:, idx]).sum()
                    + alpha / (2 * n) * stack.penalty())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if not after_epoch(epoch):
            break
    for p in params:
        p.requires_grad_(False)
    return epoch


def _platt(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-depth ``(a, c)`` with ``sigmoid(a z + c)`` calibrated on held-out logits ``z [D, N, E]``.
    ``a = exp(θ)`` stays positive, so the experts' order (and recall@k) is kept; a unit Gaussian prior
    on (θ, c) keeps a handful of held-out tokens from fitting an extreme scale."""
    n = z.shape[1]
    theta = torch.zeros(z.shape[0], requires_grad=True)
    shift = torch.zeros(z.shape[0], requires_grad=True)
    opt = torch.optim.LBFGS([theta, shift], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (_bce(z * theta.exp()[:, None, None] + shift[:, None, None], y).sum()
                + (theta.pow(2) + shift.pow(2)).sum() / (2 * n))
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach().exp(), shift.detach()


def _fit_source_layer(layer: int, x: torch.Tensor, y: torch.Tensor, actual: torch.Tensor, prev: torch.Tensor,
                      sim: torch.Tensor, *, n_fit: int, hidden: tuple[int, ...], alpha: float, seed: int,
                      max_iter: int) -> list[Fitted]:
    """The ``D`` models of source layer ``layer``: ``y``/``prev`` ``[D, N, E]``, ``actual [D, N, k]``; the
    first ``n_fit`` tokens are fitted on, the rest held out (steps 1-5 of the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: parallelism comes from fitting layers side by side (jobs)
    try:
        return _fit_stack(layer, x, y, actual, prev, sim, n_fit=n_fit, hidden=hidden, alpha=alpha, seed=seed,
                          max_iter=max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit_stack(layer: int, x: torch.Tensor, y: torch.Tensor, actual: torch.Tensor, prev: torch.Tensor,
               sim: torch.Tensor, *, n_fit: int, hidden: tuple[int, ...], alpha: float, seed: int,
               max_iter: int) -> list[Fitted]:
    D, N, E = y.shape
    sizes = [x.shape[1], *hidden, E]
    hold = slice(n_fit, N)

    # On the split, climb from the simplest model while a step adds held-out hits beyond noise: the
    # previous token's experts (uniform popularity), then popularity, then the correction.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    stack = _Stack(D, sizes, gen)

    def heldout() -> torch.Tensor:
        with torch.no_grad():
            return stack.logits(x[hold], prev[:, hold], sim[hold])

    _fit_prior(stack, y[:, :n_fit], prev[:, :n_fit], sim[:n_fit], popularity=torch.zeros(D, dtype=torch.bool))
    flat_state, flat_z = stack.snapshot(), heldout()
    _fit_prior(stack, y[:, :n_fit], prev[:, :n_fit], sim[:n_fit], popularity=torch.ones(D, dtype=torch.bool))
    popular_z = heldout()
    hits = {"previous_token": _hits(flat_z, actual[:, hold]), "popularity": _hits(popular_z, actual[:, hold])}
    # with no previous token anywhere (--no-prev-token) the first rung is uniform: popularity goes in
    popular = _significant_gain(hits["previous_token"], hits["popularity"]) | (not prev.any())
    stack.restore(flat_state, ~popular)
    prior_z = torch.where(popular[:, None, None], popular_z, flat_z)
    prior_hits = torch.where(popular[:, None], hits["popularity"], hits["previous_token"])

    best_loss, best_state = _bce(prior_z, y[:, hold]), stack.snapshot()
    best_epoch = torch.zeros(D, dtype=torch.long)
    stale = 0

    def keep_best(epoch: int) -> bool:
        nonlocal best_loss, stale
        loss = _bce(heldout(), y[:, hold])
        better = loss < best_loss - 1e-4  # scikit-learn's default tol
        stale = 0 if better.any() else stale + 1
        if better.any():
            best_loss = torch.where(better, loss, best_loss)
            best_epoch[better] = epoch
            for b, t in zip(best_state, stack.tensors()):
                b[better] = t[better].detach()
        return stale < PATIENCE

    epochs = _epochs(stack, x, y, prev, sim, n=n_fit, alpha=alpha, gen=gen, max_epochs=max_iter, after_epoch=keep_best)
    stack.restore(best_state, torch.arange(D))
    mlp_z = heldout()
    hits["correction"] = _hits(mlp_z, actual[:, hold])
    keep = _significant_gain(prior_hits, hits["correction"])
    a, c = _platt(torch.where(keep[:, None, None], mlp_z, prior_z), y[:, hold])

    # Refit on every token with those choices: the held-out fifth is worth R@2 0.730 against 0.723 on
    # the bundled model. The same seed gives the same initial weights; each kept correction trains for
    # the epochs it was best at, the others stay at zero.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    final = _Stack(D, sizes, gen)
    _fit_prior(final, y, prev, sim, popularity=popular)
    chosen = final.snapshot()
    stop = torch.where(keep, best_epoch, 0)

    def take(epoch: int) -> bool:
        done = stop == epoch
        for s, t in zip(chosen, final.tensors()):
            s[done] = t[done].detach()
        return epoch < int(stop.max())

    if keep.any():
        _epochs(final, x, y, prev, sim, n=N, alpha=alpha, gen=gen, max_epochs=int(stop.max()), after_epoch=take)
    final.restore(chosen, torch.arange(D))
    with torch.no_grad():  # fold the calibration in: a scales every logit term, c shifts the intercept
        final.weights[-1].mul_(a[:, None, None])
        final.biases[-1].mul_(a[:, None]).add_(c[:, None])
        final.prior.mul_(a[:, None])
    pairs = (N - n_fit) * actual.shape[-1]
    out = []
    for d in range(D):
        report = {"target": layer + d + 1, "popularity": bool(popular[d]), "correction": bool(keep[d]),
                  "epochs": epochs, "best_epoch": int(best_epoch[d]),
                  "heldout_recall": {name: round(h[d].sum().item() / pairs, 4) for name, h in hits.items()},
                  "platt": [round(float(a[d]), 4), round(float(c[d]), 4)]}
        out.append(Fitted([(w[d].clone(), b[d].clone()) for w, b in zip(final.weights, final.biases)],
                          final.prior[d].clone(), report))
    return out


def fit_predictor(data: TraceArrays, *, depth: int, spec: FeatureSpec, hidden: tuple[int, ...], alpha: float = 1.0,
                  holdout: float = 0.2, seed: int = 0, max_iter: int = 200, jobs: int = 1,
                  training: dict | None = None, log: Callable[[str], None] | None = None) -> LayerPredictor:
    """Fit every (source layer, depth) on ``data`` (already the training phases' tokens), ``jobs``
    source layers at a time, as the module docstring says. ``alpha`` is the correction's L2 strength
    (scikit-learn's meaning: the penalty is ``alpha / (2 n) * |W|^2``, so it weighs more with fewer
    tokens); ``holdout`` the share of tokens held out for early stopping, the fallback and calibration."""
    meta = data.meta
    if data.num_tokens == 0:
        raise PredictorError("the training traces hold no tokens of the phases selected for training")
    if not 0 < holdout < 1:
        raise PredictorError(f"holdout must be a share between 0 and 1, got {holdout}")
    if depth < 1:
        raise PredictorError(f"depth must be at least 1, got {depth}")
    n_fit = _split(data.num_tokens, holdout)
    L, E = meta.num_layers, meta.num_experts
    tasks = []
    for layer in range(L - 1):
        D = min(depth, L - 1 - layer)
        x = layer_features(layer, data.experts, data.weights, data.prev_experts, spec=spec, num_layers=L,
                           num_experts=E)
        actual = data.experts[:, layer + 1:layer + 1 + D].transpose(0, 1)
        if spec.use_prev_token:
            prev = prev_token_targets(x, layer, D, spec=spec, num_experts=E).reshape(-1, D, E).transpose(0, 1)
            sim = prev_token_similarity(x, layer, spec=spec, num_experts=E, top_k=meta.top_k)
        else:  # no previous token in the features: the prior is popularity alone
            prev, sim = torch.zeros(D, data.num_tokens, E), torch.zeros(data.num_tokens, 1)
        tasks.append(delayed(_fit_source_layer)(layer, x, multi_hot(actual, E), actual, prev.contiguous(), sim,
                                                n_fit=n_fit, hidden=hidden, alpha=alpha, seed=seed, max_iter=max_iter))
    params, prior, fits = {}, {}, {}
    fitted_layers = progress(Parallel(n_jobs=jobs, return_as="generator")(tasks), desc="fitting", total=len(tasks),
                             unit="layer")
    for layer, fitted in enumerate(fitted_layers):
        for d, f in enumerate(fitted, start=1):
            params[(layer, d)], prior[(layer, d)] = f.mlp, f.prior
            fits[f"{layer}->{layer + d}"] = f.report
            if log:
                r, h = f.report, f.report["heldout_recall"]
                model = " + ".join(name for name, used in (("previous token", spec.use_prev_token),
                                                           ("popularity", r["popularity"]),
                                                           ("correction", r["correction"])) if used)
                log(f"layer {layer} -> {layer + d}: held-out R@{meta.top_k} previous token {h['previous_token']:.3f}, "
                    f"+ popularity {h['popularity']:.3f}, + correction {h['correction']:.3f} (best epoch "
                    f"{r['best_epoch']} of {r['epochs']}): {model}")
    training = {**(training or {}), "samples": data.num_tokens, "fitted_on": n_fit, "holdout": holdout,
                "alpha": alpha, "seed": seed, "max_iter": max_iter, "torch": torch.__version__, "fits": fits}
    return LayerPredictor(meta, depth, spec, hidden, params, training, prior=prior)


def _fuse_mlps(mlps: list[MLPParams]) -> MLPParams:
    """Several MLPs of one input as one MLP whose output is their outputs side by side."""
    fused = []
    for i in range(len(mlps[0])):
        weights = [m[i][0] for m in mlps]
        w = torch.cat(weights, 1) if i == 0 else torch.block_diag(*weights)
        fused.append((w.contiguous(), torch.cat([m[i][1] for m in mlps])))
    return fused


class LayerPredictor:
    """Predicts, at each source layer, expert probabilities for the next ``depth`` layers.

    ``params[(l, d)]``: the MLP of source layer l and depth d; ``prior[(l, d)]``: its ``[w_prev, w_sim]``
    (None for a format-1 file: no prior terms)."""

    def __init__(self, meta: TraceMeta, depth: int, spec: FeatureSpec, hidden: tuple[int, ...],
                 params: dict[tuple[int, int], MLPParams], training: dict, device: str | torch.device = "cpu",
                 prior: dict[tuple[int, int], torch.Tensor] | None = None):
        if depth < 1:
            raise PredictorError(f"depth must be at least 1, got {depth}")
        self.meta, self.depth, self.spec, self.hidden = meta, depth, spec, tuple(hidden)
        self.training = training
        self.params, self.prior = params, prior
        missing = [(l, d) for l in range(meta.num_layers) for d in range(1, self.depth_at(l) + 1)
                   if (l, d) not in params or (prior is not None and (l, d) not in prior)]
        if missing:
            raise PredictorError(f"predictor lacks the MLPs of (layer, depth) {missing[:4]}...; retrain with {RETRAIN}")
        self.device = torch.device(device)
        self._fused = [self._fuse(l) for l in range(meta.num_layers)]
        # the prior's weights per fused output column: [w_prev] * E for depth 1, then depth 2, ...
        self._prior = [self._fuse_prior(l) for l in range(meta.num_layers)]

    def depth_at(self, layer: int) -> int:
        """How many layers ahead ``layer`` predicts: ``depth``, clipped at the last layer."""
        return max(0, min(self.depth, self.meta.num_layers - 1 - layer))

    def _fuse(self, layer: int) -> MLPParams:
        mlps = [self.params[(layer, d)] for d in range(1, self.depth_at(layer) + 1)]
        return [(w.to(self.device), b.to(self.device)) for w, b in _fuse_mlps(mlps)] if mlps else []

    def _fuse_prior(self, layer: int) -> torch.Tensor | None:
        """``[2, depth_at * E]``, or None where the prior reads nothing (format 1, no previous token)."""
        if self.prior is None or not self.spec.use_prev_token or not self.depth_at(layer):
            return None
        w = torch.stack([self.prior[(layer, d)] for d in range(1, self.depth_at(layer) + 1)])  # [D, 2]
        return w.T.repeat_interleave(self.meta.num_experts, dim=1).contiguous().to(self.device)

    def features(self, layer: int, experts: torch.Tensor, weights: torch.Tensor | None,
                 prev_experts: torch.Tensor | None) -> torch.Tensor:
        """This predictor's feature rows (see :func:`features.layer_features` for the inputs)."""
        return layer_features(layer, experts, weights, prev_experts, spec=self.spec,
                              num_layers=self.meta.num_layers, num_experts=self.meta.num_experts)

    def predict(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``[B, depth_at(layer), E]`` probabilities (calibrated in format 2); index 0 is layer+1. Pure torch,
        on ``self.device``."""
        mats = self._fused[layer]
        if not mats:
            return feats.new_zeros(feats.shape[0], 0, self.meta.num_experts)
        h = feats
        for w, b in mats[:-1]:
            h = torch.addmm(b, h, w).relu_()
        w, b = mats[-1]
        z = torch.addmm(b, h, w)
        prior = self._prior[layer]
        if prior is not None:
            E = self.meta.num_experts
            prev = prev_token_targets(feats, layer, self.depth_at(layer), spec=self.spec, num_experts=E)
            sim = prev_token_similarity(feats, layer, spec=self.spec, num_experts=E, top_k=self.meta.top_k)
            z.addcmul_(prev, torch.addcmul(prior[0], sim, prior[1]))
        return z.sigmoid_().view(feats.shape[0], -1, self.meta.num_experts)

    def to(self, device: str | torch.device) -> LayerPredictor:
        return LayerPredictor(self.meta, self.depth, self.spec, self.hidden, self.params, self.training, device,
                              self.prior)

    def config(self) -> dict:
        return {**self.meta.as_dict(), "depth": self.depth, "features": self.spec.as_dict(),
                "hidden": list(self.hidden), "activation": "relu", "output": "sigmoid",
                "prior": None if self.prior is None else ["prev_token", "prev_token_x_similarity"],
                "training": self.training}

    def save(self, path: str | Path) -> None:
        """One safetensors file (format 2), written atomically."""
        if self.prior is None:
            raise PredictorError("this predictor was loaded from a format-1 file; retrain it to save it "
                                 f"in format 2 ({RETRAIN})")
        tensors = {}
        for (layer, d), mlp in self.params.items():
            for i, (w, b) in enumerate(mlp):
                tensors[f"layer{layer}.depth{d}.coef{i}"] = w.detach().cpu().contiguous()
                tensors[f"layer{layer}.depth{d}.intercept{i}"] = b.detach().cpu().contiguous()
            tensors[f"layer{layer}.depth{d}.prior"] = self.prior[(layer, d)].detach().cpu().contiguous()
        blob = save_safetensors(tensors, metadata={"format": FORMAT, "config": json.dumps(self.config())})
        atomic_write_bytes(path, blob)


def train_predictor(traces: list[str | Path], *, depth: int, window: int = 4, hidden: tuple[int, ...] = (64,),
                    alpha: float = 1.0, holdout: float = 0.2, seed: int = 0, max_iter: int = 200,
                    use_prev_token: bool = True, phases: tuple[str, ...] = ("decode",), jobs: int = 1,
                    log: Callable[[str], None] | None = None) -> LayerPredictor:
    """Read the traces and fit the predictor on the tokens of ``phases`` (:func:`fit_predictor`)."""
    arrays = load_arrays(traces)
    spec = FeatureSpec(window=window, use_prev_token=use_prev_token, weighted=arrays.has_weights)
    training = {"traces": [str(Path(t).resolve()) for t in traces], "requests": arrays.requests,
                "tokens": arrays.phase_counts(), "phases": list(phases)}
    return fit_predictor(arrays.select(phases), depth=depth, spec=spec, hidden=hidden, alpha=alpha, holdout=holdout,
                         seed=seed, max_iter=max_iter, jobs=jobs, training=training, log=log)


def read_predictor_file(path: Path, formats: tuple[str, ...], retrain: str,
                        remedy: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A predictor file's metadata and tensors, if it is a safetensors file of one of ``formats``;
    otherwise a ``PredictorError`` naming ``retrain`` (the command that makes one) or, for a file of
    another format, ending in ``remedy``."""
    if not path.is_file():
        raise PredictorError(f"predictor {path} does not exist; train one with {retrain}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors input
        raise PredictorError(f"{path} is not a readable predictor file: {exc}") from exc
    if header.get("format") not in formats:
        raise PredictorError(f"{path} is not a {formats[0]} file (format {header.get('format')!r}); {remedy}")
    return header, tensors


def check_fits(path: Path, meta: TraceMeta, expect: TraceMeta | tuple[str, int, int, int] | None,
               retrain: str) -> None:
    """A predictor trained for ``meta`` used with ``expect``: another shape is an error, another model
    name of the same shape (a renamed or re-quantised checkpoint) only a warning."""
    if expect is None:
        return
    want = expect if isinstance(expect, TraceMeta) else TraceMeta(*expect)
    if (want.num_layers, want.num_experts, want.top_k) != (meta.num_layers, meta.num_experts, meta.top_k):
        raise PredictorError(
            f"predictor {path} was trained for {meta.model!r} ({describe_shape(meta)}) but is used with "
            f"{want.model!r} ({describe_shape(want)}); retrain on a trace of this model with {retrain}")
    if want.model != meta.model:
        warnings.warn(f"predictor {path} was trained on traces of {meta.model!r}, used with {want.model!r} "
                      f"(same shape: {describe_shape(meta)})", stacklevel=3)


def load_predictor(path: str | Path, expect: TraceMeta | tuple[str, int, int, int] | None = None,
                   device: str | torch.device = "cpu") -> LayerPredictor:
    """Load a predictor (format 2, or format 1 without prior terms), checking it fits ``expect`` = the
    model it will serve (a TraceMeta or ``(model, num_layers, num_experts, top_k)``). A different shape
    is an error; a different model name with the same shape only a warning (e.g. a renamed or
    re-quantised checkpoint)."""
    path = Path(path)
    header, tensors = read_predictor_file(path, (FORMAT, FORMAT_V1), RETRAIN, f"retrain with {RETRAIN}")
    try:
        cfg = json.loads(header["config"])
        meta = TraceMeta(cfg["model"], cfg["num_layers"], cfg["num_experts"], cfg["top_k"])
        spec = FeatureSpec.from_dict(cfg["features"])
        depth, hidden, training = cfg["depth"], tuple(cfg["hidden"]), cfg["training"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PredictorError(f"{path} has malformed predictor metadata ({exc}); retrain with {RETRAIN}") from exc
    check_fits(path, meta, expect, RETRAIN)
    n_mlp_layers = len(hidden) + 1
    has_prior = header["format"] == FORMAT
    params, prior = {}, {} if has_prior else None
    for layer in range(meta.num_layers):
        for d in range(1, min(depth, meta.num_layers - 1 - layer) + 1):
            name = f"layer{layer}.depth{d}"
            try:
                params[(layer, d)] = [(tensors[f"{name}.coef{i}"], tensors[f"{name}.intercept{i}"])
                                      for i in range(n_mlp_layers)]
                if has_prior:
                    prior[(layer, d)] = tensors[f"{name}.prior"]
            except KeyError as exc:
                raise PredictorError(f"{path} lacks tensor {exc}; retrain with {RETRAIN}") from exc
    return LayerPredictor(meta, depth, spec, hidden, params, training, device, prior)

"""The predictor's input features: one torch function for training and for serving.

Training (on a trace converted to tensors) and inference (on the runtime's device) both
call :func:`layer_features`, so the two cannot drift apart: a model is only ever fed the exact
encoding it was fitted on. The encoding is described by a :class:`FeatureSpec` that is stored in
the predictor file.

Layout of one token's feature row at source layer ``l`` (``E`` experts, ``L`` layers)::

    [ window slot 0 | ... | window slot W-1 | prev-token layer 0 | ... | prev-token layer L-1 ]
      each slot is an E-wide weighted multi-hot of the current token's top-k at layers
      l-W+1 .. l (slots before layer 0 stay zero);  each prev-token block is an E-wide
      multi-hot (value 1) of the previous token's top-k at that layer (all zero when there is
      no previous token). The prev-token part is absent when ``use_prev_token`` is off.

Expert ids below zero mean "unknown" and encode as zeros, which is how a missing previous token
is passed (``-1`` everywhere, as ``Trace.expert_array`` writes nulls).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

FEATURE_VERSION = 1


@dataclass(frozen=True)
class FeatureSpec:
    """Hyper-parameters of the encoding; saved with the model because they define its input."""

    window: int = 4
    use_prev_token: bool = True
    # False when the training traces had no router weights: the top-k is then encoded uniformly
    # (1 each) and the runtime's real weights must be ignored to match what the model saw.
    weighted: bool = True
    version: int = FEATURE_VERSION

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"feature window must be at least 1 layer, got {self.window}")
        if self.version != FEATURE_VERSION:
            raise ValueError(f"feature encoding version {self.version} is not supported "
                             f"(this code writes version {FEATURE_VERSION})")

    def num_features(self, num_layers: int, num_experts: int) -> int:
        return (self.window + (num_layers if self.use_prev_token else 0)) * num_experts

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(**d)


def layer_features(layer: int, experts: torch.Tensor, weights: torch.Tensor | None,
                   prev_experts: torch.Tensor | None, *, spec: FeatureSpec, num_layers: int,
                   num_experts: int) -> torch.Tensor:
    """Feature rows ``[B, F]`` (float32, on ``experts.device``) for B tokens at source ``layer``.

    ``experts``/``weights``: ``[B, n, k]`` the current tokens' routing at layers ``0..n-1`` with
    ``n > layer`` (only layers ``layer-W+1..layer`` are read, so a runtime may pass a buffer whose
    later layers are not filled yet). ``weights`` may be None (uniform). ``prev_experts``:
    ``[B, num_layers, k]`` the previous token's routing, ``-1`` where there is none; ignored when
    the spec does not use it (may then be None).
    """
    if experts.shape[1] <= layer:
        raise ValueError(f"features for layer {layer} need the routing of layers 0..{layer}, "
                         f"got {experts.shape[1]} layers")
    B, k = experts.shape[0], experts.shape[2]
    E, W = num_experts, spec.window
    out = torch.zeros(B, spec.num_features(num_layers, E), dtype=torch.float32, device=experts.device)

    lo = max(0, layer - W + 1)
    ids = experts[:, lo:layer + 1]
    # router weights x k: mean 1 over the top-k, the scale of the previous-token block. Unscaled
    # (1/k each) the informative part was 8x smaller at top-8 and the MLP learned it far worse.
    if spec.weighted and weights is not None:
        val = weights[:, lo:layer + 1].to(torch.float32) * k
    else:
        val = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
    window = out[:, :W * E].view(B, W, E)[:, W - ids.shape[1]:]
    window.scatter_add_(2, ids.clamp(min=0), val * (ids >= 0))

    if spec.use_prev_token:
        if prev_experts is None:
            raise ValueError("this predictor's features use the previous token's experts; pass prev_experts "
                             "(-1 where there is no previous token)")
        prev = out[:, W * E:].view(B, num_layers, E)
        prev.scatter_add_(2, prev_experts.clamp(min=0), (prev_experts >= 0).to(torch.float32))
    return out


def prev_token_targets(feats: torch.Tensor, layer: int, count: int, *, spec: FeatureSpec,
                       num_experts: int) -> torch.Tensor:
    """``[B, count * E]``: the previous token's multi-hot at layers ``layer+1 .. layer+count``, read back
    from feature rows (a view, no copy). The predictor's prior scores these experts up: the targets'
    blocks are adjacent in the layout, so all depths of a source layer are one slice."""
    start = (spec.window + layer + 1) * num_experts
    return feats[:, start:start + count * num_experts]


def prev_token_similarity(feats: torch.Tensor, layer: int, *, spec: FeatureSpec, num_experts: int,
                          top_k: int) -> torch.Tensor:
    """``[B, 1]``: the share of the current token's router weight at ``layer`` that falls on experts the
    previous token also used there (0..1; with uniform weights the overlap of the two top-k over k).
    A token that repeats the previous one's experts so far repeats them further on: on the bundled
    training trace the previous token's recall@2 one layer ahead is 0.31 after no shared expert at
    layer 0 and 0.55 after both, so the prior's previous-token weight grows with this."""
    E, W = num_experts, spec.window
    current = feats[:, (W - 1) * E:W * E]  # the window's last slot is the source layer
    prev = feats[:, (W + layer) * E:(W + layer + 1) * E]
    return (current * prev).sum(1, keepdim=True) / top_k

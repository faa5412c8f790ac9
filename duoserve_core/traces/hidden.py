"""Hidden states in traces: each token's MoE-layer input, compressed by a per-layer PCA.

A layer-aware predictor (PreScope's LLaPor, ``predict/llapor.py``) reads the hidden state the
router reads. Stored raw it would be 256 floats per (token, layer) on the bundled model and 4,096
on Mixtral-8x7B: too much for every row of a trace, and too wide an input for an MLP that has to
run in tens of microseconds. A PCA per layer keeps the directions that vary most; on the bundled
model 32 of 256 dimensions keep 45-56% of each layer's variance (``HiddenBasis.explained``), enough
for LLaPor to match the speculative gate one layer ahead (docs/llapor.md).

Format (additive to ``duoserve-trace/1``: readers that do not know it ignore both parts)::

    column       hidden_pca  list<float32>  the D coordinates of the token's MoE input at this
                                            layer in that layer's PCA basis
    metadata key hidden_pca  JSON: dims, hidden_size, per-layer mean [L, H] and components
                             [L, D, H] (float32, little-endian, base64), the variance share of
                             each component, what the basis was fitted on, a fingerprint

The basis lives in the trace's own Parquet metadata rather than in a side file because the
coordinates mean nothing without it: one file cannot lose half of itself when it is copied or
renamed, and ``read_trace`` (old or new) reads only the metadata keys it knows. It is small next
to the column: L x (D + 1) x H x 4 bytes, 270 KB on the bundled model (the column: 20 MB for the
held-out trace's 19,185 tokens x 8 layers x 32 floats), 17 MB at Mixtral-8x7B's 32 x 4096.

Two traces compared by one predictor must share a basis: a predictor trained on one trace's
coordinates cannot read another basis's. So a held-out trace is recorded with the training
trace's basis (``record --hidden-basis TRAIN.parquet``) instead of a PCA of its own; the
fingerprint says whether two traces (or a trace and a predictor) agree.

Recording: a torch forward pre-hook on every MoE block (``layer.mlp``) sees the block's input,
the very tensor the router and the speculative gate read, just before the executor reports that
layer's routing to the trace recorder. Hooks are torch's public way to observe a module; nothing
of the executor's is patched. Without a basis the inputs are kept until the end (in the compute
dtype: 152 MB for the bundled training trace in fp32 on the CPU; a Mixtral-8x7B trace of 20,000
tokens would need 5 GB in bf16, so fit its basis on a smaller recording and record the rest with
it) and the PCA is fitted on all of them, prefill and decode.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

HIDDEN_COLUMN = "hidden_pca"
META_KEY = "hidden_pca"


def _trace_error(message: str) -> Exception:
    from . import TraceError  # the package imports this module; its error class is defined there
    return TraceError(message)


def _encode(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _decode(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape).astype(np.float32)


@dataclass(frozen=True, eq=False)
class HiddenBasis:
    """One PCA per layer: ``coords = (h - mean[l]) @ components[l].T``."""

    mean: np.ndarray        # [L, H] float32
    components: np.ndarray  # [L, D, H] float32, orthonormal rows, by decreasing variance
    explained: np.ndarray   # [L, D] share of the layer's variance each component carries (fitting tokens)
    fitted_on: str          # what the basis was fitted on, for people

    @property
    def num_layers(self) -> int:
        return self.components.shape[0]

    @property
    def dims(self) -> int:
        return self.components.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.components.shape[2]

    def fingerprint(self) -> str:
        """Identifies the basis: equal fingerprints, interchangeable coordinates."""
        digest = hashlib.sha256(np.ascontiguousarray(self.mean, "<f4").tobytes())
        digest.update(np.ascontiguousarray(self.components, "<f4").tobytes())
        return digest.hexdigest()[:16]

    def project(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, H]`` hidden states (any float dtype) -> ``[n, D]`` float32 coordinates on the CPU."""
        h = hidden.detach().to("cpu", torch.float32)
        return (h - torch.from_numpy(self.mean[layer])) @ torch.from_numpy(self.components[layer]).T

    def to_json(self) -> str:
        return json.dumps({"dims": self.dims, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                           "fitted_on": self.fitted_on, "fingerprint": self.fingerprint(),
                           "explained": self.explained.round(6).tolist(),
                           "mean": _encode(self.mean), "components": _encode(self.components)})

    @classmethod
    def from_json(cls, text: str, where: str) -> HiddenBasis:
        try:
            d = json.loads(text)
            L, D, H = int(d["num_layers"]), int(d["dims"]), int(d["hidden_size"])
            basis = cls(_decode(d["mean"], (L, H)), _decode(d["components"], (L, D, H)),
                        np.asarray(d["explained"], dtype=np.float32).reshape(L, D), str(d["fitted_on"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise _trace_error(f"{where} has a malformed '{META_KEY}' basis in its metadata ({exc}); record it "
                               "again with --hidden-dims") from exc
        if basis.fingerprint() != d.get("fingerprint"):
            raise _trace_error(f"{where}: the '{META_KEY}' basis does not match its fingerprint; the file is damaged")
        return basis


def fit_basis(hidden: list[torch.Tensor], dims: int, fitted_on: str) -> HiddenBasis:
    """A ``dims``-component PCA of each layer's ``[n, H]`` hidden states (float64 covariance, eigh).

    Each component's sign is fixed (its largest entry positive) so that a refit gives the same basis."""
    H = hidden[0].shape[1]
    if not 1 <= dims <= H:
        raise _trace_error(f"--hidden-dims {dims}: the model's hidden size is {H}; choose 1..{H}")
    means, comps, explained = [], [], []
    for h in hidden:
        x = h.to(torch.float64)
        mean = x.mean(0)
        xc = x - mean
        values, vectors = torch.linalg.eigh(xc.T @ xc / max(1, x.shape[0]))
        order = torch.argsort(values, descending=True)[:dims]
        top = vectors[:, order].T  # [D, H]
        sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        means.append(mean.float().numpy())
        comps.append((top * sign).float().numpy())
        explained.append((values[order] / values.clamp(min=0).sum().clamp(min=1e-30)).float().numpy())
    return HiddenBasis(np.stack(means), np.stack(comps), np.stack(explained), fitted_on)


class HiddenCapture:
    """Forward pre-hooks on a runtime's MoE blocks: each block's input, in the order routing is reported.

    Use as a context manager around the generation; ``column`` then gives the trace's ``hidden_pca``
    values for the recorder's rows. With a ``basis`` the inputs are projected as they come (nothing
    large is kept); with ``dims`` they are kept and ``column`` fits the basis on all of them.
    """

    def __init__(self, runtime, *, dims: int | None = None, basis: HiddenBasis | None = None):
        if (dims is None) == (basis is None):
            raise ValueError("pass either dims (fit a basis on this recording) or basis (project with it)")
        c = runtime.config
        if basis is not None and (basis.num_layers, basis.hidden_size) != (c.num_hidden_layers, c.hidden_size):
            raise _trace_error(
                f"the hidden-state basis is for {basis.num_layers} layers of hidden size {basis.hidden_size}; "
                f"the model has {c.num_hidden_layers} of {c.hidden_size}. Use a basis recorded on this model")
        if dims is not None and not 1 <= dims <= c.hidden_size:
            raise _trace_error(f"--hidden-dims {dims}: the model's hidden size is {c.hidden_size}; "
                               f"choose 1..{c.hidden_size}")
        self.blocks = [layer.mlp for layer in runtime.skeleton.model.layers]
        self.dims, self.basis = dims, basis
        self.chunks: list[tuple[int, torch.Tensor]] = []  # (layer, [tokens, H or D]) per MoE call, in call order
        self._handles: list = []

    def _hook(self, block, args) -> None:
        h = args[0].detach()
        h = h.reshape(-1, h.shape[-1])
        layer = block.layer
        self.chunks.append((layer, self.basis.project(layer, h) if self.basis is not None else h.cpu()))

    def __enter__(self) -> HiddenCapture:
        self._handles = [block.register_forward_pre_hook(self._hook) for block in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def column(self, df: pd.DataFrame, fitted_on: str) -> tuple[pd.Series, HiddenBasis]:
        """``hidden_pca`` values for the recorder's rows ``df`` (in its row order) and the basis used."""
        layers = np.concatenate([np.full(c.shape[0], layer) for layer, c in self.chunks]) if self.chunks else []
        if len(layers) != len(df) or (np.asarray(layers) != df["layer"].to_numpy()).any():
            raise RuntimeError("hidden states and routing rows are out of step: every MoE block's input must be "
                               "captured exactly once per routed layer")
        basis = self.basis
        if basis is None:
            L = len(self.blocks)
            per_layer = [torch.cat([c for layer, c in self.chunks if layer == l]) for l in range(L)]
            basis = fit_basis(per_layer, self.dims, fitted_on)
            coords = [basis.project(layer, c) for layer, c in self.chunks]
        else:
            coords = [c for _, c in self.chunks]
        flat = torch.cat(coords).numpy().astype(np.float32)
        return pd.Series(list(flat), index=df.index, dtype=object), basis


def hidden_array(df: pd.DataFrame, num_layers: int, dims: int, where: str) -> np.ndarray:
    """``[tokens, layers, D]`` float32 from rows sorted by request, token and layer."""
    if HIDDEN_COLUMN not in df.columns or df[HIDDEN_COLUMN].isna().any():
        raise _trace_error(f"{where} holds no hidden states; record it with "
                           "python -m duoserve_core.traces record ... --hidden-dims 32")
    values = np.stack(df[HIDDEN_COLUMN].to_numpy()).astype(np.float32, copy=False)
    return values.reshape(len(df) // num_layers, num_layers, dims)


def read_hidden(path: str | Path) -> tuple[np.ndarray, HiddenBasis]:
    """A trace file's ``[tokens, layers, D]`` coordinates and basis, reading only the columns needed
    (in ``read_trace``'s token order: sorted by request, token and layer)."""
    if not Path(path).is_file():
        raise _trace_error(f"trace {path} does not exist")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise _trace_error(f"{path} is not a readable Parquet trace: {exc}") from exc
    if HIDDEN_COLUMN not in schema.names:
        raise _trace_error(f"{path} holds no hidden states; record it with "
                           "python -m duoserve_core.traces record ... --hidden-dims 32")
    raw = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if META_KEY not in raw or "num_layers" not in raw:
        raise _trace_error(f"{path} has a '{HIDDEN_COLUMN}' column but no PCA basis for it in its metadata")
    basis = HiddenBasis.from_json(raw[META_KEY], str(path))
    df = pq.read_table(path, columns=["request_id", "token_index", "layer", HIDDEN_COLUMN]).to_pandas()
    df = df.sort_values(["request_id", "token_index", "layer"], kind="stable")
    return hidden_array(df, int(raw["num_layers"]), basis.dims, str(path)), basis

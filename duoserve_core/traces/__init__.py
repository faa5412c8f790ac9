"""Activation traces: which experts every token used at every layer.

Format (version 1, kept stable because the predictor, the simulator and the notebooks read it):
one Parquet row per (request, token, layer) with columns

    request_id   int      which prompt
    token_index  int      position in the sequence (prompt tokens first, then generated ones)
    phase        string   "prefill" or "decode"
    layer        int
    experts      list<int>    the top-k expert ids, in router order (highest weight first)
    weights      list<float>  the renormalised top-k weights; optional column, may be null
    probs        list<float>  the full softmax over experts; optional column
    spec_experts list<int>    optional: layer+1's router applied to this layer's MoE input
                              (the speculative gate of mixtral-offloading/AdapMoE); null at the last layer
    hidden_pca   list<float>  optional: this layer's MoE input compressed by a per-layer PCA, whose
                              basis is in the metadata key ``hidden_pca`` (see ``traces.hidden``)
    llapor_experts list<int>  optional: LLaPor's top-k guess at layer+1's experts (``predict.llapor
                              annotate``), shaped like ``spec_experts``; null at the last layer

and file metadata ``model``, ``num_layers``, ``num_experts``, ``top_k`` (plus ``format``). Readers
accept any number of experts and any top-k, and traces with only ``experts``. The optional columns
and metadata keys are additive: a reader that does not know them reads the rest as before.

    python -m duoserve_core.traces record --model PATH --prompts FILE --max-new-tokens N --out T.parquet
        [--hidden-dims 32 | --hidden-basis TRAIN.parquet]
    python -m duoserve_core.traces expand --trace T.parquet --layers 32 --out T32.parquet
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import DuoServeError
from ..atomic import atomic_write_bytes
from ..progress import progress
from .hidden import HIDDEN_COLUMN, META_KEY as HIDDEN_META_KEY, HiddenBasis, HiddenCapture, hidden_array

FORMAT = "duoserve-trace/1"
REQUIRED_COLUMNS = ("request_id", "token_index", "phase", "layer", "experts")
META_KEYS = ("model", "num_layers", "num_experts", "top_k")


class TraceError(DuoServeError, ValueError):
    """A trace file is missing, malformed, or would be overwritten."""


@dataclass
class TraceMeta:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    # the PCA basis of the ``hidden_pca`` column, where the trace has one; not part of the shape
    hidden_basis: HiddenBasis | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "top_k": self.top_k}


@dataclass
class Trace:
    """A trace in memory: the rows as a DataFrame, sorted by request, token and layer."""

    df: pd.DataFrame
    meta: TraceMeta

    @property
    def has_weights(self) -> bool:
        return "weights" in self.df and self.df["weights"].notna().all()

    def tokens(self) -> pd.DataFrame:
        """One row per (request, token) with its phase: the index of ``expert_array``."""
        first = self.df[self.df["layer"] == 0]
        return first[["request_id", "token_index", "phase"]].reset_index(drop=True)

    def expert_array(self, column: str = "experts") -> np.ndarray:
        """``[tokens, layers, top_k]`` int array of expert ids (``-1`` where a list is null)."""
        n_tok, L, k = len(self.tokens()), self.meta.num_layers, self.meta.top_k
        values = self.df[column].map(lambda v: v if v is not None else [-1] * k)
        arr = np.asarray(values.tolist(), dtype=np.int64)
        return arr.reshape(n_tok, L, k)

    def weight_array(self) -> np.ndarray:
        """``[tokens, layers, top_k]`` float array of router weights (uniform where absent)."""
        n_tok, L, k = len(self.tokens()), self.meta.num_layers, self.meta.top_k
        if not self.has_weights:
            return np.full((n_tok, L, k), 1.0 / k, dtype=np.float32)
        return np.asarray(self.df["weights"].tolist(), dtype=np.float32).reshape(n_tok, L, k)

    def hidden_array(self) -> np.ndarray:
        """``[tokens, layers, D]`` float32 PCA coordinates of the MoE inputs (``hidden_pca``)."""
        basis = self.meta.hidden_basis
        if basis is None:
            raise TraceError(f"this trace of {self.meta.model} holds no hidden states; record it with "
                             "python -m duoserve_core.traces record ... --hidden-dims 32")
        return hidden_array(self.df, self.meta.num_layers, basis.dims, f"this trace of {self.meta.model}")


def write_trace(path: str | Path, df: pd.DataFrame, meta: TraceMeta, *, overwrite: bool = False) -> None:
    """Validate and write atomically; refuse to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise TraceError(f"{path} exists; choose another --out or pass --force to replace it")
    _validate(df, meta, str(path))
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    extra = {} if meta.hidden_basis is None else {HIDDEN_META_KEY.encode(): meta.hidden_basis.to_json().encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"format": FORMAT.encode(),
                                           **{k.encode(): str(v).encode() for k, v in meta.as_dict().items()},
                                           **extra})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_trace(path: str | Path) -> Trace:
    """Read and check a trace; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise TraceError(f"{path} is not a readable Parquet trace: {exc}") from exc
    raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    missing = [k for k in META_KEYS if k not in raw]
    if missing:
        raise TraceError(f"{path} lacks trace metadata {missing}; was it written by duoserve_core.traces?")
    try:
        meta = TraceMeta(raw["model"], int(raw["num_layers"]), int(raw["num_experts"]), int(raw["top_k"]))
    except ValueError as exc:
        raise TraceError(f"{path} has malformed metadata: {exc}") from exc
    if HIDDEN_META_KEY in raw:
        meta.hidden_basis = HiddenBasis.from_json(raw[HIDDEN_META_KEY], str(path))
    df = table.to_pandas()
    _validate(df, meta, str(path))
    df = df.sort_values(["request_id", "token_index", "layer"], kind="stable").reset_index(drop=True)
    return Trace(df, meta)


def _validate(df: pd.DataFrame, meta: TraceMeta, where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(f"{where} lacks columns {missing}; a trace needs {list(REQUIRED_COLUMNS)}")
    if not (1 <= meta.top_k <= meta.num_experts and meta.num_layers >= 1):
        raise TraceError(f"{where}: metadata top_k={meta.top_k}, num_experts={meta.num_experts}, "
                         f"num_layers={meta.num_layers} are inconsistent")
    bad_phase = set(df["phase"].unique()) - {"prefill", "decode"}
    if bad_phase:
        raise TraceError(f"{where}: phase must be 'prefill' or 'decode', found {sorted(bad_phase)}")
    if len(df) and (df["layer"].min() < 0 or df["layer"].max() >= meta.num_layers):
        raise TraceError(f"{where}: layer outside 0..{meta.num_layers - 1}")
    lengths = df["experts"].map(len)
    if len(df) and (lengths != meta.top_k).any():
        raise TraceError(f"{where}: every 'experts' list must hold top_k={meta.top_k} ids")
    flat = np.concatenate(df["experts"].to_numpy()) if len(df) else np.zeros(0)
    if len(flat) and (flat.min() < 0 or flat.max() >= meta.num_experts):
        raise TraceError(f"{where}: expert id outside 0..{meta.num_experts - 1}")
    per_token = df.groupby(["request_id", "token_index"])["layer"].nunique()
    if len(df) and (per_token != meta.num_layers).any():
        raise TraceError(f"{where}: every (request, token) must have a row for each of the {meta.num_layers} layers")
    if HIDDEN_COLUMN in df.columns:
        basis = meta.hidden_basis
        if basis is None:
            raise TraceError(f"{where} has a '{HIDDEN_COLUMN}' column but no PCA basis for it in its metadata")
        if basis.num_layers != meta.num_layers:
            raise TraceError(f"{where}: the '{HIDDEN_COLUMN}' basis is for {basis.num_layers} layers, "
                             f"the trace has {meta.num_layers}")
        if len(df) and (df[HIDDEN_COLUMN].map(lambda v: -1 if v is None else len(v)) != basis.dims).any():
            raise TraceError(f"{where}: every '{HIDDEN_COLUMN}' list must hold the basis's {basis.dims} coordinates")


class TraceRecorder:
    """Collects the routing of every token at every layer while the runtime generates.

    Before each layer's routing of each request in a forward, the executor tells it where that
    request's tokens sit (``begin_step``) and their routing (``routed``): a batched forward is
    several requests' rows. Rows are assembled once, at the end.
    """

    def __init__(self, *, keep_probs: bool = False):
        self.keep_probs = keep_probs
        self._rows: list[dict] = []
        self._step: tuple[int, str, int] | None = None

    def begin_step(self, request_id: int, phase: str, first_position: int) -> None:
        self._step = (request_id, phase, first_position)

    def routed(self, layer: int, topk: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor,
               spec_topk: torch.Tensor | None) -> None:
        request_id, phase, first = self._step
        for t in range(topk.shape[0]):
            row = {"request_id": request_id, "token_index": first + t, "phase": phase, "layer": layer,
                   "experts": topk[t].tolist(), "weights": weights[t].tolist(),
                   "spec_experts": None if spec_topk is None else spec_topk[t].tolist()}
            if self.keep_probs:
                row["probs"] = probs[t].tolist()
            self._rows.append(row)

    def dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows)


def replayed_probabilities(top_idx: torch.Tensor, top_w: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The router probabilities a policy reads under a replayed routing: each token's replayed weights at
    its routed experts and 0 elsewhere (``[tokens, num_experts]``, float32, on ``top_idx``'s device). The
    runtime's host and device routing and the simulator all take them from here, so a policy decides on
    the same numbers in each."""
    return torch.zeros(top_idx.shape[0], num_experts, device=top_idx.device).scatter_(1, top_idx, top_w.float())


class RoutingReplay:
    """Routing taken from a trace, so that synthesized weights see realistic expert reuse.

    Request ``r`` of a run replays the trace's request ``r mod R``; the token at position ``p``
    takes the routing of that request's token ``p mod n`` (its ``n`` recorded tokens), so runs
    longer than the trace wrap around instead of failing. Weights come from the trace, or are
    uniform where it has none.

    A model with more layers than the trace (Mixtral-8x7B's 32 against the bundled model's 8)
    reuses the trace's layers in blocks: model layer ``l`` replays trace layer ``l mod L`` with the
    expert ids of block ``l // L`` relabelled by a fixed permutation. Per-layer statistics (load
    balance, repeats across tokens) and layer-to-layer affinity inside a block are the trace's;
    blocks do not repeat each other, so nothing can be predicted across them for free. The number
    of experts and top-k must match.

    Where the trace holds the speculative gate's guesses (``spec_experts``), ``speculation`` replays
    them too, relabelled like the layer they guess: on synthesized weights the model's own gate
    would guess at a routing the replay then overrides.
    """

    def __init__(self, trace: Trace, num_layers: int, num_experts: int, top_k: int, seed: int = 0):
        m = trace.meta
        if (m.num_experts, m.top_k) != (num_experts, top_k):
            raise TraceError(
                f"routing trace of {m.model} routes over {m.num_experts} experts, top-{m.top_k}; the model has "
                f"{num_experts} experts, top-{top_k}. Record a routing trace of a model with the same experts")
        if len(trace.df) == 0:
            raise TraceError("the routing trace holds no tokens: nothing to replay; record one with "
                             "python -m duoserve_core.traces record (or synth)")
        self.trace_layers, self.trace_model = m.num_layers, m.model
        generator = torch.Generator().manual_seed(seed)
        blocks = -(-num_layers // m.num_layers)
        self.relabel = [torch.arange(num_experts) if b == 0 else torch.randperm(num_experts, generator=generator)
                        for b in range(blocks)]
        tokens = trace.tokens()
        experts = torch.tensor(trace.expert_array())
        weights = torch.tensor(trace.weight_array())
        has_spec = "spec_experts" in trace.df and trace.df["spec_experts"].notna().any()
        spec = torch.tensor(trace.expert_array("spec_experts")) if has_spec else None
        self.requests, self.spec = [], []
        for _, rows in tokens.groupby("request_id", sort=True):
            order = torch.tensor(rows.sort_values("token_index").index.to_numpy())
            self.requests.append((experts[order], weights[order]))
            self.spec.append(None if spec is None else spec[order])

    def routing(self, request_id: int, first_position: int, n_tokens: int, layer: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(experts [n, k] int64, weights [n, k] float32)`` for positions ``first .. first+n-1``."""
        experts, weights = self.requests[request_id % len(self.requests)]
        positions = torch.arange(first_position, first_position + n_tokens) % experts.shape[0]
        block, trace_layer = divmod(layer, self.trace_layers)
        return self.relabel[block][experts[positions, trace_layer]], weights[positions, trace_layer]

    def token(self, request_id: int, position: int, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``routing(request_id, position, 1, layer)`` of every layer at once: ``(experts [num_layers, k],
        weights [num_layers, k])``, one lookup a block of the trace's layers instead of one a layer."""
        experts, weights = self.requests[request_id % len(self.requests)]
        position %= experts.shape[0]
        blocks = -(-num_layers // self.trace_layers)
        return (torch.cat([self.relabel[b][experts[position]] for b in range(blocks)])[:num_layers],
                weights[position].repeat(blocks, 1)[:num_layers])

    def speculation(self, request_id: int, first_position: int, n_tokens: int, layer: int) -> torch.Tensor | None:
        """The gate's recorded guess at layer ``layer + 1``'s experts, ``[n, k]``; ``None`` where the
        trace has none (no ``spec_experts``, or ``layer`` ends a block: the trace's last layer)."""
        spec = self.spec[request_id % len(self.spec)]
        block, trace_layer = divmod(layer, self.trace_layers)
        if spec is None or trace_layer == self.trace_layers - 1:
            return None
        positions = torch.arange(first_position, first_position + n_tokens) % spec.shape[0]
        guess = spec[positions, trace_layer]
        if (guess < 0).any():
            return None
        return self.relabel[block][guess]


def expand_trace(trace: Trace, num_layers: int, seed: int = 0) -> tuple[pd.DataFrame, TraceMeta]:
    """The routing a ``num_layers``-deep model sees when it replays ``trace`` (same blocks and labels
    as ``RoutingReplay``), as trace rows: what a predictor for that model is trained on."""
    m = trace.meta
    replay = RoutingReplay(trace, num_layers, m.num_experts, m.top_k, seed=seed)
    tokens = trace.tokens()
    rows = []
    for request, (_, group) in enumerate(tokens.groupby("request_id", sort=True)):
        group = group.sort_values("token_index")
        n = len(group)
        for layer in range(num_layers):
            experts, weights = replay.routing(request, 0, n, layer)
            spec = replay.speculation(request, 0, n, layer) if layer + 1 < num_layers else None
            for i, (position, phase) in enumerate(zip(group["token_index"], group["phase"])):
                rows.append({"request_id": int(group["request_id"].iloc[0]), "token_index": int(position),
                             "phase": phase, "layer": layer, "experts": experts[i].tolist(),
                             "weights": weights[i].tolist(), "spec_experts": None if spec is None else spec[i].tolist()})
    meta = TraceMeta(f"{m.model} replayed at {num_layers} layers", num_layers, m.num_experts, m.top_k)
    return pd.DataFrame(rows), meta


def read_prompts(path: str | Path) -> list[str]:
    """A text file (one prompt per line) or JSONL with a ``prompt`` field; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}:{number}: a JSONL prompts file needs a 'prompt' field per line") from exc
        else:
            prompts.append(line)
    if not prompts:
        raise TraceError(f"{path} holds no prompts")
    return prompts


def record(runtime, prompts: list[str] | list[list[int]], max_new_tokens: int, *,
           keep_probs: bool = False, hidden_dims: int | None = None,
           hidden_basis: HiddenBasis | None = None, quiet: bool = False) -> tuple[pd.DataFrame, TraceMeta]:
    """Run every prompt through ``runtime`` and return its routing as trace rows.

    With ``hidden_dims`` (a PCA of that many dimensions fitted on this recording) or ``hidden_basis``
    (another trace's PCA, so that both share coordinates) the rows also get each MoE input's
    ``hidden_pca`` coordinates, and the returned meta carries the basis (``traces.hidden``). A bar
    counts the prompts on a terminal (``progress``; ``quiet`` silences it)."""
    recorder = TraceRecorder(keep_probs=keep_probs)
    c = runtime.config
    meta = TraceMeta(runtime.source.name, c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok)
    capture = None
    if hidden_dims is not None or hidden_basis is not None:
        capture = HiddenCapture(runtime, dims=None if hidden_basis is not None else hidden_dims, basis=hidden_basis)
    with capture if capture is not None else contextlib.nullcontext():
        for request_id, prompt in progress(enumerate(prompts), desc="recording", total=len(prompts),
                                           unit="prompt", quiet=quiet):
            kw = {"prompt_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
            runtime.generate(**kw, max_new_tokens=max_new_tokens, recorder=recorder, request_id=request_id)
    df = recorder.dataframe()
    if capture is not None:
        df[HIDDEN_COLUMN], meta.hidden_basis = capture.column(
            df, f"{runtime.source.name}: {df.groupby(['request_id', 'token_index']).ngroups} tokens of "
                f"{len(prompts)} prompts, prefill and decode")
    return df, meta

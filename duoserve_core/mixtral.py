"""The non-expert part of Mixtral, built from transformers' own modules, on the device.

The model is first built on the ``meta`` device (no memory), its MoE blocks are swapped for
``OffloadedMoE`` (which keeps the router and drops the experts), and only then are the
remaining parameters materialised on the device and filled from the tensor source. So the
full model never exists anywhere, and the byte count of what remains is exact before a
single weight is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.mixtral.modeling_mixtral import MixtralAttention, MixtralRotaryEmbedding, apply_rotary_pos_emb

from .checkpoint import TensorSource
from .errors import CheckpointError, SettingError
from .experts.executor import OffloadedMoE
from .nf4 import NF4Linear
from .events import EventBus, SpanEvent
from .kv_cache import Placement, RowKVCache


ATTENTION_QUANT_CHOICES = ("none", "nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# On a GPU, attention runs on torch's memory-efficient kernel (the exact math as a fallback), never on
# cuDNN's, which SDPA would pick on an H200: cuDNN builds an execution plan for every new pair of
# query and key lengths, and in decode the key length grows by one every token, so the first layer of
# every step paid a plan build (40-65 ms a token on the H200, 2026-12-01, against 0.1 ms of attention;
# hidden in runs whose warm-up had already met every length). The efficient kernel takes any mask and
# length without a plan; it has no grouped-query form, so ``grouped_attention`` folds each key/value
# head's query heads into the query axis instead.
GPU_ATTENTION_BACKENDS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def build_skeleton(source: TensorSource, dtype: torch.dtype, attention_quant: str = "none") -> MixtralForCausalLM:
    """Mixtral on the meta device in ``dtype``, every ``layer.mlp`` replaced by an ``OffloadedMoE``.

    With ``attention_quant="nf4"`` the attention projections become ``NF4Linear``: at Mixtral-8x7B
    scale that takes attention from 2.7 GB to 0.75 GB, which is what leaves room for expert slots
    under a budget of 15% of the model.
    """
    if attention_quant not in ATTENTION_QUANT_CHOICES:
        raise SettingError(f"unknown attention quantization {attention_quant!r}; choose one of "
                         + ", ".join(ATTENTION_QUANT_CHOICES))
    config = source.config
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(dtype)  # on meta: free, no transient fp32 copy later
        for index, layer in enumerate(model.model.layers):
            layer.mlp = OffloadedMoE(layer.mlp.gate, index)
            if attention_quant == "nf4":
                for name in PROJECTIONS:
                    linear = getattr(layer.self_attn, name)
                    setattr(layer.self_attn, name, NF4Linear(linear.out_features, linear.in_features))
    return model.eval()


def dense_bytes(model: MixtralForCausalLM) -> int:
    """Bytes of every non-expert parameter and persistent buffer (NF4 data included), exactly."""
    tensors = list(model.parameters()) + [m.q for m in model.modules() if isinstance(m, NF4Linear)] + \
        [m.absmax for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(t.numel() * t.element_size() for t in tensors)


def materialize(model: MixtralForCausalLM, source: TensorSource, device: torch.device) -> None:
    """Allocate the non-expert weights on ``device`` and fill them from ``source``."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(source.dense(name))
            _check_finite(source, name, param)
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):
                weight = source.dense(name + ".weight").to(device)
                _check_finite(source, name + ".weight", weight)
                module.load(weight)
    # Non-persistent buffers (rotary frequencies) were left uninitialised by to_empty.
    model.model.rotary_emb = MixtralRotaryEmbedding(model.config).to(device)


def _check_finite(source: TensorSource, name: str, tensor: torch.Tensor) -> None:
    """A NaN or infinite weight is a corrupt checkpoint: say which tensor (on the device: one reduction)."""
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{source.name}: {name} holds NaN or infinite values; the checkpoint is corrupt: "
                              "save or download it again")


class OffloadedMixtral:
    """A forward pass over transformers' Mixtral modules, one layer at a time, for rows of a batch.

    Written out (rather than calling ``MixtralModel.forward``) for two reasons. The runtime sees
    layer boundaries: the policy hears ``layer_started`` before each attention
    (``on_layer_started``), and attention is a span of its own, which the prefill pipeline and the
    timeline need. And continuous batching needs requests at different positions in one forward:
    transformers' caches hold a batch whose rows advance together, so the KV cache here is one row
    per request (``RowKVCache``) and attention takes per-row positions. The projections, the
    rotary embedding and the norms are transformers' modules; the attention itself is torch's SDPA
    with a mask of the row's own positions (``attend``).
    """

    def __init__(self, model: MixtralForCausalLM, events: EventBus, on_layer_started, kv: RowKVCache, graphs=None,
                 device_routed=None):
        self.model, self.events, self.on_layer_started, self.kv = model, events, on_layer_started, kv
        self.config = model.config
        self.graphs = graphs  # a ``decode_graph.DecodeGraphs``: decode steps' dense part from CUDA graphs
        self.device_routed = device_routed  # an ``experts.device_routing.DeviceRoutedMoE``: resident one-row decode

    @torch.inference_mode()
    def prefill(self, ids: list[int], row: int) -> torch.Tensor:
        """A request's prompt into KV row ``row`` (empty until now): the last position's logits, ``[1, vocab]``
        in fp32."""
        return self._forward([(torch.tensor([ids], device=self.kv.device), [row])])[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], rows: list[int]) -> torch.Tensor:
        """One token per request (``tokens[i]`` for KV row ``rows[i]``), all requests in one forward:
        logits ``[len(rows), vocab]`` in fp32.

        The MoE runs once over every request's token (the union of their experts: one copy of an
        expert serves them all), and each token's output is its own experts' rows summed in the
        fixed order (``experts.executor``); attention reads each row's own keys. So a request's
        tokens do not depend on its batch mates, up to the rounding of a matmul over more rows.
        """
        return self._forward([(torch.tensor(tokens, device=self.kv.device)[:, None], rows)])[0]

    @torch.inference_mode()
    def mixed(self, tokens: list[int], rows: list[int], chunk: list[int], chunk_row: int) -> list[torch.Tensor]:
        """The decode tokens of ``rows`` (as ``decode``) and a chunk of one prompt (``chunk``, continuing KV
        row ``chunk_row``) in one forward: one attention per group, one MoE over all their tokens
        (decode tokens first), so an expert copied for the prompt serves the decode tokens too.
        Returns the decode logits ``[len(rows), vocab]`` (when there are rows) and the chunk's last
        position's ``[1, vocab]``."""
        device = self.kv.device
        groups = [(torch.tensor(tokens, device=device)[:, None], rows)] if rows else []
        return self._forward(groups + [(torch.tensor([chunk], device=device), [chunk_row])])

    def _forward(self, groups: list[tuple[torch.Tensor, list[int]]]) -> list[torch.Tensor]:
        """Every layer over each group's ids ``[B, S]`` with its KV rows (one row's S prompt tokens, or B
        rows' one token each): each group's last-position logits, in fp32."""
        inner = self.model.model
        placements = [self.kv.place(rows, ids.shape[1], self.config.sliding_window) for ids, rows in groups]
        hidden = [inner.embed_tokens(ids) for ids, _ in groups]
        sizes = [h.shape[0] * h.shape[1] for h in hidden]
        width = self.config.hidden_size
        # a decode step alone (B rows of one token): the dense part from the graphs, when the runtime has them
        keys_read = self.graphs.begin(placements[0]) \
            if self.graphs is not None and len(groups) == 1 and groups[0][0].shape[1] == 1 else None
        rotary = [inner.rotary_emb(h, position_ids=at.positions) for h, at in zip(hidden, placements)] \
            if keys_read is None else []  # the graphs compute theirs from the positions
        # one request's decode step with every expert resident: routed on the device, no sync until the logits
        routed = keys_read is not None and self.device_routed is not None and sizes[0] == 1 and self.device_routed.begin()
        for index, layer in enumerate(inner.layers):
            self.on_layer_started(index)
            self.events.emit(SpanEvent("begin", "compute", "attention", index))
            if keys_read is not None:
                attended, normed = self.graphs.layer(index, hidden[0], keys_read)  # the norm is in the span
                hidden = [attended]
            else:
                hidden = [h + attend(layer.self_attn, layer.input_layernorm(h), r, at, self.kv, index)
                          for h, r, at in zip(hidden, rotary, placements)]
            self.events.emit(SpanEvent("end", "compute", "attention", index))
            if routed:
                hidden = [self.device_routed.layer(index, attended, normed)]
                continue
            if keys_read is None:
                tokens = (hidden[0].reshape(1, -1, width) if len(hidden) == 1 else  # no copy for one group
                          torch.cat([h.reshape(-1, width) for h in hidden])[None])  # [1, all tokens, H]
                normed = layer.post_attention_layernorm(tokens)
            moe = layer.mlp(normed.reshape(1, -1, width))[0].split(sizes)
            hidden = [h + part.view_as(h) for h, part in zip(hidden, moe)]
        for at in placements:
            self.kv.advance(at)
        logits = [self.model.lm_head(inner.norm(h[:, -1])).float() for h in hidden]
        if routed:  # queued: the routing log comes back and the host's bookkeeping hears it
            self.device_routed.settle()
        return logits


def attend(attn: MixtralAttention, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], at: Placement,
           kv: RowKVCache, layer: int) -> torch.Tensor:
    """``attn``'s self-attention for ``x`` ``[B, S, H]`` placed in the cache by ``at``: the new keys and
    values go into their rows, then each query attends to its row's visible keys."""
    batch, seq, _ = x.shape
    q, k, v = project(attn, x, rotary)
    keys, values = kv.write_and_read(layer, at, k, v)
    if q.is_cuda:
        out = grouped_attention(q, keys, values, at.grouped_mask(attn.num_key_value_groups), attn.scaling)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=at.mask, scale=attn.scaling,
                                             enable_gqa=attn.num_key_value_groups > 1)
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def project(attn: MixtralAttention, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``[B, S, H]``'s queries, keys and values, ``[B, heads, S, head_dim]``, the rotary embedding applied."""
    batch, seq, _ = x.shape
    q = attn.q_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rotary)
    return q, k, v


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, grouped_mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """SDPA of ``q`` ``[B, H, S, D]`` over ``keys`` and ``values`` ``[B, KVH, W, D]``, query head h reading
    key/value head h // (H / KVH) as transformers' ``repeat_kv`` has it, without repeating the keys and
    values: the G = H / KVH query heads of each key/value head become G x S queries of that head
    (``[B, KVH, G x S, D]``, head-group-major), masked by ``grouped_mask`` (``Placement.grouped_mask``).
    Repeating them instead would write and read G times the rows' keys and values at every layer
    (about 1 GB at batch 64 and 576 keys of Mixtral-8x7B). Runs on ``GPU_ATTENTION_BACKENDS``."""
    b, h, s, d = q.shape
    kv_heads = keys.shape[1]
    folded = q.reshape(b, kv_heads, (h // kv_heads) * s, d)
    with sdpa_kernel(list(GPU_ATTENTION_BACKENDS)):
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=grouped_mask, scale=scale)
    return out.reshape(b, h, s, d)  # the kernel may lay its output out token-major

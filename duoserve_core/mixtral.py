"""The non-expert part of Mixtral, built from transformers' own modules, on the device.

The model is first built on the ``meta`` device (no memory), its MoE blocks are swapped for
``OffloadedMoE`` (which keeps the router and drops the experts), and only then are the
remaining parameters materialised on the device and filled from the tensor source. So the
full model never exists anywhere, and the byte count of what remains is exact before a
single weight is read.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, MixtralForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.mixtral.modeling_mixtral import MixtralAttention, MixtralRotaryEmbedding

from .checkpoint import TensorSource
from .errors import CheckpointError, SettingError
from .experts.executor import OffloadedMoE
from .nf4 import NF4Linear
from .events import EventBus, SpanEvent

# transformers renamed the KV-cache argument of the attention and mask functions from
# ``past_key_values`` to ``cache`` within 5.x (later releases warn on the old name, earlier ones know only it).
CACHE_KWARG = "cache" if "cache" in inspect.signature(MixtralAttention.forward).parameters else "past_key_values"
_MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


ATTENTION_QUANT_CHOICES = ("none", "nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
    """A forward pass over transformers' Mixtral modules, one layer at a time.

    Written out (rather than calling ``MixtralModel.forward``) so that the runtime sees layer
    boundaries: the policy hears ``layer_started`` before each attention (``on_layer_started``),
    and attention is a span of its own, which the prefill pipeline and the timeline need.
    """

    def __init__(self, model: MixtralForCausalLM, events: EventBus, on_layer_started):
        self.model, self.events, self.on_layer_started = model, events, on_layer_started
        self.config = model.config

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Logits of the last position, ``[1, vocab]`` in fp32; ``cache`` is extended."""
        return self.forward_batch([(input_ids, cache)])

    @torch.inference_mode()
    def forward_batch(self, requests: list[tuple[torch.Tensor, DynamicCache]]) -> torch.Tensor:
        """One forward over several requests' new tokens (``[1, S_i]`` ids and the request's own cache
        each): the last position's logits per request, ``[len(requests), vocab]`` in fp32.

        Attention runs per request, on its own cache and positions, so a request's attention is the
        same computation alone or in a batch; the MoE runs once over every request's tokens (the
        union of their experts: one copy of an expert serves them all), and each token's output is
        its own experts' rows summed in the fixed order (``experts.executor``). So a request's
        tokens do not depend on its batch mates, up to the rounding of a matmul over more rows.
        """
        inner = self.model.model
        mask_fn = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        hidden, masks, rotaries = [], [], []
        for input_ids, cache in requests:
            h = inner.embed_tokens(input_ids)
            past = cache.get_seq_length()
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
            masks.append(mask_fn(config=self.config, inputs_embeds=h, attention_mask=None, position_ids=position_ids,
                                 **{_MASK_CACHE_KWARG: cache}))
            rotaries.append(inner.rotary_emb(h, position_ids=position_ids))
            hidden.append(h)
        lengths = [h.shape[1] for h in hidden]
        for index, layer in enumerate(inner.layers):
            self.on_layer_started(index)
            self.events.emit(SpanEvent("begin", "compute", "attention", index))
            for i, (_, cache) in enumerate(requests):
                attn, _ = layer.self_attn(layer.input_layernorm(hidden[i]), position_embeddings=rotaries[i],
                                          attention_mask=masks[i], **{CACHE_KWARG: cache})
                hidden[i] = hidden[i] + attn
            self.events.emit(SpanEvent("end", "compute", "attention", index))
            tokens = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=1)  # [1, sum S_i, H]
            moe = layer.mlp(layer.post_attention_layernorm(tokens))
            hidden = [h + part for h, part in zip(hidden, moe.split(lengths, dim=1))]
        last = inner.norm(torch.cat([h[:, -1] for h in hidden]))
        return self.model.lm_head(last).float()

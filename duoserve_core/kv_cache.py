"""The KV cache of continuous batching: one row per request, allocated once by the memory plan.

transformers' cache classes hold one batch whose rows advance together (a new request would have
to be padded into every tensor); here each request owns a row of ``max_context`` positions from
its prefill until it leaves, so requests at different positions share one forward and a newcomer
costs no copy of anyone's cache. Rows are allocated once (``max_batch`` x ``max_context``, what
``memory.kv_cache_bytes`` counts), so the plan is the memory, and zero-filled: a row's positions
beyond its length are read under the mask, and uninitialised memory could hold NaN, which a
masked-out weight of 0 would still spread (0 x NaN).
"""

from __future__ import annotations

import functools

import torch

from .errors import PromptError


class RowKVCache:
    """Keys and values ``[layers, rows, kv_heads, max_context, head_dim]`` and each row's length.

    A forward first says where its tokens go (``place``: rows and how many new tokens each), then
    each layer writes its new keys and values and reads its rows back (``write_and_read`` with that
    placement); ``advance`` records the new lengths once every layer has run. A forward may hold two
    placements (a prompt chunk beside the decode tokens of the others: ``OffloadedMixtral.mixed``).
    """

    def __init__(self, config, rows: int, max_context: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, rows, config.num_key_value_heads, max_context, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.rows, self.max_context, self.device = rows, max_context, device
        self.lengths = [0] * rows           # tokens held per row, on the host (no sync to read them)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def release(self, row: int) -> None:
        """Row ``row`` is free for the next request (its stale values stay, always masked)."""
        self.lengths[row] = 0

    def place(self, rows: list[int], new_tokens: int, sliding_window: int | None) -> "Placement":
        """Where a forward's tokens go: ``new_tokens`` tokens for each of ``rows`` (several rows: one token
        each), from each row's length on."""
        if len(rows) > 1 and new_tokens != 1:
            raise ValueError("several rows advance one token each")
        for row in rows:
            if self.lengths[row] + new_tokens > self.max_context:
                raise PromptError(f"request in KV row {row} would hold {self.lengths[row] + new_tokens} tokens, "
                                  f"more than the max_context of {self.max_context}")
        return Placement(self, rows, new_tokens, sliding_window)

    def advance(self, placement: "Placement") -> None:
        """The placement's tokens are in the cache: its rows are that much longer."""
        for row in placement.rows:
            self.lengths[row] += placement.new_tokens

    def write_and_read(self, layer: int, at: "Placement", k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``layer``'s new keys and values ``[B, kv_heads, S, head_dim]`` where ``at`` says; return each
        row's keys and values up to the placement's width, ``[B, kv_heads, width, head_dim]``."""
        keys, values = self.keys[layer], self.values[layer]
        if len(at.rows) == 1:  # one request (a prompt or a lone decode): contiguous positions, plain slices
            row, start = at.rows[0], at.starts[0]
            keys[row, :, start:start + k.shape[2]] = k[0]
            values[row, :, start:start + k.shape[2]] = v[0]
            return keys[row:row + 1, :, :at.width], values[row:row + 1, :, :at.width]
        if at.row_span is not None:  # consecutive rows in order (a batch that joined together): a view
            self.write_rows(layer, at.row_index, at.slots, k, v)
            return keys[at.row_span, :, :at.width], values[at.row_span, :, :at.width]
        return self.write_and_read_rows(layer, at.row_index, at.slots, at.width, k, v)

    def write_and_read_rows(self, layer: int, row_index: torch.Tensor, slots: torch.Tensor, width: int,
                            k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new key and value per row (``[B, kv_heads, 1, head_dim]``) into rows ``row_index`` at positions
        ``slots`` (index tensors, so the shapes do not depend on where: what a CUDA graph replays,
        ``decode_graph``); those rows' keys and values up to ``width``, gathered."""
        self.write_rows(layer, row_index, slots, k, v)
        return (self.keys[layer][:, :, :width].index_select(0, row_index),
                self.values[layer][:, :, :width].index_select(0, row_index))

    def write_rows(self, layer: int, row_index: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        self.keys[layer][row_index, :, slots] = k[:, :, 0]
        self.values[layer][row_index, :, slots] = v[:, :, 0]


def additive_mask(positions: torch.Tensor, keys: int, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, keys]``: 0 where key j is visible to the query at ``positions[b, s]`` (at or before it, and within
    the sliding window if the model has one), -inf elsewhere: what SDPA would turn a boolean mask into at
    every layer, made once."""
    slots = torch.arange(keys, device=positions.device)
    visible = slots[None, None, :] <= positions[:, :, None]
    if sliding_window is not None:
        visible &= positions[:, :, None] - slots[None, None, :] < sliding_window
    return torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill_(~visible, float("-inf"))


class Placement:
    """A forward's tokens in the cache: their rows, positions ``[B, S]`` and attention mask
    ``[B, 1, S, width]`` (0 where a key is visible: at or before the query's position, and within the
    sliding window if the model has one; -inf elsewhere)."""

    def __init__(self, cache: RowKVCache, rows: list[int], new_tokens: int, sliding_window: int | None):
        device = cache.device
        self.rows, self.new_tokens = rows, new_tokens
        self.starts = [cache.lengths[row] for row in rows]
        self.positions = torch.tensor([[s + i for i in range(new_tokens)] for s in self.starts], device=device)
        self.width = max(self.starts) + new_tokens
        # several rows are gathered by index, unless they are consecutive and in order (then read as a
        # slice, no copy); one row is a slice (no index tensor to send to the device)
        self.row_index = torch.tensor(rows, device=device) if len(rows) > 1 else None
        self.row_span = slice(rows[0], rows[0] + len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) \
            else None
        self.slots = self.positions[:, 0]
        self.sliding_window, self.dtype = sliding_window, cache.keys.dtype
        self._grouped: dict[int, torch.Tensor] = {}

    @functools.cached_property
    def _bias(self) -> torch.Tensor:
        """The additive mask ``[B, 1, S, padded]``, laid out 16 keys wide at a time: torch's memory-efficient
        attention (the GPU's, ``mixtral.attend``) wants each row of its mask aligned so, and would otherwise
        pad a copy of it at every layer. Made when first read: a step the decode graphs run masks inside them."""
        return additive_mask(self.positions, -(-self.width // 16) * 16, self.sliding_window, self.dtype)[:, None]

    @property
    def mask(self) -> torch.Tensor:
        return self._bias[..., :self.width]

    def grouped_mask(self, groups: int) -> torch.Tensor:
        """The mask of ``groups`` query heads per key/value head folded into the query axis (``mixtral.attend``
        on a GPU): ``[B, 1, groups x S, width]``, each query's row repeated ``groups`` times, group-major;
        made once per forward, kept 16-aligned."""
        if groups not in self._grouped:
            self._grouped[groups] = self._bias.repeat(1, 1, groups, 1)[..., :self.width]
        return self._grouped[groups]

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

import torch

from .errors import PromptError


class RowKVCache:
    """Keys and values ``[layers, rows, kv_heads, max_context, head_dim]`` and each row's length.

    A forward first says where its tokens go (``begin``: rows, positions, the width its queries read),
    then each layer writes its new keys and values and reads its rows back (``write_and_read``).
    """

    def __init__(self, config, rows: int, max_context: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, rows, config.num_key_value_heads, max_context, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.rows, self.max_context, self.device = rows, max_context, device
        self.lengths = [0] * rows           # tokens held per row, on the host (no sync to read them)
        self._rows: list[int] = []
        self._row_index = self._slots = None
        self._width = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def release(self, row: int) -> None:
        """Row ``row`` is free for the next request (its stale values stay, always masked)."""
        self.lengths[row] = 0

    def begin(self, rows: list[int], new_tokens: int, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A forward of ``new_tokens`` tokens for each of ``rows`` (several rows: one token each) starts
        at each row's length. Returns the token positions ``[B, S]`` and the attention mask
        ``[B, 1, S, width]`` (True where a key is visible: at or before the query's position, and
        within the sliding window if the model has one)."""
        if len(rows) > 1 and new_tokens != 1:
            raise ValueError("several rows advance one token each")
        for row in rows:
            if self.lengths[row] + new_tokens > self.max_context:
                raise PromptError(f"request in KV row {row} would hold {self.lengths[row] + new_tokens} tokens, "
                                  f"more than the max_context of {self.max_context}")
        starts = [self.lengths[row] for row in rows]
        positions = torch.tensor([[s + i for i in range(new_tokens)] for s in starts], device=self.device)
        self._width = max(starts) + new_tokens
        self._rows = rows
        self._row_index = torch.tensor(rows, device=self.device)
        self._slots = positions[:, 0]
        keys = torch.arange(self._width, device=self.device)
        visible = keys[None, None, :] <= positions[:, :, None]
        if sliding_window is not None:
            visible &= positions[:, :, None] - keys[None, None, :] < sliding_window
        return positions, visible[:, None]

    def end(self, new_tokens: int) -> None:
        """The forward's tokens are in the cache: every row it covered is ``new_tokens`` longer."""
        for row in self._rows:
            self.lengths[row] += new_tokens

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys and values ``[B, kv_heads, S, head_dim]`` of ``layer``; return each
        row's keys and values up to the forward's width, ``[B, kv_heads, width, head_dim]``."""
        keys, values = self.keys[layer], self.values[layer]
        if len(self._rows) == 1:  # one request (a prefill or a lone decode): contiguous positions, plain slices
            row, start = self._rows[0], self.lengths[self._rows[0]]
            keys[row, :, start:start + k.shape[2]] = k[0]
            values[row, :, start:start + k.shape[2]] = v[0]
            return keys[row:row + 1, :, :self._width], values[row:row + 1, :, :self._width]
        keys[self._row_index, :, self._slots] = k[:, :, 0]
        values[self._row_index, :, self._slots] = v[:, :, 0]
        return (keys[:, :, :self._width].index_select(0, self._row_index),
                values[:, :, :self._width].index_select(0, self._row_index))

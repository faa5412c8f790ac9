"""A decode layer's dense part as a CUDA graph: its norm, attention, residual and second norm, one launch.

Why: with every expert resident, a decode token took 74 ms on the H200 for about 16 ms of GPU work
(2026-11-30, ``docs/cpu_lane.md``): 77 kernel launches a layer, each a few microseconds of Python and
driver time, and bitsandbytes' 4-bit wrapper about 44 us of host time a call. About half of those
launches are the dense part (two RMS norms, four projections, the rotary embedding, the KV write and
read, attention), whose shapes are the same at every step once the keys are read to a fixed width.
So that part is captured once per (layer, rows, width bucket) and replayed: the host queues one copy
(the layer's input) and one replay instead of some forty kernels. The router and the policy stay
eager: which experts run is decided on the host after the router; a one-token expert call then
replays its slot's graph (``experts/slot_graph.py``).

Static shapes: B rows of one token each; the keys are read to ``bucket(width)`` (a multiple of
``WIDTH_BUCKET``, at most the cache's context), the keys past a row's position masked by an additive
mask computed inside the graph from the positions; the KV write and read go through index tensors
(the rows and positions, copied into the graph's inputs each step). The same function runs eagerly
where there is no CUDA (``capture=False``): the tests compare it with the dynamic path
(``mixtral.attend``) on the CPU, and the GPU tests compare the replayed graphs with it.
"""

from __future__ import annotations

import torch

from .kv_cache import Placement, RowKVCache, additive_mask
from .mixtral import grouped_attention, project
from .side_stream import capture

WIDTH_BUCKET = 256  # keys are read in buckets of this many: a graph per bucket, at most 255 masked keys read


class DecodeGraphs:
    """The dense part of every decode layer for steps of B rows of one token, replayed from CUDA graphs
    (``capture=True``) or run eagerly as the same static function."""

    def __init__(self, model, kv: RowKVCache, capture: bool):
        self.model, self.kv, self.capture = model, kv, capture
        self.layers = model.model.layers
        self.rotary = model.model.rotary_emb
        self.sliding_window = model.config.sliding_window
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # rows -> hidden, rows, positions
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pool = None  # one memory pool for every graph: they replay one at a time, on one stream

    def bucket(self, width: int) -> int:
        """The key width a step of ``width`` keys reads: the next multiple of ``WIDTH_BUCKET``, within the cache."""
        return min(-(-width // WIDTH_BUCKET) * WIDTH_BUCKET, self.kv.max_context)

    def begin(self, at: Placement) -> int:
        """A decode step of ``at``'s rows (one token each): its rows and positions go into the graphs'
        inputs; returns the key width the step reads."""
        hidden, rows, positions = self._inputs_for(len(at.rows))
        if at.row_index is None:
            rows.fill_(at.rows[0])
        else:
            rows.copy_(at.row_index)
        positions.copy_(at.positions[:, 0])
        return self.bucket(at.width)

    def layer(self, index: int, hidden: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index`` on ``hidden`` ``[B, 1, H]``: ``(hidden + attention, post-attention norm of it)``.
        With capture, the returned tensors are the graph's outputs: read them before this layer's graph
        replays again."""
        rows = hidden.shape[0]
        static_hidden = self._inputs_for(rows)[0]
        static_hidden.copy_(hidden)
        if not self.capture:
            return self._dense(index, rows, width)
        graph, out = self._graph(index, rows, width)
        graph.replay()
        return out

    def _inputs_for(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if rows not in self._inputs:
            device, config = self.kv.device, self.model.config
            self._inputs[rows] = (torch.zeros(rows, 1, config.hidden_size, dtype=self.kv.keys.dtype, device=device),
                                  torch.zeros(rows, dtype=torch.long, device=device),
                                  torch.zeros(rows, dtype=torch.long, device=device))
        return self._inputs[rows]

    def _graph(self, index: int, rows: int, width: int):
        key = (index, rows, width)
        if key not in self._graphs:
            # the warm-up run writes this step's keys and values, which the replay writes again, unchanged
            graph, out = capture(lambda: self._dense(index, rows, width), self.kv.device, self._pool)
            self._pool = graph.pool()
            self._graphs[key] = (graph, out)  # the outputs stay referenced: no other graph gets their memory
        return self._graphs[key]

    def _dense(self, index: int, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static function: ``mixtral.attend`` for B rows of one token with tensor-indexed KV rows and
        positions and the keys read to ``width``, then the residual and the post-attention norm."""
        layer = self.layers[index]
        attn = layer.self_attn
        x, row_index, positions = self._inputs_for(rows)
        q, k, v = project(attn, layer.input_layernorm(x), self.rotary(x, position_ids=positions[:, None]))
        keys, values = self.kv.write_and_read_rows(index, row_index, positions, width, k, v)
        # [B, 1, 1, width]: one row per request, the same for each folded query head
        mask = additive_mask(positions[:, None], width, self.sliding_window, x.dtype)[:, None]
        out = grouped_attention(q, keys, values, mask, attn.scaling)
        attended = x + attn.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
        return attended, layer.post_attention_layernorm(attended)

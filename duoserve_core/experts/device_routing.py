"""A one-row decode step with every expert resident, routed on the device: no host sync inside the step.

Why: with every expert in a slot, a decode token on the H200 took 34.8-39.4 ms with CUDA graphs for
about 13.6 ms of GPU work (2026-12-01, ``docs/cpu_lane.md``). The rest was per-layer host work: the
router's top-k crossing to the host (a sync: the GPU then idles while the host runs the policy, the
cache and the next launches), 32 times a token. When nothing needs loading, the host does not need
the routing to proceed: the router's top-k can pick the slots on the device. Per layer this module
replays two graphs, ``router`` (the gate, top-k and probabilities into a routing log, or the trace's
replayed routing where there is one) and ``experts`` (the top-k's slots looked up in a device slot
table, their records gathered into ``top_k`` static buffers, each expert's SwiGLU on the layer's
token, the weighted sum in the executor's fixed order, the residual): the host queues a whole step
without waiting and the GPU never idles within it. Measured on the H200: 17.4-18.1 ms a token against
31.3-51.5 ms routed on the host on the same machines, the same tokens.

The gather is the price: ``top_k`` records a layer copied on the device (two NF4 Mixtral-8x7B
experts, 2 x 94.5 MiB: 0.13 ms alone at the 1.5 TB/s ``calibrate`` measures; a layer's gather and two
experts took 0.29-0.33 ms against 0.36 ms for the two experts routed on the host), because a graph's kernels read fixed
addresses and the chosen experts' slots are known only on the device. No library offers a 4-bit
matrix-vector kernel that takes its weight's address from a device tensor, so the copy is what
keeps bitsandbytes' kernel. It needs ``top_k`` records of room in the memory plan beyond the slots
(``Runtime`` checks, and routes on the host otherwise).

Arithmetic: the same as the per-expert path's, op for op (``SlotGraphs._static``: the expert's
output times its router weight, cast to the activations' dtype; ``executor.combine`` in ascending
expert order; the residual add), so the tokens and logits are that path's; on the CPU the same
static functions run eagerly, which ``tests/test_device_routing.py`` compares bit for bit.

Bookkeeping: the cache's hit counts, its events and the policy's ``router_done`` hear each layer's
routing after the step, read back once (``settle``, through ``LayerStep.run`` with a device that
computes nothing: the decisions are the layer step's, as everywhere). That is sound only for a
policy that holds every expert (``resident``): its plans never load or release, so hearing the
routing late changes nothing. The timeline gets one ``router`` and one ``expert`` span per layer
(the latter with no expert index: which experts ran is known on the device only).
"""

from __future__ import annotations

import torch

from ..events import SpanEvent, StepEvent
from ..side_stream import capture
from ..traces import replayed_probabilities
from ..units import format_bytes
from .cache import ExpertCache
from .executor import ExpertExecutor, combine
from .transfer import TransferEngine


def as_words(records: torch.Tensor) -> torch.Tensor:
    """``records`` (``[n, bytes]`` uint8) viewed as the widest integer words that tile a record: the gather
    moves words, not bytes (a byte-wise ``index_select`` is far slower)."""
    word = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8) if records.shape[1] % t.itemsize == 0)
    return records.view(word)


def gather(records: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """Rows ``index`` (a device tensor) of ``records`` into ``out``, on the device: the expert records a
    device-routed layer computes from (``calibrate`` times this call)."""
    torch.index_select(as_words(records), 0, index, out=as_words(out))


def host_routing_reason(*, enabled: bool, graphs: bool, policy, devices: int, lane_on: bool, dequantizes: bool,
                        headroom_bytes: int | None, top_k: int, expert_bytes: int) -> str | None:
    """Why a runtime (or the simulator of one) routes resident decode on the host, or None where it can
    route on the device: it needs the decode graphs, a policy that holds every expert, one device, the CPU
    lane off, a format whose one-token call reads its record in place, and ``top_k`` records of room in the
    budget beyond the slots for the gather (``headroom_bytes``: None, no budget)."""
    return ("device_routing=False" if not enabled else
            "decode graphs off" if not graphs else
            f"policy {policy.name!r} does not hold every expert" if not policy.holds_every_expert else
            "several devices" if devices > 1 else
            "the CPU lane is on" if lane_on else
            "the format's one-token call dequantizes" if dequantizes else
            f"the budget leaves no room to gather {top_k} experts ({format_bytes(top_k * expert_bytes)})"
            if headroom_bytes is not None and headroom_bytes < top_k * expert_bytes else None)


class RanOnDevice:
    """``ExpertDevice`` of a layer whose experts already ran on the device: the layer step's decisions
    (hits, pins, the policy's hooks) without any work to queue (the simulator's too: its clocks were
    advanced when the layer was)."""

    def __init__(self, counts: list[int]):
        self.counts = counts

    def wait_ready(self, slot: int) -> None: ...
    def compute(self, layer: int, expert: int, slot: int) -> None: ...
    def mark_read(self, slot: int) -> None: ...
    def compute_on_host(self, layer: int, expert: int) -> None: ...
    def finish_host(self) -> None: ...


class DeviceRoutedMoE:
    """Every MoE layer of one-row decode steps, routed on the device, from CUDA graphs (``capture``) or,
    on the CPU, as the same static functions run eagerly."""

    def __init__(self, executor: ExpertExecutor, dtype: torch.dtype, capture: bool):
        self.executor, self.layer_step, self.fmt, self.events = executor, executor.layer_step, executor.fmt, executor.events
        self.gates, self.k, self.replay, self.capture = executor.gates, executor.top_k, executor.replay, capture
        self.engine: TransferEngine = executor.engine.engines[0]  # one device: the runtime routes on the host otherwise
        cache: ExpertCache = self.layer_step.cache
        self.num_layers, self.num_experts = cache.num_layers, cache.num_experts
        self.slots = self.engine.buffer
        device, top_k = self.slots.device, self.k
        self.gathered = torch.empty((top_k, self.slots.shape[1]), dtype=torch.uint8, device=device)
        hidden = self.gates[0].weight.shape[1]
        L, E = self.num_layers, self.num_experts
        self.slot_table = torch.zeros((L, E), dtype=torch.long, device=device)
        self._table: list[int] | None = None  # the cache's table last copied in (the cache's own object)
        self.moe_in = torch.zeros((1, hidden), dtype=dtype, device=device)       # the layer's normed token
        self.residual = torch.zeros((1, 1, hidden), dtype=dtype, device=device)  # its attended hidden state
        self.top_idx = torch.zeros((L, top_k), dtype=torch.long, device=device)  # the routing log, per layer
        self.top_w = torch.zeros((L, top_k), dtype=torch.float32, device=device)
        self.probs = torch.zeros((L, E), dtype=torch.float32, device=device)
        self.replayed_idx = torch.zeros((L, top_k), dtype=torch.long, device=device)  # the trace's, copied in
        self.replayed_w = torch.zeros((L, top_k), dtype=torch.float32, device=device)
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self._pool = None
        self.steps = 0  # decode steps routed on the device

    def begin(self) -> bool:
        """Whether this decode step (one row of one token) can route on the device: every expert is
        resident and nobody observes the routing layer by layer (a trace recorder). If so, the compute
        stream waits for every copy in flight, the slot table is brought up to date (copied when it
        changed) and, with a replay, the trace's routing of every layer is copied in."""
        table = self.layer_step.cache.slot_table()
        if table is None or self.executor.observers:
            return False
        self.engine.wait_all_ready()
        if table is not self._table:  # the cache hands out a new list only when a slot changed
            self.slot_table.copy_(torch.tensor(table, dtype=torch.long).view(self.num_layers, self.num_experts))
            self._table = table
        if self.replay is not None:
            request, position, _ = self.executor.segments[0]
            idx, w = self.replay.token(request, position, self.num_layers)
            self.replayed_idx.copy_(idx, non_blocking=True)
            self.replayed_w.copy_(w, non_blocking=True)
        return True

    def layer(self, index: int, attended: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s MoE on its one token (``normed`` ``[1, 1, H]``) plus the residual
        (``attended``): the layer's output ``[1, 1, H]``. With capture it is the graph's output buffer:
        read it before this layer's graph replays again."""
        step = self.layer_step
        self.moe_in.copy_(normed.view(1, -1))
        self.residual.copy_(attended)
        self.events.emit(StepEvent("router_started", step.step, step.phase, index))
        self.events.emit(SpanEvent("begin", "compute", "router", index))
        self._run("router", index)
        self.events.emit(SpanEvent("end", "compute", "router", index))
        self.events.emit(SpanEvent("begin", "compute", "expert", index))
        out = self._run("experts", index)
        self.events.emit(SpanEvent("end", "compute", "expert", index))
        self.events.emit(StepEvent("layer_done", step.step, step.phase, index))
        return out

    def settle(self) -> None:
        """After the step was queued: the routing log comes to the host (one sync), and each layer's
        routing goes through the layer step (hits, the policy's ``router_done``)."""
        k = self.k
        log = torch.cat([self.top_idx.float(), self.probs], dim=1).cpu()
        for layer in range(self.num_layers):
            topk = log[layer:layer + 1, :k].to(torch.int64)
            counts = torch.bincount(topk[0], minlength=self.num_experts).tolist()
            self.layer_step.run(layer, topk, log[layer:layer + 1, k:], None, RanOnDevice(counts))
        self.steps += 1

    def _run(self, kind: str, index: int) -> torch.Tensor | None:
        fn = (lambda: self._router(index)) if kind == "router" else (lambda: self._experts(index))
        if not self.capture:
            return fn()
        key = (kind, index)
        if key not in self._graphs:
            graph, out = capture(fn, self.slot_table.device, self._pool)
            self._pool = graph.pool()
            self._graphs[key] = (graph, out)  # the output stays referenced: no other graph gets its memory
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _router(self, index: int) -> None:
        """What ``ExpertExecutor.route`` computes, into the routing log's row ``index``."""
        logits, top_w, top_idx = self.gates[index](self.moe_in)
        probs = torch.softmax(logits.float(), dim=-1)
        if self.replay is not None:  # the router still runs (its cost is real); the trace decides
            top_idx, top_w = self.replayed_idx[index:index + 1], self.replayed_w[index:index + 1]
            probs = replayed_probabilities(top_idx, top_w, probs.shape[-1])
        self.top_idx[index].copy_(top_idx[0])
        self.top_w[index].copy_(top_w[0])
        self.probs[index].copy_(probs[0])

    def _experts(self, index: int) -> torch.Tensor:
        """The routed experts' records gathered from their slots, then what ``SlotGraphs._static`` and
        ``executor.combine`` compute for one token, and the residual."""
        slots = self.slot_table[index].index_select(0, self.top_idx[index])
        gather(self.slots, slots, self.gathered)
        dtype = self.moe_in.dtype
        contrib = torch.cat([(self.fmt.forward(self.gathered[j], self.moe_in) * self.top_w[index, j:j + 1][:, None])
                             .to(dtype) for j in range(self.k)])
        return self.residual + combine(contrib, self.top_idx[index:index + 1]).view_as(self.residual)

    def captured(self) -> int:
        """How many graphs have been captured (two a layer once every layer ran)."""
        return len(self._graphs)

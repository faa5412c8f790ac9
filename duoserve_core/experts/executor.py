"""The real executor of one MoE layer: routing, then the shared layer step on real kernels.

``ExpertExecutor.moe`` does three things, each in its own function:

1. ``route``: the router runs on the compute stream (or the trace's routing replaces its choice);
   top-k, weights, probabilities and the speculative gate's guess go to the host in one tensor:
   the one device->host sync of the layer (which experts to fetch is data-dependent);
2. ``LayerStep.run`` (``experts.layer_step``): every scheduling decision, carried out on a
   ``_TorchLayer``, the ``ExpertDevice`` that queues each expert's kernels once its copy landed,
   or hands an expert to the CPU lane (``experts.host_lane``), which computes it on the host from
   its host-store record while the GPU works; the compute stream, not the host, waits for the
   lane's results (``experts.stream_gate``), so the host queues the next layer meanwhile;
3. ``combine``: the k contributions of each token summed in ascending expert order.

Numbers never depend on the schedule: each expert writes its weighted output to its own rows
of a (token, k) buffer, and the sum runs in ascending expert order at the end, the same order
transformers' ``MixtralExperts`` accumulates in. So whatever order the experts were computed in,
the result has the same bits. An expert the CPU lane computes writes the same rows; its bits are
the host kernel's (the same as the device's when the device is the CPU; on a GPU they differ by
the two kernels' rounding).

On several devices an expert is computed where its slot is (``TransferEngines``): when a device's
first expert of the layer is queued, the layer's hidden states, rows and weights cross to it
(torch's peer copy, NVLink where there is one) on a side stream that waits only for the router
(``_DeviceShare``), each device's experts write their rows of that device's ``contrib``, and ``join``
brings those rows back into the first device's before the combine. The same kernels on the same
inputs give the same bits on every GPU of one model, so the tokens are the one-GPU run's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..events import EventBus, SpanEvent, StepEvent
from ..traces import replayed_probabilities
from .formats import ExpertFormat
from .host_lane import HostLaneWorker
from .layer_step import LayerStep
from .slot_graph import SlotGraphs
from .transfer import TransferEngines


@dataclass
class Routing:
    """One layer's routing: on the device for the compute, on the host for the decisions."""

    top_idx: torch.Tensor           # [tokens, k] device
    top_w: torch.Tensor             # [tokens, k] device
    topk: torch.Tensor              # [tokens, k] int64, host
    weights: torch.Tensor           # [tokens, k] fp32, host
    probs: torch.Tensor             # [tokens, E] fp32, host
    speculation: torch.Tensor | None  # [tokens, k] int64 host: layer l+1's router on this input
    x_host: torch.Tensor | None = None  # [tokens, H] the MoE input on the host, for the CPU lane


class ExpertExecutor:
    """Routes each MoE layer, runs the layer step on it, and combines the experts' outputs."""

    def __init__(self, step: LayerStep, engine: TransferEngines, fmt: ExpertFormat, events: EventBus, top_k: int,
                 gates: list[nn.Module], replay=None, host_worker: HostLaneWorker | None = None,
                 slot_graphs: SlotGraphs | None = None):
        self.layer_step, self.engine, self.fmt, self.events, self.top_k = step, engine, fmt, events, top_k
        self.host_worker = host_worker    # the CPU lane, when the layer step has one
        self.slot_graphs = slot_graphs    # one-token expert calls on the first device from CUDA graphs
        self.gates = gates                # every layer's router, for the speculative gate
        self.replay = replay              # a traces.RoutingReplay: routing taken from a trace
        self.observers: list = []         # e.g. a TraceRecorder: told each layer's routing
        self.segments: list[tuple[int, int, int]] = [(0, 0, 0)]  # (request, first position, tokens) per request
        self._phase = None
        self.devices = [e.device for e in engine.engines]  # slot devices, the first runs the dense part
        self._side = None  # several GPUs: the first device's stream that sends a layer's inputs to the others
        # (layer, expert, tokens, share of the expert, future) held, not yet timed
        self.lane_jobs: list[tuple[int, int, int, float, object]] = []

    def side_stream(self):
        if self._side is None:
            self._side = torch.cuda.Stream(self.devices[0])
        return self._side

    def begin_step(self, step: int, phase, segments: list[tuple[int, int, int]]) -> None:
        """Where the next forward's tokens sit, request by request in the forward's token order:
        ``(request id, position of its first token, tokens)`` (observers and the replay need it),
        then the step."""
        self.segments = segments
        self._phase = phase
        if self.host_worker is not None:
            self.host_worker.settle()
            self.timeline_lane_jobs(wait=True)
        self.layer_step.begin_step(step, phase)

    def route(self, layer: int, gate: nn.Module, x: torch.Tensor) -> Routing:
        step = self.layer_step
        self.events.emit(StepEvent("router_started", step.step, step.phase, layer))
        self.events.emit(SpanEvent("begin", "compute", "router", layer))
        k, num_experts = self.top_k, step.cache.num_experts
        speculate = (bool(self.observers) or step.policy.wants_speculation) and layer + 1 < len(self.gates)
        router_logits, top_w, top_idx = gate(x)
        probs = F.softmax(router_logits.float(), dim=-1)
        if self.replay is not None:  # the router still runs (its cost is real); the trace decides
            replayed = [self.replay.routing(r, first, n, layer) for r, first, n in self.segments]
            top_idx = torch.cat([i for i, _ in replayed]).to(x.device, non_blocking=True)
            top_w = torch.cat([w for _, w in replayed]).to(x.device, non_blocking=True)
            probs = replayed_probabilities(top_idx, top_w, probs.shape[-1])
        parts = [top_idx.to(torch.float32), top_w.to(torch.float32), probs]
        if speculate:  # layer l+1's router on layer l's MoE input: a guess at the next layer's experts
            guess = self.gates[layer + 1](x)[2]
            if self.replay is not None:  # the gate still runs; the trace's recorded guess is used
                recorded = [self.replay.speculation(r, first, n, layer) for r, first, n in self.segments]
                if all(g is not None for g in recorded):
                    guess = torch.cat(recorded).to(x.device, non_blocking=True)
            parts.append(guess.to(torch.float32))
        x_host = None
        if self.host_worker is not None:  # the CPU lane's input, copied before the sync below covers it
            x_host = x if x.device.type == "cpu" else \
                torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)
        routed = torch.cat(parts, dim=1).cpu()  # one device->host sync per layer
        self.events.emit(SpanEvent("end", "compute", "router", layer))
        return Routing(top_idx, top_w, routed[:, :k].to(torch.int64), routed[:, k:2 * k],
                       routed[:, 2 * k:2 * k + num_experts],
                       routed[:, 2 * k + num_experts:].to(torch.int64) if speculate else None, x_host)

    def moe(self, layer: int, gate: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        routing = self.route(layer, gate, x)
        if self.observers:  # each request's rows, where its tokens sit
            start = 0
            for request_id, first, n in self.segments:
                rows = slice(start, start + n)
                start += n
                for observer in self.observers:
                    observer.begin_step(request_id, self._phase.value, first)
                    observer.routed(layer, routing.topk[rows], routing.weights[rows], routing.probs[rows],
                                    None if routing.speculation is None else routing.speculation[rows])
        device = _TorchLayer(self, x, routing)
        self.layer_step.run(layer, routing.topk, routing.probs, routing.speculation, device)
        device.join()
        out = combine(device.contrib, routing.top_idx).reshape(shape)
        if self.lane_jobs:  # the last layer's wait costs nothing: the step's logits are read next
            self.timeline_lane_jobs(wait=layer == len(self.gates) - 1)
        self.events.emit(StepEvent("layer_done", self.layer_step.step, self.layer_step.phase, layer))
        return out

    def timeline_lane_jobs(self, wait: bool) -> None:
        """Each finished CPU-lane job becomes a span on the timeline's ``cpu`` lane (``wait``: all of
        them, after they finish), and the lane's decision hears its time (``HostLane.observe``: the
        lane's speed as it runs); a job's error is raised here."""
        ready = [wait or future.done() for *_, future in self.lane_jobs]  # read once: a job may finish meanwhile
        finished = [job for job, done in zip(self.lane_jobs, ready) if done]
        self.lane_jobs[:] = [job for job, done in zip(self.lane_jobs, ready) if not done]
        lane = self.layer_step.host_lane
        for layer, expert, tokens, share, future in finished:
            start, end = future.result()
            self.events.emit(SpanEvent("whole", "cpu", "expert", layer, expert, start_s=start, end_s=end))
            if lane is not None:  # a shared expert's head, as the whole expert it stands for
                lane.observe(tokens, (end - start) / share)


class _DeviceShare:
    """What one other device needs to compute its experts of a layer: the layer's inputs copied to it
    and the rows its experts write, which ``_TorchLayer.join`` copies back.

    Made when the device's first expert of the layer is queued, after the layer's expert copies were
    issued (so making it does not delay them). Its inputs cross on ``side``, a stream of the first
    device that waits only for the router (``routed``), not for the first device's experts queued
    meanwhile: torch runs a cross-device copy on the source device's current stream, and on the
    compute stream it would wait for those experts' copies."""

    def __init__(self, device: torch.device, layer: "_TorchLayer", side, routed):
        self.device = device
        context = contextlib.nullcontext()
        if side is not None:
            side.wait_event(routed)
            context = torch.cuda.stream(side)
        with context:
            self.x = layer.x.to(device, non_blocking=True)
            self.rows = layer.rows.to(device, non_blocking=True)
            self.weights = layer.weights.to(device, non_blocking=True)
        if side is not None:  # read on the side stream: the allocator must not hand their memory out before
            for tensor in (layer.x, layer.rows, layer.weights):
                tensor.record_stream(side)
        self.contrib = torch.empty(layer.contrib.shape, dtype=layer.contrib.dtype, device=device)
        self.experts: list[int] = []
        self.guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _TorchLayer:
    """``ExpertDevice`` for one layer's tokens: an expert's kernels go on its slot's device's compute
    stream after a stream-wait on its slot's copy; its weighted output lands in its own rows of
    ``contrib`` (of that device's, on another device: see the module doc)."""

    def __init__(self, executor: ExpertExecutor, x: torch.Tensor, routing: Routing):
        self.engine, self.fmt, self.events, self.x = executor.engine, executor.fmt, executor.events, x
        self.host_worker, self.routing, self.slot_graphs = executor.host_worker, routing, executor.slot_graphs
        k = routing.topk.shape[1]
        flat = routing.topk.flatten()  # row r = token * k + j
        self.counts = torch.bincount(flat, minlength=executor.layer_step.cache.num_experts).tolist()
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self.host_rows = torch.argsort(flat, stable=True)
        self.rows = self.host_rows.to(x.device, non_blocking=True)
        self.tokens = self.rows // k  # each row's token, on the first device
        self.k, self.weights = k, routing.top_w.reshape(-1)
        self.contrib = torch.empty((x.shape[0] * k, x.shape[1]), dtype=x.dtype, device=x.device)
        # (layer, expert, future, output, head only) of the CPU lane
        self.on_host: list[tuple[int, int, object, torch.Tensor, bool]] = []
        self.tail_bytes = self.engine.tail_bytes
        self.tail_y: torch.Tensor | None = None  # a shared expert's tail output, unweighted
        self.lane_jobs = executor.lane_jobs
        self.devices = executor.devices
        self.shares: list[_DeviceShare | None] = [None] * len(self.devices)  # made at each device's first expert
        self.side, self.routed = None, None
        if len(self.devices) > 1 and x.device.type == "cuda":
            self.side = executor.side_stream()
            self.routed = torch.cuda.Event()
            self.routed.record()

    def wait_ready(self, slot: int) -> None:
        self.engine.wait_ready(slot)

    def compute(self, layer: int, expert: int, slot: int) -> None:
        d = self.engine.device_of_slot[slot]
        share = self.shares[d]
        if d and share is None:
            share = self.shares[d] = _DeviceShare(self.devices[d], self, self.side, self.routed)
        x, all_rows, weights, contrib = (self.x, self.rows, self.weights, self.contrib) if share is None else \
            (share.x, share.rows, share.weights, share.contrib)
        self.events.emit(SpanEvent("begin", "compute", "expert", layer, expert, device=d))
        with contextlib.nullcontext() if share is None else share.guard:
            span = slice(self.starts[expert], self.starts[expert + 1])
            rows = all_rows[span]
            tokens = self.tokens[span] if share is None else rows // self.k
            if share is None and self.slot_graphs is not None and self.counts[expert] == 1:
                y = self.slot_graphs(slot, x, tokens, weights, rows)  # the arithmetic below, from the slot's graph
            else:
                y = self.fmt.forward(self.engine.slot(slot), x.index_select(0, tokens))
                y = (y * weights.index_select(0, rows)[:, None]).to(x.dtype)
            contrib.index_copy_(0, rows, y)
        self.events.emit(SpanEvent("end", "compute", "expert", layer, expert, device=d))
        if share is not None:
            share.experts.append(expert)

    def mark_read(self, slot: int) -> None:
        self.engine.mark_read(slot)

    def join(self) -> None:
        """Copy each other device's rows into the first device's ``contrib`` (one copy per device)."""
        for share in self.shares[1:]:
            if share is None:
                continue
            # the rows' indices are sliced on each device (a host index would be a pageable copy, which
            # makes the host wait for the device's queue: no running ahead into the next layer)
            spans = [(self.starts[e], self.starts[e + 1]) for e in share.experts]
            with share.guard:
                part = share.contrib.index_select(0, torch.cat([share.rows[a:b] for a, b in spans]))
            self.contrib.index_copy_(0, torch.cat([self.rows[a:b] for a, b in spans]), part.to(self.x.device))

    def compute_on_host(self, layer: int, expert: int, head_only: bool = False) -> None:
        rows = self.host_rows[self.starts[expert]:self.starts[expert + 1]]
        x = self.routing.x_host.index_select(0, rows // self.k)
        weights = self.routing.weights.reshape(-1).index_select(0, rows)
        # pinned on a GPU: the copy that reads it is queued now and runs once the stream's hold lets it
        out = torch.empty(x.shape, dtype=self.x.dtype, pin_memory=self.x.device.type == "cuda")
        future = self.host_worker.submit(self.engine.store.record(layer, expert), x, weights, out, head_only)
        self.on_host.append((layer, expert, future, out, head_only))

    def copy_tail(self, layer: int, expert: int) -> None:
        self.engine.copy_tail((layer, expert))

    def compute_tail(self, layer: int, expert: int) -> None:
        """A shared expert's tail from the tail buffer, on the first device, once landed; unweighted until
        ``finish_host`` adds the lane's head."""
        self.engine.wait_tail_ready()
        self.events.emit(SpanEvent("begin", "compute", "expert", layer, expert))
        tokens = self.tokens[self.starts[expert]:self.starts[expert + 1]]
        self.tail_y = self.fmt.tail.forward(self.engine.tail(), self.x.index_select(0, tokens))
        self.events.emit(SpanEvent("end", "compute", "expert", layer, expert))
        self.engine.mark_tail_read()

    def finish_host(self) -> None:
        """Queue, per CPU-lane expert, a hold on the compute stream until the lane posts it, then its
        rows' copy into ``contrib`` (a shared expert's: head plus tail, weighted, as ``forward`` sums a
        split record; the GPU's experts are queued already); the host does not wait (on a CPU device
        it does: there the host is the stream)."""
        stream = torch.cuda.current_stream(self.x.device) if self.x.device.type == "cuda" else None
        for layer, expert, future, out, head_only in self.on_host:
            self.host_worker.hold(stream)
            rows = self.rows[self.starts[expert]:self.starts[expert + 1]]
            lane = out.to(self.x.device, non_blocking=True)
            if head_only:
                lane = ((self.tail_y + lane) * self.weights.index_select(0, rows)[:, None]).to(self.x.dtype)
            self.contrib.index_copy_(0, rows, lane)
            self.lane_jobs.append((layer, expert, out.shape[0], self.fmt.fraction if head_only else 1.0, future))
        self.on_host.clear()


def combine(contrib: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """``[tokens * k, H]`` rows (token-major, router order) summed per token in ascending expert order.

    With two experts a token (Mixtral's top-2) the order needs no sort: floating-point addition of two
    terms is commutative (``a + b`` and ``b + a`` round the same exact sum), so the router's order gives
    the same bits as any; from three terms on the order matters and is fixed by sorting."""
    tokens, k = top_idx.shape
    per_token = contrib.view(tokens, k, contrib.shape[-1])
    if k == 2:
        return per_token[:, 0] + per_token[:, 1]
    order = top_idx.argsort(dim=1)
    per_token = per_token.gather(1, order[:, :, None].expand(-1, -1, contrib.shape[-1]))
    out = per_token[:, 0]
    for j in range(1, k):
        out = out + per_token[:, j]
    return out


class OffloadedMoE(nn.Module):
    """Drop-in replacement for transformers' ``MixtralSparseMoeBlock`` (``layer.mlp``).

    Keeps the model's own router (``gate``) and computes the experts through the executor.
    """

    def __init__(self, gate: nn.Module, layer: int):
        super().__init__()
        self.gate = gate
        self.layer = layer
        self.executor: ExpertExecutor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.executor.moe(self.layer, self.gate, hidden_states)

"""Runs one MoE layer with experts that live in the cache, and carries out the policy's plans.

Per layer: the router runs on the compute stream; its top-k goes to the host (the one
unavoidable sync per layer: which experts to fetch is data-dependent); the policy hears
``router_done``; experts already resident are computed first while the missing ones are
copied; each expert's kernels start as soon as its own copy has landed.

Numbers never depend on the schedule: each expert writes its weighted output to its own rows
of a (token, k) buffer, and the k contributions of each token are summed in ascending expert
order at the end, the same order transformers' ``MixtralExperts`` accumulates in. So whatever
order the experts were computed in, the result has the same bits.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from ..policy.base import Plan, Policy
from ..timeline import Timeline
from .cache import ExpertCache
from .formats import ExpertFormat
from .transfer import TransferEngine


class ExpertExecutor:
    """Owns the cache, the transfer engine and the policy for every MoE layer of a model."""

    def __init__(self, cache: ExpertCache, engine: TransferEngine, policy: Policy, fmt: ExpertFormat,
                 timeline: Timeline, top_k: int):
        self.cache, self.engine, self.policy, self.fmt = cache, engine, policy, fmt
        self.timeline, self.top_k = timeline, top_k
        self.gates: list[nn.Module] = []  # every layer's router, for the speculative gate
        self.observers: list = []         # e.g. a TraceRecorder: told each layer's routing
        self.replay = None                # a traces.RoutingReplay: routing taken from a trace
        self._step = (0, "prefill", 0)    # (request id, phase, position of the first token)

    def begin_step(self, request_id: int, phase: str, first_position: int) -> None:
        """Where the next forward's tokens sit; observers and the replay need it."""
        self._step = (request_id, phase, first_position)
        for observer in self.observers:
            observer.begin_step(request_id, phase, first_position)

    def apply(self, plan: Plan) -> None:
        for key in plan.release:
            self.cache.release(key)
        for key in plan.load:
            if not self.cache.prefetch(key) and not self.cache.is_resident(key):
                break  # no room, or only for something worth less: the rest of the plan ranks lower still

    def moe(self, layer: int, gate: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        k = self.top_k
        speculate = (bool(self.observers) or self.policy.wants_speculation) and layer + 1 < len(self.gates)
        num_experts = self.cache.num_experts
        with self.timeline.span("compute", "router", layer):
            router_logits, top_w, top_idx = gate(x)
            probs = F.softmax(router_logits.float(), dim=-1)
            if self.replay is not None:  # the router still runs (its cost is real); the trace decides
                request_id, _, first = self._step
                idx_r, w_r = self.replay.routing(request_id, first, x.shape[0], layer)
                top_idx, top_w = idx_r.to(x.device, non_blocking=True), w_r.to(x.device, non_blocking=True)
                # what the policy reads as router probabilities must agree with the replayed routing
                probs = torch.zeros_like(probs).scatter_(1, top_idx, top_w.to(probs.dtype))
            parts = [top_idx.to(torch.float32), top_w.to(torch.float32), probs]
            if speculate:  # layer l+1's router on layer l's MoE input: a guess at the next layer's experts
                guess = self.gates[layer + 1](x)[2]
                if self.replay is not None:  # the gate still runs; the trace's recorded guess is used
                    recorded = self.replay.speculation(request_id, first, x.shape[0], layer)
                    if recorded is not None:
                        guess = recorded.to(x.device, non_blocking=True)
                parts.append(guess.to(torch.float32))
            routed = torch.cat(parts, dim=1).cpu()  # one device->host sync per layer
        idx_cpu, w_cpu = routed[:, :k].to(torch.int64), routed[:, k:2 * k]
        probs_cpu = routed[:, 2 * k:2 * k + num_experts]
        spec_cpu = routed[:, 2 * k + num_experts:].to(torch.int64) if speculate else None
        for observer in self.observers:
            observer.routed(layer, idx_cpu, w_cpu, probs_cpu, spec_cpu)
        # The policy hears the routing now, but its prefetches are issued after this layer's own
        # demand loads: the copy stream is in order, and what is needed now goes first.
        ahead = [self.policy.router_done(layer, idx_cpu, probs_cpu)]
        if spec_cpu is not None and self.policy.wants_speculation:
            ahead.append(self.policy.speculated(layer + 1, spec_cpu))

        flat = idx_cpu.flatten()  # row r = token * k + j
        rows_by_expert = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.cache.num_experts).tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        rows_dev = rows_by_expert.to(x.device, non_blocking=True)
        needed = [e for e, c in enumerate(counts) if c]
        resident_first = sorted(needed, key=lambda e: not self.cache.holds((layer, e)))

        contrib = torch.empty((x.shape[0] * k, x.shape[1]), dtype=x.dtype, device=x.device)
        weights = top_w.reshape(-1)
        pending, in_flight = deque(resident_first), deque()
        while pending or in_flight:
            while pending and (self.cache.holds((layer, pending[0])) or self.cache.can_make_room()):
                e = pending.popleft()
                slot, _ = self.cache.acquire((layer, e))
                in_flight.append((e, slot))
            for plan in ahead:
                self.apply(plan)
            ahead = []
            e, slot = in_flight.popleft()
            rows = rows_dev[starts[e]:starts[e + 1]]
            self.engine.wait_ready(slot)
            span = self.timeline.start("compute", "expert", layer, e)
            y = self.fmt.forward(self.engine.slot(slot), x.index_select(0, rows // k))
            contrib.index_copy_(0, rows, (y * weights.index_select(0, rows)[:, None]).to(x.dtype))
            self.engine.mark_read(slot)
            self.timeline.end(span)
            self.cache.unpin((layer, e))

        per_token = contrib.view(x.shape[0], k, x.shape[1])
        order = top_idx.argsort(dim=1)
        per_token = per_token.gather(1, order[:, :, None].expand(-1, -1, x.shape[1]))
        out = per_token[:, 0]
        for j in range(1, k):
            out = out + per_token[:, j]
        self.apply(self.policy.layer_done(layer))
        return out.reshape(shape)


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

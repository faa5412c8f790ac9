"""Continuous batching: requests wait, join after their prefill, decode together, leave when done.

One engine for both ways requests come: ``Runtime.generate_many`` (a fixed list, arrival times
replayed) and the server (``duoserve_core.server``: requests from clients at any time, cancelled
when a client goes away). The schedule is prefill first: whenever fewer than ``max_batch``
requests decode and one waits, the next waiting request is prefilled alone and joins; otherwise
every active request decodes one token in one forward (``OffloadedMixtral.decode``: the
MoE over all of them, so an expert is copied once per step for every request that needs it).

A request samples with its own generator (seeded by its ``seed``) and keeps its id, so its
tokens do not depend on its batch mates (``tests/test_batching.py``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .policy import Phase

# why a request left: OpenAI's ``finish_reason`` values, and ours for a request nobody waits for
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


@dataclass
class Request:
    """One prompt to generate for: its token ids, its limits, and who hears its tokens."""

    index: int                      # the request id (a routing trace replays its request ``index``)
    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    arrival_s: float = 0.0          # when it arrived, on the batcher's clock
    # called on the engine's thread with each token and, on its last, why it finished (else None)
    on_token: Callable[[int, str | None], None] | None = None


class ActiveRequest:
    """A request after its prefill: its KV-cache row, its sampler, what it produced and when."""

    def __init__(self, request: Request, kv_row: int, started_s: float):
        self.request, self.kv_row, self.started_s = request, kv_row, started_s
        self.generator = torch.Generator().manual_seed(request.seed)
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.logits: list[torch.Tensor] = []
        self.finish_reason: str | None = None

    @property
    def index(self) -> int:
        return self.request.index

    def take(self, logits: torch.Tensor, eos: set[int], keep_logits: bool, now_s: float) -> bool:
        """Sample this step's token, tell the listener; whether the request is finished."""
        token = sample(logits, self.request.temperature, self.generator)
        self.tokens.append(token)
        self.times.append(now_s)
        if keep_logits:
            self.logits.append(logits.cpu())
        if token in eos:
            self.finish_reason = STOP
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = LENGTH
        if self.request.on_token is not None:
            self.request.on_token(token, self.finish_reason)
        return self.finish_reason is not None


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else a draw from the softmax at ``temperature`` with ``generator``."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Batcher:
    """The waiting queue and the active batch of one runtime; ``step`` runs one forward.

    ``clock`` gives the seconds that arrival, start and token times are measured on (the caller's
    run clock). Not thread-safe: one thread submits, cancels and steps (the server's engine thread).
    """

    def __init__(self, runtime, max_batch: int, eos: set[int], keep_logits: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        self.runtime, self.max_batch, self.eos, self.keep_logits, self.clock = runtime, max_batch, eos, keep_logits, clock
        self.waiting: deque[Request] = deque()
        self.active: list[ActiveRequest] = []
        self.free_rows = list(range(max_batch))
        for row in self.free_rows:  # a run cut short (an interrupt) may have left rows filled
            runtime.model.kv.release(row)
        self.steps = self.decode_steps = self.decoded = 0
        self.decode_s = 0.0  # time in decode steps: the batch's throughput apart from its prefills

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, index: int) -> ActiveRequest | None:
        """Drop request ``index`` wherever it is (its KV row is freed); the dropped request, if it had
        started, with ``finish_reason`` ``cancelled``."""
        for request in self.waiting:
            if request.index == index:
                self.waiting.remove(request)
                return None
        for active in self.active:
            if active.index == index:
                active.finish_reason = CANCELLED
                self._leave(active)
                return active
        return None

    def step(self) -> list[ActiveRequest]:
        """One forward: the next waiting request's prefill if there is room, else one decode token for
        every active request. Returns the requests that finished in it."""
        if self.waiting and len(self.active) < self.max_batch:
            request = self.waiting.popleft()
            active = ActiveRequest(request, self.free_rows.pop(0), self.clock())
            self.runtime.executor.begin_step(self.steps, Phase.PREFILL, [(request.index, 0, len(request.ids))])
            logits = self.runtime.model.prefill(request.ids, active.kv_row)
            self.steps += 1
            self.active.append(active)
            finished = [active] if active.take(logits[0], self.eos, self.keep_logits, self.clock()) else []
        elif self.active:
            began = self.clock()
            rows = [r.kv_row for r in self.active]
            self.runtime.executor.begin_step(
                self.steps, Phase.DECODE,
                [(r.index, len(r.request.ids) + len(r.tokens) - 1, 1) for r in self.active])
            logits = self.runtime.model.decode([r.tokens[-1] for r in self.active], rows)
            self.steps += 1
            self.decode_steps += 1
            self.decoded += len(self.active)
            now = self.clock()
            finished = [r for r, row in zip(self.active, logits) if r.take(row, self.eos, self.keep_logits, now)]
            self.decode_s += now - began
        else:
            return []
        for r in finished:
            self._leave(r)
        return finished

    def _leave(self, active: ActiveRequest) -> None:
        self.active.remove(active)
        self.free_rows.append(active.kv_row)
        self.runtime.model.kv.release(active.kv_row)

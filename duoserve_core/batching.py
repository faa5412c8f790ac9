"""Continuous batching: requests wait, join after their prefill, decode together, leave when done.

One engine for both ways requests come: ``Runtime.generate_many`` (a fixed list, arrival times
replayed) and the server (``duoserve_core.server``: requests from clients at any time, cancelled
when a client goes away). Whenever fewer than ``max_batch`` requests decode and one waits, the
next waiting request's prompt runs (alone, or with the others' decode tokens: ``schedule``) and it
joins; otherwise every active request decodes one token in one forward (``OffloadedMixtral.decode``: the
MoE over all of them, so an expert is copied once per step for every request that needs it).

A request samples with its own generator (seeded by its ``seed``) and keeps its id, so its
tokens do not depend on its batch mates (``tests/test_batching.py``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .errors import KnobError
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
    """A request from its first prompt step: its KV-cache row, its sampler, what it produced and when."""

    def __init__(self, request: Request, kv_row: int, started_s: float):
        self.request, self.kv_row, self.started_s = request, kv_row, started_s
        self.generator = torch.Generator().manual_seed(request.seed)
        self.prompt_done = 0            # prompt tokens in its KV row so far
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.logits: list[torch.Tensor] = []
        self.finish_reason: str | None = None

    @property
    def index(self) -> int:
        return self.request.index

    def take(self, logits: torch.Tensor | None, eos: set[int], keep_logits: bool, now_s: float) -> bool:
        """Sample this step's token, tell the listener; whether the request is finished. Without logits
        (the simulator's steps) the token is a placeholder, 0."""
        token = 0 if logits is None else sample(logits, self.request.temperature, self.generator)
        self.tokens.append(token)
        self.times.append(now_s)
        if keep_logits and logits is not None:
            self.logits.append(logits.cpu())
        if token in eos:
            self.finish_reason = STOP
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = LENGTH
        if self.request.on_token is not None:
            self.request.on_token(token, self.finish_reason)
        return self.finish_reason is not None

    def latencies(self) -> dict:
        """When it arrived (on the batcher's clock) and, from then, its queueing (until its first prompt
        step), TTFT and E2E; its TPOT, (last token - first token) / (tokens - 1)."""
        first, last, arrived, n = self.times[0], self.times[-1], self.request.arrival_s, len(self.tokens)
        return {"arrival_s": arrived, "queue_s": self.started_s - arrived, "ttft_s": first - arrived,
                "tpot_s": (last - first) / (n - 1) if n > 1 else None, "e2e_s": last - arrived}


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else a draw from the softmax at ``temperature`` with ``generator``."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


SCHEDULES = ("prefill-first", "mixed")
DEFAULT_SCHEDULE = "mixed"  # measured on the H200: see docs/cli.md ("Prefill schedules")


class StepForward(Protocol):
    """What a batcher step runs: the runtime's model (``Runtime.batcher``), or the simulator's clocks."""

    def __call__(self, step: int, phase: Phase, segments: list[tuple[int, int, int]],
                 decode: tuple[list[int], list[int]] | None,
                 chunk: tuple[list[int], int] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One forward of the decode tokens ``(tokens, KV rows)`` and a prompt chunk ``(ids, KV row)``, either
        may be absent; ``segments`` say where their tokens sit, decode tokens first. Returns the decode
        logits and the chunk's last position's logits (``None`` where absent, or with no model)."""

    def release(self, row: int) -> None:
        """KV row ``row`` is free."""


class Batcher:
    """The waiting queue and the active batch of one runtime (or simulator); ``step`` runs one forward.

    ``schedule``: ``prefill-first`` prefills a newcomer alone, in one forward, while the others wait
    (their decode pauses for one prefill); ``mixed`` runs its prompt, in chunks of ``prefill_chunk``
    tokens (default: the whole prompt), in the same forward as one decode token of every active
    request. On an offloaded model a prompt of a few hundred tokens touches every expert of every
    layer, so a prompt step costs the copy of the whole model whatever else rides in it: the decode
    tokens ride for free, while each extra chunk costs another full pass. ``mixed``, whole prompts, is
    the default: on the H200 it cut TPOT p50 by 19-37% under Poisson arrivals at an equal TTFT p99
    (docs/cli.md, "Prefill schedules").

    ``clock`` gives the seconds that arrival, start and token times are measured on (the caller's
    run clock). Not thread-safe: one thread submits, cancels and steps (the server's engine thread).
    """

    def __init__(self, forward: StepForward, max_batch: int, eos: set[int], keep_logits: bool = False,
                 clock: Callable[[], float] = time.perf_counter, schedule: str = DEFAULT_SCHEDULE,
                 prefill_chunk: int | None = None):
        if schedule not in SCHEDULES:
            raise KnobError(f"unknown prefill schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if prefill_chunk is not None and (schedule != "mixed" or isinstance(prefill_chunk, bool)
                                          or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise KnobError(f"prefill_chunk {prefill_chunk!r}: a whole number of tokens, with the mixed schedule only")
        self.forward, self.max_batch, self.eos, self.keep_logits, self.clock = forward, max_batch, eos, keep_logits, clock
        self.schedule, self.prefill_chunk = schedule, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.active: list[ActiveRequest] = []
        self.filling: ActiveRequest | None = None   # a request whose prompt is partly in its KV row
        self.free_rows = list(range(max_batch))
        for row in self.free_rows:  # a run cut short (an interrupt) may have left rows filled
            forward.release(row)
        # decode steps (decode tokens only): their count, tokens and time, the batch's decode throughput;
        # a prompt step's riding decode tokens (the mixed schedule) count with the prompt's step, whose
        # count and time are kept apart (where a run's time went: decode, or prompts)
        self.steps = self.decode_steps = self.decoded = self.prompt_steps = 0
        self.decode_s = self.prompt_s = 0.0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active or self.filling)

    @property
    def mean_batch(self) -> float:
        """Requests per decode step, on average."""
        return self.decoded / self.decode_steps if self.decode_steps else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens of decode steps per second of them: the batch's decode throughput."""
        return self.decoded / self.decode_s if self.decode_s else 0.0

    def run(self, requests: list[Request], wait: Callable[[float], None]) -> dict[int, ActiveRequest]:
        """Every request submitted once the clock reaches its arrival (in arrival order, ties in the given
        order), stepping until all have finished; ``wait(t)`` brings an idle batcher's clock to ``t`` (a
        sleep on the runtime, a jump on the simulator). The finished requests by index."""
        pending = sorted(requests, key=lambda r: r.arrival_s)
        done: dict[int, ActiveRequest] = {}
        while pending or self.busy:
            while pending and pending[0].arrival_s <= self.clock():
                self.submit(pending.pop(0))
            if not self.busy:
                wait(pending[0].arrival_s)
                continue
            for r in self.step():
                done[r.index] = r
        return done

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, index: int) -> ActiveRequest | None:
        """Drop request ``index`` wherever it is (its KV row is freed); the dropped request, if it had
        started, with ``finish_reason`` ``cancelled``."""
        for request in self.waiting:
            if request.index == index:
                self.waiting.remove(request)
                return None
        if self.filling is not None and self.filling.index == index:
            dropped, self.filling = self.filling, None
            self._free(dropped)
            dropped.finish_reason = CANCELLED
            return dropped
        for active in self.active:
            if active.index == index:
                active.finish_reason = CANCELLED
                self._leave(active)
                return active
        return None

    def step(self) -> list[ActiveRequest]:
        """One forward: a prompt (or its next chunk) if one is being filled or waits with room for it,
        else one decode token for every active request. Returns the requests that finished in it."""
        if self.filling is None and self.waiting and len(self.active) < self.max_batch:
            self.filling = ActiveRequest(self.waiting.popleft(), self.free_rows.pop(0), self.clock())
        if self.filling is not None:
            finished = self._prompt_step(self.filling)
        elif self.active:
            riding = list(self.active)
            began = self.clock()
            logits, _ = self.forward(self.steps, Phase.DECODE, _decode_segments(riding), _decode_inputs(riding), None)
            self.steps += 1
            self.decode_steps += 1
            self.decoded += len(riding)
            now = self.clock()
            self.decode_s += now - began
            finished = _take_all(riding, logits, self.eos, self.keep_logits, now)
        else:
            return []
        for r in finished:
            self._leave(r)
        return finished

    def _prompt_step(self, fill: ActiveRequest) -> list[ActiveRequest]:
        ids, start = fill.request.ids, fill.prompt_done
        chunk = ids[start:] if self.prefill_chunk is None else ids[start:start + self.prefill_chunk]
        riding = list(self.active) if self.schedule == "mixed" else []
        began = self.clock()
        logits, last = self.forward(self.steps, Phase.PREFILL,
                                    _decode_segments(riding) + [(fill.index, start, len(chunk))],
                                    _decode_inputs(riding) if riding else None, (chunk, fill.kv_row))
        self.steps += 1
        self.prompt_steps += 1
        now = self.clock()
        self.prompt_s += now - began
        finished = _take_all(riding, logits, self.eos, self.keep_logits, now)
        fill.prompt_done += len(chunk)
        if fill.prompt_done == len(ids):
            self.filling = None
            self.active.append(fill)
            if fill.take(None if last is None else last[0], self.eos, self.keep_logits, self.clock()):
                finished.append(fill)
        return finished

    def _leave(self, active: ActiveRequest) -> None:
        self.active.remove(active)
        self._free(active)

    def _free(self, request: ActiveRequest) -> None:
        self.free_rows.append(request.kv_row)
        self.forward.release(request.kv_row)


def _take_all(riding: list[ActiveRequest], logits: torch.Tensor | None, eos: set[int], keep_logits: bool,
              now: float) -> list[ActiveRequest]:
    """Each riding request takes its decode token (a placeholder without logits); those that finished."""
    rows = [None] * len(riding) if logits is None else logits
    return [r for r, row in zip(riding, rows) if r.take(row, eos, keep_logits, now)]


def _decode_segments(riding: list[ActiveRequest]) -> list[tuple[int, int, int]]:
    return [(r.index, len(r.request.ids) + len(r.tokens) - 1, 1) for r in riding]


def _decode_inputs(riding: list[ActiveRequest]) -> tuple[list[int], list[int]]:
    return [r.tokens[-1] for r in riding], [r.kv_row for r in riding]

"""The engine: one thread owns the continuous batcher; everything else talks to it through an inbox.

``Batcher`` is not thread-safe, and a forward pass blocks for as long as it computes, so it cannot
run on the server's event loop. The engine thread therefore does all of it: it drains the inbox
(submissions and cancellations from request handlers, on any thread), then runs one ``step``;
while nothing waits or decodes it blocks on the inbox instead of spinning. Each request's tokens
go back through its ``Sink``, called on the engine thread (the server's sink hands them to the
event loop with ``call_soon_threadsafe``).

A step that raises (out of memory, a bug) fails the requests that were in the forward pass, with
the error's message, and the engine keeps serving: a fresh batcher frees every KV row (a prefill
that raised had already taken one), and the requests still waiting are carried over to it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..batching import DEFAULT_SCHEDULE, Request
from ..errors import BudgetError

log = logging.getLogger(__name__)


class EngineFailure(Exception):
    """A request's generation ended with an error (a failed step, or the server stopping)."""


# what a request's listener receives: (token, finish_reason) per token, or the failure that ended it
Sink = Callable[["tuple[int, str | None] | EngineFailure"], None]


@dataclass(frozen=True)
class _Submit:
    request: Request
    sink: Sink


@dataclass(frozen=True)
class _Cancel:
    index: int
    counted: bool


_STOP = object()


class Engine:
    """The batcher's thread. ``submit`` and ``cancel`` may be called from any thread.

    ``cancelled`` counts requests dropped because their client went away (not those ended by a stop
    string); ``failed_steps`` counts steps that raised. Both are for tests and monitoring.
    """

    def __init__(self, runtime, max_batch: int, prefill_schedule: str = DEFAULT_SCHEDULE,
                 prefill_chunk: int | None = None):
        if max_batch > runtime.plan.max_batch:  # the batcher would write past the KV cache's rows
            raise BudgetError(f"max_batch {max_batch}: the runtime's memory plan holds the KV caches of "
                              f"{runtime.plan.max_batch} request(s); load it with max_batch={max_batch}")
        self.runtime, self.max_batch = runtime, max_batch
        self.schedule = (prefill_schedule, prefill_chunk)
        self.eos = runtime.eos_ids()
        self.batcher = runtime.batcher(max_batch, self.eos, prefill_schedule=prefill_schedule,
                                       prefill_chunk=prefill_chunk)
        self.cancelled = self.failed_steps = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[int, Sink] = {}   # requests submitted and not yet finished (engine thread only)
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="duoserve-engine", daemon=True)

    @property
    def active(self) -> int:
        """Requests decoding now (their KV rows taken)."""
        return len(self.batcher.active)

    @property
    def pending(self) -> int:
        """Requests submitted and not finished, failed or cancelled yet."""
        return len(self._sinks)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still running fail with 'the server is stopping'."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join()

    def submit(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int, sink: Sink) -> int:
        """Queue one request (already checked against the runtime); its id, for ``cancel``."""
        index = next(self._ids)
        self._inbox.put(_Submit(Request(index, ids, max_new_tokens, temperature, seed), sink))
        return index

    def cancel(self, index: int, counted: bool = True) -> None:
        """Drop request ``index`` (its KV row is freed); nothing if it has finished. ``counted``: its client
        went away (``cancelled`` rises), rather than a stop string ending it."""
        self._inbox.put(_Cancel(index, counted))

    def _run(self) -> None:
        try:
            while True:
                message = self._inbox.get() if not self.batcher.busy else self._next()
                while message is not None:
                    if message is _STOP:
                        return
                    self._handle(message)
                    message = self._next()
                if self.batcher.busy:
                    self._step()
        finally:
            self._fail(list(self._sinks), "the server is stopping")

    def _next(self):
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, message: _Submit | _Cancel) -> None:
        if isinstance(message, _Submit):
            self._sinks[message.request.index] = message.sink
            message.request.on_token = lambda token, reason: message.sink((token, reason))
            self.batcher.submit(message.request)
        elif message.index in self._sinks:
            self.batcher.cancel(message.index)
            del self._sinks[message.index]
            self.cancelled += message.counted

    def _step(self) -> None:
        try:
            finished = self.batcher.step()
        except Exception as exc:  # noqa: BLE001 - any failure of a forward must not end the server
            self._recover(exc)
            return
        for request in finished:
            self._sinks.pop(request.index, None)

    def _recover(self, exc: Exception) -> None:
        """Fail the requests of the step that raised; carry the waiting ones over to a fresh batcher."""
        log.exception("a batcher step failed; failing the requests in it")
        self.failed_steps += 1
        waiting = list(self.batcher.waiting)
        waiting_ids = {r.index for r in waiting}
        self._fail([i for i in self._sinks if i not in waiting_ids], f"generation failed: {type(exc).__name__}: {exc}")
        self.batcher = self.runtime.batcher(self.max_batch, self.eos, prefill_schedule=self.schedule[0],
                                            prefill_chunk=self.schedule[1])  # releases every KV row
        for request in waiting:
            self.batcher.submit(request)

    def _fail(self, indices: list[int], message: str) -> None:
        for index in indices:
            self._sinks.pop(index)(EngineFailure(message))

"""One HTTP request's generations on the event loop: submitted together, their text as events.

The engine thread posts each token to an ``asyncio.Queue`` (``call_soon_threadsafe``: the queue is
not thread-safe); ``Generation.events`` turns tokens into text deltas (``TextStream``) and ends a
choice at its finish reason, at a stop string (then cancelled in the batcher, so its KV row is
free at once), or at an engine failure. Whatever ends the iteration early (a client that went
away cancels the task; an error) cancels the choices still running: no KV row outlives its reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request as HttpRequest

from .engine import Engine, EngineFailure
from .text import TextStream

T = TypeVar("T")


@dataclass
class Event:
    """New text of one choice; ``finish_reason`` on its last event ("stop" or "length")."""

    choice: int
    text: str
    finish_reason: str | None


class Generation:
    """The choices of one request: ``prompts[i]`` is choice ``i``, with ``max_tokens[i]`` at most."""

    def __init__(self, engine: Engine, tokenizer, prompts: list[list[int]], max_tokens: list[int],
                 temperature: float, seed: int, stop: list[str]):
        self.engine, self.tokenizer, self.prompts, self.max_tokens = engine, tokenizer, prompts, max_tokens
        self.temperature, self.seed, self.stop = temperature, seed, stop
        self.completion_tokens = 0  # tokens taken into the text (a stop string's tokens included)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def events(self) -> AsyncIterator[Event]:
        """Submit every choice, then yield text as it comes; raises ``EngineFailure`` if one fails."""
        inbox: asyncio.Queue = asyncio.Queue()
        indices = [self.engine.submit(ids, n, self.temperature, self.seed, _sink(inbox, choice))
                   for choice, (ids, n) in enumerate(zip(self.prompts, self.max_tokens))]
        texts = [TextStream(self.tokenizer, self.stop) for _ in self.prompts]
        running = set(range(len(self.prompts)))
        try:
            while running:
                choice, item = await inbox.get()
                if choice not in running:  # tokens already in flight when a stop string ended it
                    continue
                if isinstance(item, EngineFailure):
                    raise item
                token, reason = item
                self.completion_tokens += 1
                text, stopped = texts[choice].add(token)
                if stopped:
                    self.engine.cancel(indices[choice], counted=False)
                    reason = "stop"
                elif reason is not None:
                    text += texts[choice].flush()
                if reason is not None:
                    running.discard(choice)
                yield Event(choice, text, reason)
        finally:
            for choice in running:
                self.engine.cancel(indices[choice])


def _sink(inbox: asyncio.Queue, choice: int):
    """The engine's callback for one choice: hand each item to the event loop that owns ``inbox``."""
    loop = asyncio.get_running_loop()

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, (choice, item))
        except RuntimeError:  # the loop has closed (the server stopped): nobody is listening
            pass
    return post


class ClientGone(Exception):
    """The client closed its connection before the response was ready."""


async def unless_disconnected(request: HttpRequest, work: Awaitable[T]) -> T:
    """``work``'s result, or ``ClientGone`` (``work`` cancelled) once the client disconnects.

    For whole (non-streamed) responses: ASGI servers do not cancel a handler when its client goes
    away, and a request nobody will read must not keep its KV row until its last token.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let its ``finally`` cancel the batcher's requests
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnect(request: HttpRequest) -> None:
    """Return when the client disconnects (after the body was read, the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

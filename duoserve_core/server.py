"""An OpenAI-compatible HTTP server over the continuous batcher (``python -m duoserve_core serve``).

``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, whole or streamed
as server-sent events. Every request becomes batcher requests on the engine thread
(``serving.engine``), decoded together with whatever else is running; a client that disconnects
has its requests cancelled (their KV rows freed at once). A bad request is refused before
anything is submitted, with OpenAI's error body, so it never disturbs the requests running.

FastAPI rather than a hand-written ASGI app: it parses and validates the bodies with pydantic
models, and uvicorn serves it (the CLI binds the socket itself, so a port in use is one line and
exit 2 like every other error of the project).
"""

from __future__ import annotations

import json
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .batching import DEFAULT_SCHEDULE
from .errors import DuoServeError, PromptError
from .collector import long_lived_objects_frozen
from .serving.engine import Engine, EngineFailure
from .serving.generation import ClientGone, Generation, unless_disconnected
from .serving.protocol import ApiError, ChatRequest, CompletionRequest, validation_error

OWNER = "duoserve-lab"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ListenError(DuoServeError, RuntimeError):
    """The server cannot listen where it was asked to (the port is taken, the address is not ours)."""


def create_app(runtime, *, max_batch: int, model_name: str | None = None, prefill_schedule: str = DEFAULT_SCHEDULE,
               prefill_chunk: int | None = None) -> FastAPI:
    """The app over ``runtime``: its engine (``app.state.engine``) starts and stops with the app."""
    if runtime.tokenizer is None:
        raise PromptError(f"{runtime.source.name} has no tokenizer; the server answers with text, so serve a "
                          "checkpoint with tokenizer files")
    engine = Engine(runtime, max_batch, prefill_schedule, prefill_chunk)
    name = model_name or runtime.source.name

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        with long_lived_objects_frozen():  # what start-up made, out of the collector's way (collector.py)
            engine.start()
            try:
                yield
            finally:
                engine.stop()

    app = FastAPI(title="duoserve", lifespan=lifespan)
    app.state.engine, app.state.model_name = engine, name
    _add_error_handlers(app)
    api = _Api(runtime, engine, name)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions", response_model=None)(api.completions)
    app.post("/v1/chat/completions", response_model=None)(api.chat)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, and schema errors as 400 (FastAPI would answer 422)."""
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(_request, validation_error(list(exc.errors())))

    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(_request, ApiError(exc.status_code, str(exc.detail)))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)


@dataclass(frozen=True)
class _Shape:
    """How one endpoint names its objects and writes a choice, whole or as a streamed delta."""

    prefix: str
    whole: str
    chunk: str
    chat: bool

    def whole_choice(self, index: int, text: str, reason: str | None) -> dict:
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": index, **body, "finish_reason": reason, "logprobs": None}

    def chunk_choice(self, index: int, text: str, reason: str | None) -> dict:
        body = {"delta": {"content": text} if text else {}} if self.chat else {"text": text}
        return {"index": index, **body, "finish_reason": reason, "logprobs": None}


COMPLETION = _Shape("cmpl", "text_completion", "text_completion", chat=False)
CHAT = _Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)


class _Api:
    """The endpoints: checks and encoding here, generation in ``Generation``, formatting in ``_respond``."""

    def __init__(self, runtime, engine: Engine, name: str):
        self.runtime, self.engine, self.name = runtime, engine, name

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": OWNER}]}

    async def completions(self, body: CompletionRequest, request: Request) -> Response | dict:
        self._check(body)
        prompts = [self._encode(p, "prompt") for p in body.prompts()]
        max_tokens = [body.max_tokens or DEFAULT_MAX_TOKENS] * len(prompts)
        return await self._respond(request, body, self._generation(body, prompts, max_tokens), COMPLETION)

    async def chat(self, body: ChatRequest, request: Request) -> Response | dict:
        self._check(body)
        ids = self._chat_ids(body)
        limit = body.max_completion_tokens or body.max_tokens or max(1, self.runtime.max_context - len(ids))
        return await self._respond(request, body, self._generation(body, [ids], [limit]), CHAT)

    def _check(self, body: CompletionRequest | ChatRequest) -> None:
        body.check_supported()
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {self.name!r} "
                                "(GET /v1/models)", "model", "model_not_found")

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        try:
            return self.runtime.encode(prompt, None) if isinstance(prompt, str) else self.runtime.encode(None, prompt)
        except PromptError as exc:
            raise ApiError(400, str(exc), param) from exc

    def _chat_ids(self, body: ChatRequest) -> list[int]:
        """The messages through the tokenizer's chat template, with the assistant's turn opened."""
        tokenizer = self.runtime.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"the tokenizer of {self.name} has no chat template, so messages cannot be turned "
                                "into a prompt; use /v1/completions with a prompt", "messages")
        try:
            text = tokenizer.apply_chat_template([m.as_template_input() for m in body.messages],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template raises whatever its author chose (jinja's errors)
            raise ApiError(400, f"the chat template refused the messages: {exc}", "messages") from exc
        return self._encode(tokenizer(text, add_special_tokens=False)["input_ids"], "messages")

    def _generation(self, body: CompletionRequest | ChatRequest, prompts: list[list[int]],
                    max_tokens: list[int]) -> Generation:
        """The request's generations, every prompt checked against the runtime's limits first."""
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = random.randrange(2**63) if body.seed is None else body.seed
        for i, (ids, n) in enumerate(zip(prompts, max_tokens)):
            try:
                self.runtime.check_request(ids, n, temperature, seed, f"prompt {i}: " if len(prompts) > 1 else "")
            except PromptError as exc:
                raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens"), "max_tokens") from exc
        return Generation(self.engine, self.runtime.tokenizer, prompts, max_tokens, temperature, seed, body.stops())

    async def _respond(self, request: Request, body, generation: Generation, shape: _Shape) -> Response | dict:
        head = {"id": f"{shape.prefix}-{uuid.uuid4().hex}", "object": shape.whole, "created": int(time.time()),
                "model": self.name}
        if body.stream:
            return StreamingResponse(_sse(generation, {**head, "object": shape.chunk}, shape, body.include_usage),
                                     media_type="text/event-stream")
        try:
            texts, reasons = await unless_disconnected(request, _collect(generation))
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except EngineFailure as exc:
            raise ApiError(500, str(exc), kind="server_error") from exc
        choices = [shape.whole_choice(i, texts[i], reasons[i]) for i in range(len(texts))]
        return {**head, "choices": choices, "usage": generation.usage()}


async def _collect(generation: Generation) -> tuple[list[str], list[str | None]]:
    """Every choice's whole text and finish reason."""
    texts, reasons = [""] * len(generation.prompts), [None] * len(generation.prompts)
    async for event in generation.events():
        texts[event.choice] += event.text
        reasons[event.choice] = event.finish_reason or reasons[event.choice]
    return texts, reasons


async def _sse(generation: Generation, head: dict, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """The response as server-sent events: deltas, the finish reasons, optionally the usage, ``[DONE]``."""
    def data(choices: list[dict], usage: dict | None = None) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **({'usage': usage} if include_usage else {})})}\n\n"

    if shape.chat:  # OpenAI's first chunk opens the assistant's message
        yield data([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                     "logprobs": None} for i in range(len(generation.prompts))])
    try:
        async for event in generation.events():
            if event.text or event.finish_reason:
                yield data([shape.chunk_choice(event.choice, event.text, event.finish_reason)])
    except EngineFailure as exc:
        yield f"data: {json.dumps(ApiError(500, str(exc), kind='server_error').body())}\n\n"
    else:
        if include_usage:
            yield data([], generation.usage())
    yield "data: [DONE]\n\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ``ListenError`` saying why not (before the model loads)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind((host, port))
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or "
                          "stop what uses it") from exc
    sock.listen(2048)
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM (uvicorn then re-raises the signal: exit 130/143)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    print(f"serving {app.state.model_name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])

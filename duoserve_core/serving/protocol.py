"""The OpenAI request bodies this server takes, and its errors in OpenAI's shape.

Fields a client library sends by default (``user``, ``stream_options``, ...) are accepted; values
the engine cannot honour (``n`` > 1, ``logprobs``, penalties, ``top_p`` < 1) are refused with a
400 that names the field, rather than silently ignored: a client that asked for them would
otherwise get something other than what it asked for without knowing.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI's limit on stop strings


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
        return stops

    def check_supported(self) -> None:
        """Refuse values this server cannot honour (see the module's docstring)."""
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported; this server returns one choice per prompt "
                                "(send several requests, or a list of prompts to /v1/completions)", "n")
        if self.top_p not in (None, 1):
            raise ApiError(400, f"top_p={self.top_p} is not supported; only top_p=1 (use temperature)", "top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ApiError(400, f"{name} is not supported; only 0", name)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt (text, token ids, or a list of either: one choice each)."""

    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "echo=true is not supported", "echo")
        if self.logprobs is not None:
            raise ApiError(400, "logprobs is not supported", "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)) or not self.prompt:
            return [self.prompt]
        return list(self.prompt)


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_template_input(self) -> dict:
        """The message as chat templates take it: content as one string (text parts joined)."""
        if isinstance(self.content, list):
            text = "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        else:
            text = self.content or ""
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise ApiError(400, "logprobs is not supported", "logprobs")


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's validation errors (bad JSON included) as one 400 that names the first field at fault."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "the request body"
    if first.get("type") == "missing":
        return ApiError(400, f"{where} is required", param)
    return ApiError(400, f"{where}: {first['msg']}", param)

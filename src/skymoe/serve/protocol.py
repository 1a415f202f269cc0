"""OpenAI API request models, their validation, and OpenAI-style errors.

Bodies are parsed with pydantic in strict JSON mode (``"10"`` is not an integer, ``1.5`` is
not one either), then checked for ranges and unsupported options by hand so that every refusal
names the parameter and says what is allowed. Unknown fields are ignored, as OpenAI's own
server does, so clients that send newer fields keep working.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings
MAX_LOGPROBS = 20  # alternatives per position
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, None)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM): -1 or 0 = off
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (vLLM): generate exactly max_tokens
    stop_token_ids: list[int] | None = None  # extension (vLLM)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def parse(model: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body against ``model``; a ``400`` APIError naming the field if not."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON: "
                              f"{errors[0].get('ctx', {}).get('error', errors[0]['msg'])}")
        if errors and not errors[0]["loc"]:
            raise bad_request(f"the request body must be a JSON object: {errors[0]['msg']}")
        # A union field reports one error per member; the field and the first reason suffice.
        err = errors[0]
        loc = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p))
        missing = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "missing"]
        if missing:
            raise bad_request(f"missing required parameter '{missing[0]}'", missing[0])
        got = err.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) or len(str(got)) < 60 else \
            type(got).__name__
        field = [p for p in err["loc"] if isinstance(p, str) and not _is_type_tag(p)][-1:]
        expected = _UNIONS.get(field[0]) if field and len(errors) > 1 else None
        reason = f"expected {expected}" if expected else err["msg"]
        raise bad_request(f"invalid value for '{loc}': {reason} (got {shown})", loc) from None


# What the union-typed fields take, said once instead of once per member.
_UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of "
                     "token ids",
           "stop": "a string or a list of strings",
           "content": "a string or a list of text parts"}


def _is_type_tag(part: Any) -> bool:
    # pydantic puts the union member tried into the location, e.g. ('prompt', 'list[int]', 0)
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def check_common(req: _Sampling, vocab_size: int, max_n: int = MAX_N) -> None:
    """Range checks and unsupported options shared by both endpoints."""
    if req.temperature is not None and not (math.isfinite(req.temperature)
                                            and 0 <= req.temperature <= 2):
        raise bad_request(f"temperature must be between 0 and 2, got {req.temperature}",
                          "temperature")
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise bad_request(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"top_k must be -1 or 0 (off) or a positive number, got {req.top_k}",
                          "top_k")
    if not 1 <= req.n <= max_n:
        raise bad_request(f"n must be between 1 and {max_n}, got {req.n}", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value is not None and value != 0:
            raise bad_request(f"{name} is not supported by this server (only 0)", name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    stops = stop_strings(req)
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise bad_request(f"stop takes at most {MAX_STOP} non-empty strings", "stop")
    if req.seed is not None and not _SEED_RANGE[0] <= req.seed <= _SEED_RANGE[1]:
        raise bad_request(f"seed must be between {_SEED_RANGE[0]} and {_SEED_RANGE[1]}", "seed")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")
    for t in req.stop_token_ids or ():
        if not 0 <= t < vocab_size:
            raise bad_request(f"stop_token_ids: {t} is not a token id (0 to {vocab_size - 1})",
                              "stop_token_ids")


def check_completion(req: CompletionRequest, vocab_size: int) -> None:
    """Completion-only checks (the prompt's tokens and lengths are checked after encoding)."""
    check_common(req, vocab_size)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}",
                          "logprobs")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported by this server", "best_of")
    if req.suffix is not None:
        raise bad_request("suffix is not supported by this server", "suffix")
    if isinstance(req.prompt, list):
        if not req.prompt:
            raise bad_request("prompt is an empty list", "prompt")
        if isinstance(req.prompt[0], (str, list)) and len(req.prompt) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got "
                              f"{len(req.prompt)}", "prompt")


def check_chat(req: ChatCompletionRequest, vocab_size: int) -> None:
    """Chat-only checks."""
    check_common(req, vocab_size)
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise bad_request(f"{name} must be at least 1, got {value}", name)
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got "
                              f"{req.top_logprobs}", "top_logprobs")
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if not req.messages:
        raise bad_request("messages is empty; send at least one message", "messages")
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise bad_request(f"{name} (tool calling) is not supported by this server", name)
    if req.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported by this server", "tool_choice")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise bad_request("response_format other than {\"type\": \"text\"} is not supported "
                          "by this server", "response_format")


def stop_strings(req: _Sampling) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a chat message: a string, or a list of ``{"type": "text"}`` parts."""
    param = f"messages.{index}.content"
    if message.content is None:
        raise bad_request(f"{param}: a message needs content", param)
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{param}: only text content parts ({{\"type\": \"text\", "
                              f"\"text\": ...}}) are supported, got type "
                              f"{part.get('type')!r}", param)
        parts.append(part["text"])
    return "".join(parts)

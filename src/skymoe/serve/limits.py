"""Limits that keep one careless or hostile client from holding the server: a cap on request
bodies (refused with 413 before they are read whole), a deadline for a request's body (408)
and a deadline for its headers (the connection is closed: a slowloris client cannot hold a
socket forever)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import anyio
import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import MAX_PROMPTS, APIError

_BODY_METHODS = {"POST", "PUT", "PATCH"}
_BYTES_PER_PROMPT_TOKEN = 8  # the most a token id takes in JSON: "1234567, "
_MIN_REQUEST_BYTES = 1 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    """A body that holds ``MAX_PROMPTS`` full-context prompts as token-id lists, at least
    1 MiB: any request the server could accept fits, a 50 MB body does not."""
    return max(_MIN_REQUEST_BYTES, MAX_PROMPTS * max_model_len * _BYTES_PER_PROMPT_TOKEN)


@dataclass(frozen=True)
class RequestLimits:
    """``max_request_bytes`` per body (None: ``default_max_request_bytes`` of the served
    context, see ``for_context``), ``header_timeout_s`` from the connection (or the end of the
    previous response) to a request's last header line, ``body_timeout_s`` from the headers to
    the body's last byte."""

    max_request_bytes: int | None = None
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def check(self) -> None:
        """A ValueError naming the flag of a limit that cannot work."""
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        for flag, value in (("--header-timeout", self.header_timeout_s),
                            ("--body-timeout", self.body_timeout_s)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0 seconds, got {value}")

    def for_context(self, max_model_len: int) -> RequestLimits:
        """These limits with the body cap filled in for a server of ``max_model_len``."""
        if self.max_request_bytes is not None:
            return self
        return replace(self, max_request_bytes=default_max_request_bytes(max_model_len))


class BodyLimit:
    """ASGI middleware: reads a request's body before the app sees it, refusing it with 413 as
    soon as it is known to exceed the cap (a ``Content-Length`` too large is refused unread)
    and with 408 when it does not arrive within the deadline. Either refusal closes the
    connection, since the rest of the body is never read."""

    def __init__(self, app, limits: RequestLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        cap = self.limits.max_request_bytes
        assert cap is not None, "give BodyLimit limits resolved with for_context"
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            await _refuse(scope, receive, send, _too_large(f"is {declared} bytes", cap))
            return
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.limits.body_timeout_s):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client is gone: nothing to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > cap:
                        await _refuse(scope, receive, send, _too_large(f"is larger than {cap} bytes", cap))
                        return
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            await _refuse(scope, receive, send, APIError(
                408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                     f"(it had sent {size} bytes)", code="request_timeout"))
            return
        body = b"".join(chunks)
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        await self.app(scope, replay, send)


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 has refused a malformed length before the app is called
    return None


def _too_large(what: str, cap: int) -> APIError:
    return APIError(413, f"the request body {what}; this server accepts at most {cap} bytes "
                         "(--max-request-bytes)", code="request_too_large")


async def _refuse(scope, receive, send, err: APIError) -> None:
    await JSONResponse(err.body(), status_code=err.status,
                       headers={"Connection": "close"})(scope, receive, send)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on a request's headers: while a connection
    waits for a request line and headers (h11's client state IDLE) and has sent some bytes,
    or has just connected, it must finish them within ``header_timeout_s`` or it is closed.
    (uvicorn's keep-alive timeout covers an idle connection after a response, but no timer
    runs once a client has started a request.)"""

    header_timeout_s = RequestLimits.header_timeout_s  # ``with_header_timeout`` sets another

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            if self._header_deadline is None:  # the start of a new request's headers
                self._arm_header_deadline()
        else:
            self._disarm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # The next request starts idle: uvicorn's keep-alive timer runs until data arrives.
        self._disarm_header_deadline()
        super().on_response_complete()

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection whose request headers took longer "
                              "than %g s", self.header_timeout_s)
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this header deadline."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": seconds})

"""Running the server: the engine loop on the main thread, the app under uvicorn on a second
thread, on one socket."""

from __future__ import annotations

import signal
import socket
import sys
import threading

import torch

from ..checkpoint.tokenizer import Tokenizer
from ..errors import SkymoeError
from ..infer.engine import Engine
from .app import ServerState, build_app
from .chat import ChatTemplate
from .engine_thread import EngineLoop, Lockstep
from .limits import RequestLimits, with_header_timeout
from .metrics import Metrics


class ServeError(SkymoeError):
    """The server cannot start (address in use, bad limits)."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a ServeError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve ({exc})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another "
                         "--port or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(model: torch.nn.Module, tokenizer: Tokenizer, checkpoint: str, *, model_name: str,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_model_len: int | None = None, max_queue: int = 256,
          max_prefill_tokens: int = 2048, log_level: str = "info",
          lockstep: Lockstep | None = None, limits: RequestLimits | None = None) -> int:
    """Serve ``model`` over HTTP until SIGINT or SIGTERM; returns the exit code (1 if the
    engine died). ``checkpoint`` is the directory the chat template is read from; ``limits``
    (default ``RequestLimits()``) bound what one client may send. Call it from the main
    thread: it runs the engine there and uvicorn on a second thread."""
    import uvicorn

    config = model.config
    limit = config.max_position_embeddings
    max_model_len = max_model_len or limit
    if not 2 <= max_model_len <= limit:
        raise ServeError(f"--max-model-len must be between 2 and the model's context of "
                         f"{limit} tokens, got {max_model_len}")
    if max_batch < 1 or max_queue < 1 or max_prefill_tokens < 1:
        raise ServeError("--max-batch, --max-queue and --max-prefill-tokens must be >= 1")
    limits = (limits or RequestLimits()).for_context(max_model_len)
    try:
        limits.check()
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    chat_template = ChatTemplate.load(checkpoint)
    sock = listen(host, port)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_len=max_model_len,
                    max_queue=max_queue, max_prefill_tokens=max_prefill_tokens)
    eos = (tokenizer.eos_id,) if tokenizer.eos_id is not None else \
        tuple(config.eos_token_ids)
    metrics = Metrics()
    server: uvicorn.Server | None = None
    failed = {"engine": False}

    def on_fatal() -> None:  # nothing can generate any more: stop serving
        failed["engine"] = True
        if server is not None:
            server.should_exit = True

    engine_loop = EngineLoop(engine, metrics, lockstep, on_fatal=on_fatal)
    state = ServerState(engine_loop, tokenizer, model_name, max_model_len,
                        config.vocab_size, eos, chat_template, metrics, api_key, limits)
    app = build_app(state)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                           http=with_header_timeout(limits.header_timeout_s)))
    cache_mb = sum(t.numel() * t.element_size() for t in engine.cache.keys + engine.cache.values)
    shown = f"[{host}]" if ":" in host else host
    print(f"skymoe serve: '{model_name}' on http://{shown}:{sock.getsockname()[1]}/v1 "
          f"(up to {max_batch} sequences of {max_model_len} tokens, KV cache "
          f"{cache_mb / 2**20:.0f} MiB, queue {max_queue}, bodies up to "
          f"{limits.max_request_bytes / 2**20:.1f} MiB; chat template: "
          f"{chat_template.origin}; API key {'required' if api_key else 'off'})",
          file=sys.stderr, flush=True)

    def run_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # the server has shut down (its open streams drained first): stop the engine
            engine_loop.request_stop()

    # uvicorn handles signals only on the main thread, which computes here: hand them over.
    previous = {sig: signal.signal(sig, server.handle_exit)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=run_http, name="skymoe-http", daemon=True)
    http.start()
    try:
        engine_loop.run()
    finally:
        server.should_exit = True
        http.join(30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 1 if failed["engine"] else 0

"""The engine loop: the engine on a thread of its own, bridged to asyncio.

The engine is synchronous and not thread-safe, so one thread owns it: it takes commands
(submit a group of requests, cancel requests, stop) from a thread-safe queue between steps,
steps while there is work, and hands each step's tokens and finished sequences to the event
loop in one ``call_soon_threadsafe`` per step. The event loop, on another thread, never waits
for model compute. ``skymoe serve`` runs the engine loop on the main thread and uvicorn on a
second one: on CPU the model's steps ran 1.3-1.45x slower on a secondary thread (measured on
the 2-vCPU development machine, docs/benchmarks.md).

Under tensor parallelism (``Lockstep``) rank 0's engine loop broadcasts the commands it
accepted before every step, and every other rank applies them to its own engine and steps with
it (``run_worker``), so all ranks make the same model calls in the same order. Sampling without
a seed gets one from rank 0, so every rank samples the same token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..infer.engine import Completion, Engine, QueueFullError, Request, TokenLogprobs
from .metrics import Metrics

_HEARTBEAT_S = 1.0  # lock-step ranks hear from rank 0 at least this often, even when idle


class EngineUnavailable(Exception):
    """The engine loop has stopped (shutdown, or a failure under tensor parallelism)."""


@dataclass
class Event:
    """What a sequence did in one step: a new token (``token_id``, sampled at ``time``, a
    ``time.perf_counter()`` value) and the text it releases (the engine's incremental text:
    nothing of a stop string, the held-back rest on the last token), and on its last event the
    ``completion``; ``token_id`` is None when it finished without a new token (cancelled) or
    failed (``error``)."""

    index: int
    token_id: int | None
    time: float
    logprobs: TokenLogprobs | None = None
    completion: Completion | None = None
    error: str | None = None
    text: str = ""


@dataclass
class _Route:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    arrival: float
    last: float | None = None


class Lockstep:
    """Rank 0 broadcasts each step's accepted commands to the other ranks (torch.distributed,
    the default group)."""

    def send(self, ops: list[tuple]) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([ops], src=0)

    def receive(self) -> list[tuple]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _wire(request: Request) -> dict[str, Any]:
    """The fields of ``request`` that decide the model calls and sampling (for other ranks)."""
    return {f: getattr(request, f) for f in ("prompt_ids", "max_tokens", "sampling",
                                             "stop_token_ids", "stop", "request_id",
                                             "logprobs", "prompt_logprobs")}


class EngineLoop:
    """Owns ``engine``: ``run()`` on the thread that should compute (or ``start()`` for a new
    one); ``submit`` and ``cancel`` from event loops on other threads."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None,
                 lockstep: Lockstep | None = None,
                 on_fatal: Callable[[], None] | None = None) -> None:
        """``on_fatal()`` is called (on the engine's thread) if the loop dies: the server
        should stop, since nothing will generate any more."""
        self.engine, self.metrics, self.lockstep = engine, metrics, lockstep
        self.on_fatal = on_fatal
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}
        self._pending: list[tuple[str, Event]] = []  # this step's events, in order
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # no command is queued after the loop has drained
        self.alive = True  # until the loop ends: requests may queue before it starts

    def start(self) -> None:
        """Run the loop on a new thread (``stop()`` ends it)."""
        self._thread = threading.Thread(target=self.run, name="skymoe-engine", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to cancel everything, release the other ranks and return (safe from
        any thread and from signal handlers)."""
        self._commands.put(("stop",))

    def stop(self, timeout: float = 30.0) -> None:
        """``request_stop()`` and wait for a loop started with ``start()``."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----------------------------------------------------------------- event-loop side

    async def submit(self, requests: list[Request], events: asyncio.Queue,
                     arrival: float) -> None:
        """Queue ``requests`` together (all or none: ``QueueFullError`` when the engine's queue
        cannot take them all, ``ValueError`` for a request it refuses). Their events go to
        ``events``, ``Event.index`` being the request's position in ``requests``."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self.alive:
                raise EngineUnavailable("the engine is not running")
            self._commands.put(("submit", requests, events, asyncio.get_running_loop(),
                                arrival, done))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.cancel(r.request_id for r in requests)
            raise

    def cancel(self, request_ids: Iterable[str]) -> None:
        """Cancel requests (waiting or running); their slots are free for the next step."""
        ids = list(request_ids)
        if ids:
            self._commands.put(("cancel", ids))

    # ------------------------------------------------------------------- engine side
    def run(self) -> None:
        """Serve commands and step until stopped (or until the engine fails)."""
        engine = self.engine
        try:
            while True:
                busy = engine.has_work or bool(engine.finished)
                commands = self._take(block=not busy)
                ops, stopping = self._apply(commands)
                if self.lockstep is not None and (ops or stopping or busy or commands is None):
                    self.lockstep.send(ops + ([("shutdown",)] if stopping else []))
                if stopping:
                    break
                if engine.has_work or engine.finished:
                    self._step()
                self._gauges()
        except BaseException as exc:  # a failure under lock-step, or a bug: fail what waits
            traceback.print_exc(file=sys.stderr)
            self._fail_all(f"the engine stopped: {exc}")
            if self.on_fatal is not None:
                self.on_fatal()
        finally:
            with self._lock:
                self.alive = False
                for command in self._take(block=False) or ():
                    if command[0] == "submit":
                        command[-1].set_exception(EngineUnavailable("the engine has stopped"))
            self._gauges()

    def _take(self, block: bool) -> list[tuple] | None:
        """Commands queued so far; when idle, wait for one (under lock-step at most a
        heartbeat, returning None so the other ranks hear from rank 0)."""
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=_HEARTBEAT_S if self.lockstep
                                                   else None))
            except queue.Empty:
                return None
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[tuple] | None) -> tuple[list[tuple], bool]:
        """Apply commands to the engine; returns the accepted operations (for the other
        ranks) and whether to stop."""
        ops: list[tuple] = []
        stopping = False
        for command in commands or ():
            kind = command[0]
            if kind == "stop":
                stopping = True
            elif kind == "cancel":
                for rid in command[1]:
                    if self.engine.cancel(rid):
                        ops.append(("cancel", rid))
            elif kind == "submit":
                ops += self._submit(*command[1:])
        if stopping:  # cancel everything that is still in flight
            for rid in list(self._routes):
                self.engine.cancel(rid)
            self._flush(self.engine.finished)
            self.engine.finished = []
        return ops, stopping

    def _submit(self, requests: list[Request], events: asyncio.Queue,
                loop: asyncio.AbstractEventLoop, arrival: float,
                done: concurrent.futures.Future) -> list[tuple]:
        engine = self.engine
        if len(requests) > engine.max_queue:  # could never fit: not worth a retry
            done.set_exception(ValueError(
                f"this request has {len(requests)} sequences (prompts x n); the server queues "
                f"at most {engine.max_queue}"))
            return []
        room = engine.max_queue - len(engine.waiting)
        if len(requests) > room:
            done.set_exception(QueueFullError(
                f"{len(engine.waiting)} sequences are waiting (the limit is {engine.max_queue})"
                f"; this request needs room for {len(requests)}; retry later"))
            return []
        accepted: list[Request] = []
        for request in requests:
            if self.lockstep is not None and request.sampling.temperature > 0 and \
                    request.sampling.seed is None:  # every rank must draw the same token
                request.sampling = dataclasses.replace(request.sampling,
                                                       seed=random.getrandbits(63))
            request.on_token = self._on_token
            try:
                engine.submit(request)
            except (ValueError, QueueFullError) as exc:
                for r in accepted:  # all or none: not admitted yet, they are still waiting
                    engine.waiting.remove(r)
                done.set_exception(exc)
                return []
            accepted.append(request)
        for index, request in enumerate(accepted):
            self._routes[request.request_id] = _Route(loop, events, index, arrival)
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        done.set_result(None)
        return [("submit", _wire(r)) for r in accepted]

    def _on_token(self, request: Request, token_id: int, delta: str | None) -> None:
        now = time.perf_counter()
        route = self._routes.get(request.request_id)
        if route is None:
            return
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
            if route.last is None:
                self.metrics.ttft.observe(now - route.arrival)
            else:
                self.metrics.itl.observe(now - route.last)
        route.last = now
        lp = request.token_logprobs[-1] if request.logprobs is not None else None
        self._pending.append((request.request_id,
                              Event(route.index, token_id, now, lp, text=delta or "")))

    def _step(self) -> None:
        try:
            done = self.engine.step()
        except Exception as exc:
            if self.lockstep is not None:
                raise  # the other ranks cannot be brought back in step: stop serving
            traceback.print_exc(file=sys.stderr)
            self._fail_all(f"generation failed: {exc}")
            self._reset()
            return
        self._flush(done)

    def _flush(self, done: list[Completion]) -> None:
        """Attach each finished sequence's completion to its last event of this step and hand
        the step's events to the event loops."""
        last = {rid: i for i, (rid, _) in enumerate(self._pending)}
        now = time.perf_counter()
        routes = dict(self._routes)
        for completion in done:
            rid = completion.request_id
            route = self._routes.pop(rid, None)
            if route is None:
                continue
            if self.metrics is not None:
                self.metrics.finished.labels(completion.finish_reason).inc()
                self.metrics.e2e.observe((route.last or now) - route.arrival)
            if rid in last:
                self._pending[last[rid]][1].completion = completion
            else:
                self._pending.append((rid, Event(route.index, None, now, None, completion)))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for rid, event in self._pending:
            route = routes.get(rid)
            if route is not None:
                by_loop.setdefault(route.loop, []).append((route.queue, event))
        self._pending = []
        _post(by_loop)

    def _fail_all(self, message: str) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for rid, route in self._routes.items():
            if self.metrics is not None:
                self.metrics.finished.labels("error").inc()
            by_loop.setdefault(route.loop, []).append(
                (route.queue, Event(route.index, None, time.perf_counter(), error=message)))
        self._routes.clear()
        self._pending = []
        _post(by_loop)

    def _reset(self) -> None:
        """Empty the engine after a failed step (its requests were failed)."""
        engine = self.engine
        for request in list(engine.waiting):
            engine.cancel(request.request_id)
        for run in list(engine.running.values()):
            engine.cancel(run.request.request_id)
        engine.finished = []

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.waiting.set(len(self.engine.waiting))
            self.metrics.running.set(len(self.engine.running))

def _post(by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]]) -> None:
    """One wake-up per event loop for all of its events."""
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop has closed (shutdown)
            pass


def _deliver(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for q, event in items:
        q.put_nowait(event)


def run_worker(engine: Engine, lockstep: Lockstep) -> None:
    """A tensor-parallel rank other than 0: apply rank 0's commands and step with it until
    rank 0 shuts down."""
    while True:
        ops = lockstep.receive()
        for op in ops:
            if op[0] == "shutdown":
                return
            if op[0] == "submit":
                engine.submit(Request(**op[1]))
            elif op[0] == "cancel":
                engine.cancel(op[1])
        if engine.has_work or engine.finished:
            engine.step()

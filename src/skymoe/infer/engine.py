"""A continuous-batching generation engine over a preallocated slot KV cache.

Requests wait in a bounded queue. Each ``step()`` admits waiting requests into free cache
slots (one prefill each, which also samples their first token), then runs one decode step for
every running request together, samples each row with its own settings and random stream,
streams the new tokens to the requests' callbacks, and retires the requests that finished
(stop token, stop string, ``max_tokens``, cancelled), freeing their slots for the next step.

Requests may ask for log-probabilities (``logprobs``, ``prompt_logprobs``): those of the model's
own distribution (log-softmax of the raw logits, before temperature and top-k/top-p), with the
k most likely alternatives. The engine is not thread-safe: call it from one thread (the server
runs it on a dedicated thread and sends it commands).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SkymoeError
from ..checkpoint.tokenizer import TextStream
from .generate import SamplingParams, sample_next


class QueueFullError(SkymoeError):
    """The engine's queue is at its bound; retry later."""


@dataclass
class TokenLogprobs:
    """One token's log-probability under the model (log-softmax of the raw logits) and the
    ``top`` most likely (token id, log-probability) pairs at that position, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Request:
    """One generation request. ``on_token(request, token_id, text_delta)`` is called for every
    generated token (``text_delta`` is None without a tokenizer; text that could start a stop
    string, or an unfinished multi-byte character, comes with a later token).

    ``logprobs`` (k >= 0) records every generated token's ``TokenLogprobs`` with its k most
    likely alternatives in ``token_logprobs``, filled before ``on_token`` sees the token;
    ``prompt_logprobs`` (k >= 0) does the same for the prompt in ``prompt_token_logprobs`` (None
    for the first prompt token, which nothing predicts), filled at admission. Both None: off.
    """

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    on_token: Callable[["Request", int, str | None], None] | None = None
    request_id: str = ""
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    token_logprobs: list[TokenLogprobs] = field(default_factory=list, repr=False)
    prompt_token_logprobs: list[TokenLogprobs | None] = field(default_factory=list, repr=False)


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop", "length" or "cancelled"
    logprobs: list[TokenLogprobs] | None = None  # with Request.logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with Request.prompt_logprobs


@dataclass
class _Running:
    request: Request
    slot: int
    generator: torch.Generator | None
    text: TextStream | None  # None without a tokenizer
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the cache so far (chunked prefill)

    @property
    def prefill_left(self) -> int:
        return len(self.request.prompt_ids) - self.prefilled


class Engine:
    """Continuous batching for ``model`` with up to ``max_batch`` sequences of ``max_len``
    positions (prompt + output) in flight and ``max_queue`` waiting.

    Prefill is batched and chunked: each step prefills at most ``max_prefill_tokens`` prompt
    tokens, taken first come first served (a prompt longer than what is left of the budget
    continues in the next steps, between decode steps of the running requests), in forwards of
    at most that many (padded) tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, max_batch: int = 16,
                 max_len: int = 2048, max_queue: int = 256,
                 max_prefill_tokens: int = 2048) -> None:
        if max_batch < 1 or max_len < 2 or max_queue < 1 or max_prefill_tokens < 1:
            raise ValueError("need max_batch >= 1, max_len >= 2, max_queue >= 1 (every "
                             "request waits in the queue before it gets a slot) and "
                             "max_prefill_tokens >= 1")
        self.max_prefill_tokens = max_prefill_tokens
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.cache = model.new_slot_cache(max_batch, max_len)
        self.device = model.device
        self.waiting: deque[Request] = deque()
        self.running: dict[int, _Running] = {}  # slot -> request
        self.finished: list[Completion] = []
        self._ids = itertools.count()

    # ---------------------------------------------------------------------------- requests
    def submit(self, request: Request) -> str:
        """Queue ``request``; returns its id. Raises ``QueueFullError`` at the queue bound and
        ``ValueError`` for a request that cannot run."""
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(request, name) is not None and getattr(request, name) < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {getattr(request, name)}")
        if len(request.prompt_ids) + request.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                             f"({request.max_tokens}) exceeds the engine's {self.max_len} "
                             "positions per sequence")
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (the limit); retry "
                                 "later")
        request.request_id = request.request_id or f"req-{next(self._ids)}"
        self.waiting.append(request)
        return request.request_id

    def cancel(self, request_id: str) -> bool:
        """Stop a waiting or running request (its slot is free for the next step)."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                self.finished.append(Completion(
                    request_id, len(request.prompt_ids), [], "", "cancelled",
                    [] if request.logprobs is not None else None,
                    request.prompt_token_logprobs if request.prompt_logprobs is not None
                    else None))
                return True
        for slot, run in list(self.running.items()):
            if run.request.request_id == request_id:
                self._retire(slot, "cancelled")
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit, prefill (up to the budget), decode one token for every request past its
        prompt, retire; returns the requests that finished in this step."""
        self._admit()
        self._prefill_step()
        slots = sorted(s for s, run in self.running.items() if run.tokens)
        if slots:
            ids = torch.tensor([[self.running[s].tokens[-1]] for s in slots], device=self.device)
            logits = self.model(ids, cache=self.cache,
                                slots=torch.tensor(slots, device=self.device)).logits[:, -1]
            for row, slot in enumerate(slots):
                self._accept(slot, logits[row])
        done, self.finished = self.finished, []
        return done

    def run(self) -> list[Completion]:
        """Step until every queued and running request has finished."""
        out: list[Completion] = []
        while self.has_work:
            out += self.step()
        out += self.finished  # requests cancelled after the last step
        self.finished = []
        return out

    def _admit(self) -> None:
        """Give waiting requests the free slots (their prefill comes in ``_prefill_step``)."""
        free = [s for s in range(self.max_batch) if s not in self.running]
        while self.waiting and free:
            request, slot = self.waiting.popleft(), free.pop(0)
            self.cache.release(slot)
            params = request.sampling
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed)
            text = (TextStream(self.tokenizer, request.prompt_ids, request.stop)
                    if self.tokenizer is not None else None)
            self.running[slot] = run = _Running(request, slot, gen, text)
            # Prompt logprobs need every position's logits: such prompts go whole, alone.
            if request.prompt_logprobs is not None:
                self._prefill_with_prompt_logprobs(run)

    def _prefill_step(self) -> None:
        """The next chunk of each unfinished prompt, first come first served, until
        ``max_prefill_tokens`` prompt tokens; run as right-padded batches of similar lengths
        (at most that many padded tokens each). A finished prompt samples its first token."""
        budget, chunks = self.max_prefill_tokens, []
        for run in self.running.values():  # admission order
            if budget == 0:
                break
            if run.prefill_left and not run.tokens:
                chunks.append((run, min(run.prefill_left, budget)))
                budget -= chunks[-1][1]
        chunks.sort(key=lambda chunk: chunk[1])
        group: list[tuple[_Running, int]] = []
        for run, n in chunks:  # ascending lengths: the newest chunk is the group's longest
            if group and (len(group) + 1) * n > self.max_prefill_tokens:
                self._prefill(group)
                group = []
            group.append((run, n))
        if group:
            self._prefill(group)

    def _prefill(self, group: list[tuple[_Running, int]]) -> None:
        lengths = [n for _, n in group]
        ids = torch.zeros(len(group), max(lengths), dtype=torch.long)  # right-padded with 0
        for row, (run, n) in enumerate(group):
            ids[row, :n] = torch.tensor(run.request.prompt_ids[run.prefilled:run.prefilled + n])
        slots = [run.slot for run, _ in group]
        logits = self.model(ids.to(self.device), cache=self.cache,
                            slots=torch.tensor(slots, device=self.device),
                            logits_at=torch.tensor(lengths, device=self.device) - 1).logits[:, 0]
        for row, (run, n) in enumerate(group):
            run.prefilled += n
            self.cache.truncate(run.slot, run.prefilled)  # drop the padding
        for row, (run, _) in enumerate(group):
            if not run.prefill_left:
                self._accept(run.slot, logits[row])

    def _prefill_with_prompt_logprobs(self, run: _Running) -> None:
        request = run.request
        prompt = torch.tensor([request.prompt_ids], device=self.device)
        logits = self.model(prompt, cache=self.cache,
                            slots=torch.tensor([run.slot], device=self.device)).logits[0]
        request.prompt_token_logprobs = [None] + compute_logprobs(
            logits[:-1], prompt[0, 1:], request.prompt_logprobs)
        run.prefilled = len(request.prompt_ids)
        self._accept(run.slot, logits[-1])

    def _accept(self, slot: int, logits_V: torch.Tensor) -> None:
        """Sample this slot's next token, stream it, and retire the request if it is done."""
        run = self.running[slot]
        request = run.request
        token = int(sample_next(logits_V[None], request.sampling, run.generator)[0])
        run.tokens.append(token)
        if request.logprobs is not None:
            request.token_logprobs += compute_logprobs(logits_V[None], torch.tensor([token]),
                                                       request.logprobs)
        reason = ("stop" if token in request.stop_token_ids
                  else "length" if len(run.tokens) >= request.max_tokens else None)
        delta = None
        if run.text is not None:
            delta = run.text.push(token)
            if run.text.stopped:  # a stop string
                reason = "stop"
            if reason is not None:
                delta += run.text.finish()
        if request.on_token is not None:
            request.on_token(request, token, delta)
        if reason is not None:
            self._retire(slot, reason)

    def _retire(self, slot: int, reason: str) -> None:
        run = self.running.pop(slot)
        self.cache.release(slot)
        request = run.request
        self.finished.append(Completion(
            request.request_id, len(request.prompt_ids), run.tokens,
            run.text.text if run.text is not None else None, reason,
            request.token_logprobs if request.logprobs is not None else None,
            request.prompt_token_logprobs if request.prompt_logprobs is not None else None))


def compute_logprobs(logits_TV: torch.Tensor, token_ids_T: torch.Tensor,
                     top: int) -> list[TokenLogprobs]:
    """Log-probabilities of ``token_ids_T`` [T] under ``logits_TV`` [T, V] (fp32 log-softmax)
    and each row's ``top`` most likely tokens."""
    logp = torch.log_softmax(logits_TV.float(), dim=-1)
    chosen = logp.gather(-1, token_ids_T.to(logp.device)[:, None])[:, 0].tolist()
    ids = token_ids_T.tolist()
    if top > 0:
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in ids]
    return [TokenLogprobs(t, lp, tp) for t, lp, tp in zip(ids, chosen, tops)]

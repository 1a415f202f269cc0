"""``skymoe bench serve``: a streaming load generator for OpenAI-compatible servers, with the
metrics of vLLM's benchmark_serving.

Every request is a ``/v1/completions`` call with a random prompt of exactly ``input_len``
token ids, ``max_tokens = output_len`` and ``ignore_eos`` (so it generates exactly
``output_len`` tokens), streamed with ``stream_options.include_usage``; at most
``concurrency`` are in flight. Definitions (per request, then mean / median / p99 over
requests, or over all gaps for ITL):

- TTFT: time from sending the request to its first token.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), for requests with > 1 token.
- ITL: the gaps between successive tokens (one SSE chunk per token).
- E2E: time from sending the request to its last token.
- request throughput: completed requests / duration; output tok/s: generated tokens /
  duration; total tok/s: (prompt + generated tokens) / duration; duration is the wall time of
  the whole run (after one warm-up request).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class BenchResult:
    """Aggregates of one run; times in milliseconds, throughputs per second."""

    url: str
    model: str
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class BenchError(Exception):
    """The benchmark cannot run (server unreachable, no model)."""


def _stats(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    ms = np.asarray(values_s) * 1000
    return {"mean": float(ms.mean()), "median": float(np.median(ms)),
            "p99": float(np.percentile(ms, 99))}


async def _one(client, url: str, headers: dict[str, str], body: dict[str, Any]
               ) -> RequestResult:
    import httpx

    result = RequestResult(ok=False, prompt_tokens=len(body["prompt"]))
    start = time.perf_counter()
    last = start
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = last - start
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    if usage:
        result.prompt_tokens = usage["prompt_tokens"]
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no tokens received"
    return result


async def run_bench(url: str, *, concurrency: int, num_prompts: int, input_len: int,
                    output_len: int, model: str | None = None, api_key: str | None = None,
                    seed: int = 0, vocab_size: int | None = None,
                    timeout_s: float = 600.0) -> BenchResult:
    """Run the benchmark against the server at ``url`` (its base, e.g.
    ``http://127.0.0.1:8000``)."""
    import httpx

    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0),
                                 limits=limits) as client:
        try:
            response = await client.get(f"{base}/v1/models", headers=headers)
        except httpx.HTTPError as exc:
            raise BenchError(f"{base}: cannot reach the server ({type(exc).__name__}: "
                             f"{exc})") from None
        if response.status_code != 200:
            raise BenchError(f"{base}/v1/models answered HTTP {response.status_code}: "
                             f"{response.text[:200]}")
        cards = response.json().get("data") or []
        if model is None:
            if not cards:
                raise BenchError(f"{base}/v1/models lists no model; pass --model")
            model = cards[0]["id"]
        card = next((c for c in cards if c.get("id") == model), {})
        vocab = vocab_size or card.get("vocab_size")
        if not vocab:
            raise BenchError("the server does not report its vocabulary size; pass "
                             "--vocab-size")
        rng = random.Random(seed)
        # Ids from 3 up: below are the usual pad/BOS/EOS ids of Llama-style vocabularies.
        prompts = [[rng.randrange(3, vocab) for _ in range(input_len)]
                   for _ in range(num_prompts)]
        endpoint = f"{base}/v1/completions"

        def body(prompt: list[int]) -> dict[str, Any]:
            return {"model": model, "prompt": prompt, "max_tokens": output_len,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}

        warm = await _one(client, endpoint, headers, body(prompts[0]))
        if not warm.ok:
            raise BenchError(f"the warm-up request failed: {warm.error}")
        semaphore = asyncio.Semaphore(concurrency)

        async def limited(prompt: list[int]) -> RequestResult:
            async with semaphore:
                return await _one(client, endpoint, headers, body(prompt))

        began = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - began
    done = [r for r in results if r.ok]
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return BenchResult(
        url=base, model=model, concurrency=concurrency, num_prompts=num_prompts,
        input_len=input_len, output_len=output_len, completed=len(done),
        failed=len(results) - len(done), duration_s=duration, total_input_tokens=n_in,
        total_output_tokens=n_out, request_throughput=len(done) / duration,
        output_throughput=n_out / duration, total_token_throughput=(n_in + n_out) / duration,
        ttft_ms=_stats([r.ttft for r in done]), tpot_ms=_stats(tpot),
        itl_ms=_stats([g for r in done for g in r.itl]), e2e_ms=_stats([r.e2e for r in done]),
        errors=errors[:5])


def format_result(r: BenchResult) -> str:
    """A table of one run, in the layout of vLLM's benchmark_serving."""
    lines = [f"{'=' * 14} Serving Benchmark Result {'=' * 14}"]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name:<40}{value:>14}")

    row("Concurrency:", r.concurrency)
    row("Successful requests:", r.completed)
    row("Failed requests:", r.failed)
    row("Benchmark duration (s):", f"{r.duration_s:.2f}")
    row("Total input tokens:", r.total_input_tokens)
    row("Total generated tokens:", r.total_output_tokens)
    row("Request throughput (req/s):", f"{r.request_throughput:.2f}")
    row("Output token throughput (tok/s):", f"{r.output_throughput:.2f}")
    row("Total token throughput (tok/s):", f"{r.total_token_throughput:.2f}")
    for title, short, stats in (
            ("Time to First Token", "TTFT", r.ttft_ms),
            ("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_ms),
            ("Inter-token Latency", "ITL", r.itl_ms), ("End-to-end Latency", "E2EL", r.e2e_ms)):
        lines.append(f"{title:-^54}")
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            row(f"{label} {short} (ms):", f"{stats[stat]:.2f}")
    lines.append("=" * 54)
    for error in r.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)

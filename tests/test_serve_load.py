"""The server under load: 64 concurrent streams with every token accounted for, and 100
malformed requests that each get a 4xx while the server stays healthy."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from test_serve import KEY, Server, make_checkpoint, metric

MAX_LEN = 96


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    checkpoint = make_checkpoint(root / "model")
    s = Server([str(checkpoint), "--served-model-name", "tiny", "--api-key", KEY,
                "--max-batch", "16", "--max-queue", "128", "--max-model-len", str(MAX_LEN),
                "--threads", "1"], root / "server.log")
    yield s
    s.stop()


def test_64_concurrent_streams_account_for_every_token(server):
    tokens_before = metric(server.url, "skymoe_generation_tokens_total")
    prompt_before = metric(server.url, "skymoe_prompt_tokens_total")

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str, str]:
        stream = await client.completions.create(
            model="tiny", prompt=f"request {i}", max_tokens=4 + i % 9, temperature=0.8,
            seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        usage = chunks[-1].usage
        token_chunks = [c for c in chunks if c.choices]
        assert usage.prompt_tokens == len(f"request {i}") + 1  # bytes + BOS
        assert token_chunks[-1].choices[0].finish_reason == "length"
        text = "".join(c.choices[0].text for c in token_chunks)
        return len(token_chunks), usage.completion_tokens, text, f"request {i}"

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY,
                                      max_retries=0, timeout=120) as client:
            streamed = await asyncio.gather(*(one(client, i) for i in range(64)))
            # The same requests without streaming give the same texts (seeded sampling).
            plain = await asyncio.gather(*(client.completions.create(
                model="tiny", prompt=f"request {i}", max_tokens=4 + i % 9, temperature=0.8,
                seed=i, extra_body={"ignore_eos": True}) for i in range(64)))
            return streamed, plain

    streamed, plain = asyncio.run(run())
    expected = [4 + i % 9 for i in range(64)]
    assert [n for n, _, _, _ in streamed] == expected  # one chunk per token
    assert [u for _, u, _, _ in streamed] == expected
    assert [t for _, _, t, _ in streamed] == [p.choices[0].text for p in plain]
    total = 2 * sum(expected)
    assert metric(server.url, "skymoe_generation_tokens_total") == tokens_before + total
    prompts = 2 * sum(len(f"request {i}") + 1 for i in range(64))
    assert metric(server.url, "skymoe_prompt_tokens_total") == prompt_before + prompts
    assert metric(server.url, "skymoe_num_requests_running") == 0
    assert metric(server.url, "skymoe_num_requests_waiting") == 0


def _malformed() -> list[tuple[str, bytes | dict | list | str]]:
    """(endpoint, body) pairs, each wrong in its own way."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    ok_c = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    ok_ch = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases: list[tuple[str, bytes | dict | list | str]] = [
        (c, b"{"), (c, b"not json at all"), (c, b""), (c, b"[1, 2, 3]"), (c, b'"a string"'),
        (ch, b"{\"model\": \"tiny\", \"messages\": [}"), (c, b"\xff\xfe\x00"), (c, b"null"),
        (c, {"prompt": "hi"}), (c, {"model": "tiny"}), (ch, {"model": "tiny"}),
        (c, {**ok_c, "max_tokens": "10"}), (c, {**ok_c, "max_tokens": 2.5}),
        (c, {**ok_c, "temperature": "hot"}), (c, {**ok_c, "prompt": 42}),
        (c, {**ok_c, "prompt": [1, "a"]}), (c, {**ok_c, "n": True}), (c, {**ok_c, "stream": 1}),
        (c, {**ok_c, "stop": 5}), (c, {**ok_c, "seed": "x"}), (ch, {**ok_ch, "messages": "hi"}),
        (ch, {**ok_ch, "messages": [{"content": "no role"}]}),
        (ch, {**ok_ch, "messages": [{"role": "user", "content": 5}]}),
        (c, {**ok_c, "temperature": -0.1}), (c, {**ok_c, "temperature": 2.5}),
        (c, {**ok_c, "top_p": 0}), (c, {**ok_c, "top_p": 1.5}), (c, {**ok_c, "n": 0}),
        (c, {**ok_c, "n": 1000}), (c, {**ok_c, "max_tokens": 0}), (c, {**ok_c, "max_tokens": -5}),
        (c, {**ok_c, "logprobs": 50}), (c, {**ok_c, "logprobs": -1}), (c, {**ok_c, "top_k": -7}),
        (c, {**ok_c, "seed": 2**70}), (c, {**ok_c, "prompt": [10**9]}),
        (c, {**ok_c, "prompt": [-1]}), (c, {**ok_c, "stop": ["", "x"]}),
        (c, {**ok_c, "stop": ["s"] * 40}), (c, {**ok_c, "best_of": 3}),
        (c, {**ok_c, "frequency_penalty": 1.0}), (c, {**ok_c, "logit_bias": {"5": 10}}),
        (c, {**ok_c, "suffix": "tail"}), (c, {**ok_c, "stream_options": {"include_usage": True}}),
        (ch, {**ok_ch, "top_logprobs": 3}), (ch, {**ok_ch, "logprobs": True, "top_logprobs": 99}),
        (ch, {**ok_ch, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        (ch, {**ok_ch, "response_format": {"type": "json_object"}}),
        (c, {**ok_c, "max_tokens": 10**7}), (c, {**ok_c, "max_tokens": 10**30}),
        (ch, {**ok_ch, "max_tokens": 10**7}), (ch, {**ok_ch, "max_completion_tokens": 10**6}),
        (c, {**ok_c, "prompt": "x" * (MAX_LEN + 10)}), (c, {**ok_c, "prompt": []}),
        (c, {**ok_c, "prompt": [[]]}), (c, {**ok_c, "prompt": ["a"] * 100}),
        (ch, {**ok_ch, "messages": []}),
        (ch, {**ok_ch, "messages": [{"role": "wizard", "content": "hi"}]}),
        (ch, {**ok_ch, "messages": [{"role": "user", "content": None}]}),
        (ch, {**ok_ch, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        (c, {**ok_c, "model": "other-model"}), (ch, {**ok_ch, "model": ""}),
        (c, {**ok_c, "stop_token_ids": [100000]}),
    ]
    return cases


def test_100_malformed_requests_get_4xx_and_the_server_stays_healthy(server):
    cases = _malformed()
    assert len(set(map(repr, cases))) == len(cases) >= 60
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    async def send(http: httpx.AsyncClient, endpoint: str, body) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await http.post(endpoint, content=content, headers=headers)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            batch = [cases[i % len(cases)] for i in range(100)]
            return batch, await asyncio.gather(*(send(http, e, b) for e, b in batch))

    batch, responses = asyncio.run(run())
    for (endpoint, body), r in zip(batch, responses):
        assert 400 <= r.status_code < 500, (endpoint, body, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    statuses = {r.status_code for r in responses}
    assert statuses == {400, 404}
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    r = client.completions.create(model="tiny", prompt="still fine", max_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"

"""The OpenAI-compatible server, driven as a real process on 127.0.0.1 with the official
``openai`` client (and raw HTTP where the client hides things): completions and chat,
streaming and not, usage, stop sequences, seeds, logprobs, errors, auth, metrics, disconnects,
the queue bound, tensor parallelism under torchrun and ``skymoe bench serve``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from skymoe.checkpoint import load_model, load_tokenizer, save_byte_tokenizer, save_model
from skymoe.checkpoint.tokenizer import BYTE_VOCAB_SIZE
from skymoe.config import SkyworkMoeConfig
from skymoe.infer.prepare import prepare
from skymoe.infer.generate import SamplingParams, generate
from skymoe.model.transformer import build_model
from skymoe.serve.chat import DEFAULT_TEMPLATE, ChatTemplate
from skymoe.checkpoint.tokenizer import TextStream

KEY = "test-key-123"
MAX_LEN = 128


# ------------------------------------------------------------------------------ helpers
def make_checkpoint(path: Path) -> Path:
    """A small random fp32 MoE model with the byte-level tokenizer."""
    config = SkyworkMoeConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                              torch_dtype="float32", bos_token_id=1, eos_token_id=2,
                              initializer_range=0.1)
    save_model(build_model(config, seed=0, dtype=torch.float32), path)
    save_byte_tokenizer(path)
    return path


class Server:
    """``python -m skymoe serve`` (or any command line) in a subprocess on a free port."""

    def __init__(self, args: list[str], log: Path, prefix: list[str] | None = None,
                 timeout: float = 90.0) -> None:
        cmd = (prefix or [sys.executable, "-m", "skymoe"]) + ["serve", *args, "--port", "0",
                                                             "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("SKYMOE_API_KEY", None)
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n"
                                   f"{log.read_text()[-3000:]}")
            if self.url is None:
                found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
                self.url = found.group(1) if found else None
            if self.url is not None:
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def metric(url: str, name: str, key: str | None = KEY) -> float:
    """A sample's value from /metrics (``name`` with its labels, e.g. 'x_total{a="b"}')."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def sse_events(response: httpx.Response) -> list:
    """The data of each server-sent event, JSON-decoded ('[DONE]' kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server([str(checkpoint), "--served-model-name", "tiny", "--api-key", KEY,
                "--max-batch", "4", "--max-model-len", str(MAX_LEN), "--threads", "1"],
               tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The model and tokenizer in this process, packed as the server packs them."""
    return prepare(load_model(checkpoint).eval()), load_tokenizer(checkpoint)


def greedy_text(reference, prompt: str, n: int) -> tuple[str, list[int]]:
    model, tok = reference
    ids = tok.encode(prompt)
    out = generate(model, torch.tensor([ids]), n, SamplingParams())[0].tolist()
    return tok.decode(out), out


# ------------------------------------------------------------------------ completions
def test_completion_matches_the_model_and_counts_usage(client, reference):
    expected, ids = greedy_text(reference, "Hello", 12)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "tiny"
    (choice,) = r.choices
    assert choice.text == expected and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference[1].encode("Hello")) == 6  # BOS + 5 bytes
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == 18
    # The same prompt as token ids, and several prompts in one request (choice per prompt).
    by_ids = client.completions.create(model="tiny", prompt=reference[1].encode("Hello"),
                                       max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == expected
    multi = client.completions.create(model="tiny", prompt=["Hello", "Bye now"], max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in multi.choices] == [0, 1]
    assert multi.choices[0].text == greedy_text(reference, "Hello", 5)[0]
    assert multi.choices[1].text == greedy_text(reference, "Bye now", 5)[0]
    assert multi.usage.prompt_tokens == 6 + 8 and multi.usage.completion_tokens == 10


def test_streaming_sends_one_chunk_per_token_and_usage(client, server):
    full = client.completions.create(model="tiny", prompt="Stream me", max_tokens=20,
                                     temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        model="tiny", prompt="Stream me", max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *token_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert len(token_chunks) == usage_chunk.usage.completion_tokens  # one chunk per token
    assert "".join(c.choices[0].text for c in token_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 19 + ["length"]
    # On the wire: SSE 'data:' lines ending with [DONE]; no usage chunk unless asked.
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "Stream me", "max_tokens": 3,
                            "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and len(events) == 4
    assert all("usage" not in e for e in events[:-1])


def test_seeds_reproduce_and_n_uses_consecutive_seeds(client):
    def sample(seed, n=1):
        r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16,
                                      temperature=1.0, top_p=0.95, seed=seed, n=n,
                                      extra_body={"ignore_eos": True, "top_k": 50})
        return [c.text for c in r.choices]

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again and first != other
    assert sample(7, n=2) == first + other  # choice i samples with seed + i
    streamed = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16,
                                         temperature=1.0, top_p=0.95, seed=7, stream=True,
                                         extra_body={"ignore_eos": True, "top_k": 50})
    assert "".join(c.choices[0].text for c in streamed) == first[0]


def test_stop_sequences_end_the_text_before_them(client, reference):
    full, _ = greedy_text(reference, "Stop test", 24)
    printable = [i for i in range(4, 16) if full[i:i + 2].isprintable()
                 and "\ufffd" not in full[i:i + 2] and full.index(full[i:i + 2]) == i]
    assert printable, f"no usable stop string in {full!r}"
    at = printable[0]
    stop = full[at:at + 2]
    r = client.completions.create(model="tiny", prompt="Stop test", max_tokens=24,
                                  temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].text == full[:at] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="Stop test", max_tokens=24,
                                            temperature=0, stop=stop, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full[:at] and stop not in text
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens == len(chunks) - 1


def test_logprobs_and_echo(client, reference):
    model, tok = reference
    r = client.completions.create(model="tiny", prompt="Logs", max_tokens=5, temperature=0,
                                  logprobs=3, echo=True, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    prompt_ids = tok.encode("Logs")
    out_text, out_ids = greedy_text(reference, "Logs", 5)
    assert choice.text == "Logs" + out_text
    lp = choice.logprobs
    n = len(prompt_ids)
    assert len(lp.tokens) == n + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt_ids + out_ids])).logits[0].float(), -1)
    all_ids = prompt_ids + out_ids
    for i in range(1, n + 5):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, all_ids[i]]), abs=1e-3)
        assert len(lp.top_logprobs[i]) <= 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()),
                                                                 abs=1e-3)
    assert lp.text_offset[n] == len("Logs")  # the prompt's text comes first
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                    "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)  # greedy


# --------------------------------------------------------------------------------- chat
def test_chat_default_template_streaming_and_usage(client, reference):
    _, tok = reference
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                             {"type": "text", "text": "there"}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                       temperature=0, extra_body={"ignore_eos": True})
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_text(reference, prompt, 10)[0]
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    token_chunks = chunks[1:-1]
    assert len(token_chunks) == chunks[-1].usage.completion_tokens == 10
    assert "".join(c.choices[0].delta.content for c in token_chunks) == \
        r.choices[0].message.content
    assert token_chunks[-1].choices[0].finish_reason == "length"


def test_chat_template_from_the_tokenizer_config(tmp_path):
    save_byte_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                               "{{ m['content'] }}{{ eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.load(tmp_path)
    text = template.render([{"role": "user", "content": "hi"}])
    assert text == "<s>[user] hi</s>[assistant] "
    assert not template.add_bos and template.stop == ()  # the template writes its own BOS
    tok = load_tokenizer(tmp_path)
    assert tok.encode(text, add_bos=template.add_bos)[:2] == [1, tok.encode("[", add_bos=False)[0]]
    default = ChatTemplate.load(tmp_path.parent / "no-such-dir")
    assert default.source == DEFAULT_TEMPLATE and default.stop == ("<|im_end|>",)


def test_engine_loop_bridges_tokens_to_asyncio_and_cancels(reference):
    import asyncio

    from skymoe.infer.engine import Engine, QueueFullError, Request
    from skymoe.serve.engine_thread import EngineLoop
    from skymoe.serve.metrics import Metrics

    model, tok = reference
    loop_ = EngineLoop(Engine(model, tok, max_batch=1, max_len=64, max_queue=1), Metrics())
    loop_.start()
    prompt = tok.encode("bridge")

    async def run():
        events: asyncio.Queue = asyncio.Queue()
        await loop_.submit([Request(prompt, 5, logprobs=1)], events, time.perf_counter())
        got = [await events.get() for _ in range(5)]
        long: asyncio.Queue = asyncio.Queue()
        await loop_.submit([Request(prompt, 50, request_id="long")], long, time.perf_counter())
        first = await long.get()
        waiting: asyncio.Queue = asyncio.Queue()
        await loop_.submit([Request(prompt, 5)], waiting, time.perf_counter())  # queued
        with pytest.raises(QueueFullError):  # the one queue place is taken
            await loop_.submit([Request(prompt, 5)], asyncio.Queue(), time.perf_counter())
        loop_.cancel(["long"])
        while (event := await long.get()).completion is None:
            pass
        return got, first, event, [await waiting.get() for _ in range(5)]

    try:
        got, first, cancelled, after = asyncio.run(run())
    finally:
        loop_.stop()
    assert [e.token_id for e in got] == greedy_text(reference, "bridge", 5)[1]
    assert all(e.logprobs.token_id == e.token_id for e in got)
    assert got[-1].completion.finish_reason == "length" and got[0].completion is None
    assert first.token_id is not None and cancelled.completion.finish_reason == "cancelled"
    assert len(cancelled.completion.token_ids) < 50
    assert after[-1].completion.finish_reason == "length"  # got the slot after the cancel
    assert not loop_.alive


def test_text_stream_holds_back_stop_strings_and_partial_characters(tmp_path):
    save_byte_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("ab€cdEND", add_bos=False)  # '€' is three bytes
    stream = TextStream(tok, [1], stop=("END",))
    pieces = [stream.push(t) for t in ids]
    assert pieces[:2] == ["", ""]  # held back: could start 'END' (up to 2 characters)
    assert "".join(pieces) + stream.finish() == "ab€cd" == stream.text
    assert all("\ufffd" not in p for p in pieces)


# ------------------------------------------------------------------- errors and auth
def test_errors_are_openai_error_objects(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=10**6)
    assert f"context of {MAX_LEN} tokens" in e.value.body["message"]
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="tiny", prompt="x", presence_penalty=0.5)
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param",
                                                               "code"}
    r = httpx.get(f"{server.url}/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_every_endpoint_but_health_needs_the_key(server):
    calls = [("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("GET", "/metrics"),
             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("GET", "/v1/unknown")]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        for method, path in calls:
            r = httpx.request(method, server.url + path, headers=headers, timeout=30,
                              json=body if method == "POST" else None)
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ok = {"Authorization": f"Bearer {KEY}"}
    for method, path in calls[:-1]:
        r = httpx.request(method, server.url + path, headers=ok, timeout=30,
                          json=body if method == "POST" else None)
        assert r.status_code == 200, (path, r.text)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong",
                      max_retries=0).models.list()


# -------------------------------------------------------------- metrics and disconnects
def test_models_and_metrics(client, server):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.owned_by == "skymoe"
    before = metric(server.url, "skymoe_generation_tokens_total")
    requests = metric(server.url,
                      'skymoe_requests_total{endpoint="/v1/completions",status="200"}')
    client.completions.create(model="tiny", prompt="Count", max_tokens=7,
                              extra_body={"ignore_eos": True})
    assert metric(server.url, "skymoe_generation_tokens_total") == before + 7
    assert metric(server.url, 'skymoe_requests_total{endpoint="/v1/completions",'
                              'status="200"}') == requests + 1
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("skymoe_time_to_first_token_seconds_bucket",
                 "skymoe_inter_token_latency_seconds_count",
                 "skymoe_e2e_request_latency_seconds_sum", "skymoe_num_requests_waiting",
                 "skymoe_num_requests_running", "skymoe_prompt_tokens_total"):
        assert name in text, name


def test_a_disconnected_stream_frees_its_slot(server):
    # 64 sequences of 118 tokens over 4 slots take many times longer than the client stays,
    # however fast the machine; those not finished when it goes away (most) are cancelled,
    # and the slots are freed at once.
    cancelled = 'skymoe_sequences_finished_total{finish_reason="cancelled"}'
    completed = 'skymoe_sequences_finished_total{finish_reason="length"}'
    body = {"model": "tiny", "prompt": ["abc"] * 64, "max_tokens": MAX_LEN - 10,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}

    def check_all_ended(run_client) -> None:
        before, completed_before = metric(server.url, cancelled), metric(server.url, completed)
        tokens_before = metric(server.url, "skymoe_generation_tokens_total")
        run_client()

        def ended() -> float:
            return (metric(server.url, cancelled) - before
                    + metric(server.url, completed) - completed_before)

        deadline = time.monotonic() + 5
        while ended() < 64 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ended() == 64
        assert metric(server.url, cancelled) - before >= 32
        assert metric(server.url, "skymoe_num_requests_running") == 0
        assert metric(server.url, "skymoe_num_requests_waiting") == 0
        assert metric(server.url, "skymoe_generation_tokens_total") - tokens_before \
            < 64 * (MAX_LEN - 10) / 2

    def stream_a_few_lines() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30, headers=headers,
                          json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert got[0].startswith("data: ")
            assert metric(server.url, "skymoe_num_requests_running") >= 1

    def give_up_waiting() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", timeout=0.1, headers=headers, json=body)

    check_all_ended(stream_a_few_lines)
    check_all_ended(give_up_waiting)


def test_queue_full_is_429_with_retry_after(checkpoint, tmp_path):
    s = Server([str(checkpoint), "--max-batch", "1", "--max-queue", "1", "--threads", "1"],
               tmp_path / "server.log")
    try:
        # 500 tokens take about a second here: far longer than the three requests need.
        body = {"model": str(checkpoint), "prompt": "x", "max_tokens": 500, "stream": True,
                "ignore_eos": True}
        with httpx.Client(base_url=s.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # (kept: closing the iterator closes the stream)
                next(lines)  # generating: holds the only slot
                with http.stream("POST", "/v1/completions", json=body) as waiting:
                    assert waiting.status_code == 200  # queued
                    r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=30)
                    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                    assert r.json()["error"]["type"] == "rate_limit_error"
            # Both streams closed: the server serves again.
            r = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        s.stop()


# ------------------------------------------------------------------------ cli and tp
def test_serve_command_line_errors(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "skymoe", "serve", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"skymoe serve: error: {tmp_path / 'missing'}: not a checkpoint directory"]
    unreachable = subprocess.run([sys.executable, "-m", "skymoe", "bench", "serve", "--url",
                                  "http://127.0.0.1:9", "--num-prompts", "1"],
                                 capture_output=True, text=True)
    assert unreachable.returncode == 2 and len(unreachable.stderr.strip().splitlines()) == 1
    assert "cannot reach the server" in unreachable.stderr


def test_bench_serve_reports_vllm_metrics(server):
    out = subprocess.run([sys.executable, "-m", "skymoe", "bench", "serve", "--url", server.url,
                          "--api-key", KEY, "--concurrency", "3", "--num-prompts", "5",
                          "--input-len", "9", "--output-len", "6", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["completed"] == 5 and result["failed"] == 0
    assert result["total_input_tokens"] == 5 * 9 and result["total_output_tokens"] == 5 * 6
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(result[key]) == {"mean", "median", "p99"}
        assert 0 < result[key]["median"] <= result[key]["p99"] + 1e-9
    assert result["ttft_ms"]["mean"] < result["e2e_ms"]["mean"]
    assert result["total_token_throughput"] == pytest.approx(
        result["output_throughput"] * 15 / 6, rel=1e-6)
    table = subprocess.run([sys.executable, "-m", "skymoe", "bench", "serve", "--url",
                            server.url, "--api-key", KEY, "--num-prompts", "2",
                            "--input-len", "4", "--output-len", "3"],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "Mean TTFT (ms):" in table.stdout and "P99 ITL (ms):" in table.stdout


@pytest.mark.slow
def test_tensor_parallel_server_matches_one_process(checkpoint, client, tmp_path):
    from distributed import free_port

    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "skymoe"]
    s = Server([str(checkpoint), "--served-model-name", "tiny", "--tp", "2", "--max-batch", "2",
                "--max-model-len", str(MAX_LEN), "--threads", "1"], tmp_path / "tp.log",
               prefix=prefix)
    try:
        tp = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        args = dict(model="tiny", prompt=["Parallel", "Heads split"], max_tokens=10,
                    extra_body={"ignore_eos": True})
        for sampling in (dict(temperature=0), dict(temperature=1.0, seed=11, n=2)):
            one = client.completions.create(**args, **sampling)
            two = tp.completions.create(**args, **sampling)
            assert [c.text for c in two.choices] == [c.text for c in one.choices]
        # Unseeded sampling works (rank 0 hands every rank the same seed) and streams.
        chunks = list(tp.completions.create(model="tiny", prompt="x", max_tokens=6,
                                            temperature=1.0, stream=True,
                                            extra_body={"ignore_eos": True}))
        assert len(chunks) == 6
    finally:
        s.stop()

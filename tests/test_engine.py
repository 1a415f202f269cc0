"""The continuous-batching engine: batched requests give what each gives alone (greedy and
seeded sampling), stop tokens and strings, streaming, cancellation and the queue bound."""

from __future__ import annotations

import pytest
import torch

from skymoe.checkpoint.tokenizer import BYTE_VOCAB_SIZE, load_tokenizer, save_byte_tokenizer
from skymoe.config import SkyworkMoeConfig
from skymoe.infer.engine import Engine, QueueFullError, Request
from skymoe.infer.generate import SamplingParams, generate
from skymoe.model.transformer import build_model


@pytest.fixture(scope="module")
def model():
    config = SkyworkMoeConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                              torch_dtype="float32")
    return build_model(config, seed=0, dtype=torch.float32).eval()


def _prompts(n=6):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, BYTE_VOCAB_SIZE, (int(k),), generator=gen).tolist()
            for k in torch.randint(2, 12, (n,), generator=gen)]


def test_batched_requests_match_each_request_alone(model):
    prompts = _prompts()
    lengths = [3, 9, 5, 12, 1, 7]
    greedy = SamplingParams()
    sampled = [SamplingParams(temperature=0.9, top_p=0.9, seed=i) for i in range(3)]
    params = [greedy, sampled[0], greedy, sampled[1], greedy, sampled[2]]
    engine = Engine(model, max_batch=4, max_len=64)  # fewer slots than requests: they queue
    for p, n, sp in zip(prompts, lengths, params):
        engine.submit(Request(p, n, sp))
    done = {c.request_id: c for c in engine.run()}
    assert len(done) == 6
    for i, (p, n, sp) in enumerate(zip(prompts, lengths, params)):
        alone = generate(model, torch.tensor([p]), n, sp)[0].tolist()
        assert done[f"req-{i}"].token_ids == alone, i
        assert done[f"req-{i}"].finish_reason == "length"
    assert not engine.running and not engine.waiting


def test_stops_streaming_and_cancel(model):
    prompts = _prompts(3)
    alone = generate(model, torch.tensor([prompts[0]]), 10)[0].tolist()
    streamed = []
    engine = Engine(model, max_batch=2, max_len=64)
    engine.submit(Request(prompts[0], 10, stop_token_ids=(alone[3],),
                          on_token=lambda r, t, d: streamed.append(t)))
    rid = engine.submit(Request(prompts[1], 50))
    engine.submit(Request(prompts[2], 5))
    engine.step()
    assert engine.cancel(rid)
    done = {c.request_id: c for c in engine.run()}
    first = done["req-0"]
    assert first.finish_reason == "stop" and first.token_ids == alone[:4] == streamed
    assert done[rid].finish_reason == "cancelled" and len(done[rid].token_ids) < 50
    assert done["req-2"].finish_reason == "length" and len(done["req-2"].token_ids) == 5


def test_stop_strings_cut_the_text(model, tmp_path):
    save_byte_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    prompt = _prompts(1)[0]
    engine = Engine(model, tokenizer, max_batch=2, max_len=64)
    engine.submit(Request(prompt, 12))
    full = engine.run()[0]
    stop = full.text[4:6]
    assert stop and full.text.index(stop) == 4
    deltas: list[str] = []
    engine.submit(Request(prompt, 12, stop=(stop,), on_token=lambda r, t, d: deltas.append(d)))
    cut = engine.run()[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:4]
    # The streamed pieces add up to the text: the stop string is never streamed.
    assert "".join(deltas) == cut.text


def test_queue_bound_and_bad_requests(model):
    engine = Engine(model, max_batch=1, max_len=16, max_queue=2)
    engine.submit(Request([5], 2))
    engine.submit(Request([6], 2))
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        engine.submit(Request([7], 2))
    with pytest.raises(ValueError, match="exceeds the engine's 16 positions"):
        engine.submit(Request([1] * 10, 10))
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit(Request([], 3))
    assert len(engine.run()) == 2
    with pytest.raises(ValueError, match="max_queue >= 1"):  # a queue of 0 would take nothing
        Engine(model, max_batch=1, max_len=16, max_queue=0)


def test_bench_generate_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "skymoe", "bench", "generate", "tiny",
                          "--num-prompts", "3", "--input-len", "5", "--output-len", "4",
                          "--max-batch", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "3 requests x (5 prompt + 4 output tokens)" in out.stdout
    assert "output tokens/s" in out.stdout and "total (prompt + output) tokens/s" in out.stdout


@torch.no_grad()
def test_logprobs_of_generated_and_prompt_tokens(model):
    prompt = _prompts(1)[0]
    params = SamplingParams(temperature=0.8, seed=3)
    engine = Engine(model, max_batch=2, max_len=64)
    seen = []
    engine.submit(Request(prompt, 6, params, logprobs=3, prompt_logprobs=2,
                          on_token=lambda r, t, d: seen.append(r.token_logprobs[-1].token_id)))
    engine.submit(Request(prompt, 6, params))  # the same request without logprobs
    with_lp, without = engine.run()
    assert with_lp.token_ids == without.token_ids == seen  # recorded before on_token
    assert without.logprobs is None and without.prompt_logprobs is None
    # Reference: log-softmax of a full forward over prompt + output (no cache).
    ids = torch.tensor([prompt + with_lp.token_ids])
    ref = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    n = len(prompt)
    assert [lp.token_id for lp in with_lp.logprobs] == with_lp.token_ids
    for i, lp in enumerate(with_lp.logprobs):
        row = ref[n - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert with_lp.prompt_logprobs[0] is None and len(with_lp.prompt_logprobs) == n
    for i, lp in enumerate(with_lp.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[i] and len(lp.top) == 2
        assert lp.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)


def test_prefill_is_batched_and_chunked_within_the_token_budget(model):
    """Requests admitted together are prefilled together (right-padded); with a small budget
    prompts are prefilled in chunks over several steps, between decode steps of the requests
    already generating, in forwards of at most ``max_prefill_tokens`` padded tokens. The
    results are those of each request alone."""
    prompts = _prompts(8) + [list(range(3, 43))]  # the last one takes several steps at 16
    forwards: list[tuple[str, tuple[int, ...]]] = []

    def record(module, args, kwargs):
        kind = "prefill" if kwargs.get("logits_at") is not None else "decode"
        forwards.append((kind, tuple(args[0].shape)))

    results, runs = [], []
    for budget in (2048, 16):
        forwards.clear()
        engine = Engine(model, max_batch=9, max_len=64, max_prefill_tokens=budget)
        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            for i, p in enumerate(prompts):
                engine.submit(Request(p, 4, request_id=str(i)))
            results.append({c.request_id: c.token_ids for c in engine.run()})
        finally:
            handle.remove()
        runs.append(list(forwards))
    alone = {str(i): generate(model, torch.tensor([p]), 4)[0].tolist()
             for i, p in enumerate(prompts)}
    assert results[0] == alone and results[1] == alone
    assert runs[0][0] == ("prefill", (9, 40))  # one forward for every prompt, padded
    prefills = [shape for kind, shape in runs[1] if kind == "prefill"]
    assert all(b * t <= 16 for b, t in prefills) and len(prefills) >= 7
    last_prefill = max(i for i, (kind, _) in enumerate(runs[1]) if kind == "prefill")
    assert any(kind == "decode" for kind, _ in runs[1][:last_prefill])  # interleaved

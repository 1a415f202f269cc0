"""KV-cached generation vs full recomputation, sampling, tokenizers and the CLI main job."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import skymoe
from skymoe import SkyworkMoeConfig, build_model, load_tokenizer
from skymoe.checkpoint import TextStream, save_byte_tokenizer
from skymoe.infer import SamplingParams, generate, sample_next

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96
NEW = 12


def _model(*, kv_heads: int = 4, logits_norm: bool = True, init: float = 0.15,
           seed: int = 0, **overrides) -> skymoe.SkyworkForCausalLM:
    kwargs = dict(model_type="skywork_moe", vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, num_experts=4, num_experts_per_tok=2,
                  moe_use_logits_norm=logits_norm, moe_gate_norm_std=1.0,
                  max_position_embeddings=128, initializer_range=init, torch_dtype="float32",
                  eos_token_id=2)
    kwargs.update(overrides)
    model = build_model(SkyworkMoeConfig(**kwargs), dtype=torch.float32, seed=seed)
    return model.eval()


MODELS = {
    "moe_norm_mha": dict(kv_heads=4, logits_norm=True),
    "moe_gqa": dict(kv_heads=2, logits_norm=True),
    "mixtral_gqa_interval2": dict(kv_heads=1, logits_norm=False, moe_expert_interval=2),
}


def _prompt(b: int = 2, t: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy_by_recomputation(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    seq = ids
    for _ in range(n):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, ids.shape[1]:]


# ---------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_equals_recomputation(name):
    model = _model(**MODELS[name])
    ids = _prompt()
    out = generate(model, ids, NEW, SamplingParams(temperature=0.0))
    assert out.shape == (2, NEW) and out.dtype == torch.long
    expected = _greedy_by_recomputation(model, ids, NEW)
    assert torch.equal(out, expected)
    # The output is not degenerate (a constant token would hide cache bugs).
    assert len(set(out.flatten().tolist())) > 2


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_cached_logits_equal_full_logits_each_step(name):
    model = _model(**MODELS[name])
    ids = _prompt(seed=1)
    b, t = ids.shape
    cache = model.new_kv_cache(b, t + NEW)
    logits = model(ids, cache=cache).logits
    full = model(ids).logits
    assert full.std() > 0.1
    assert (logits - full).abs().max() < 1e-5
    assert cache.length == t
    seq = ids
    for step in range(NEW):
        nxt = logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        logits = model(nxt[:, None], cache=cache).logits
        assert logits.shape == (b, 1, VOCAB)
        assert cache.length == t + step + 1
        ref = model(seq).logits[:, -1:]
        diff = (logits - ref).abs().max().item()
        assert diff < 1e-5, f"step {step}: cached vs full logits differ by {diff:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("split", [1, 4, 8])
@torch.no_grad()
def test_chunked_prefill_equals_one_pass(name, split):
    model = _model(**MODELS[name])
    ids = _prompt(t=11, seed=2)
    full = model(ids).logits
    cache = model.new_kv_cache(2, 16)
    first = model(ids[:, :split], cache=cache).logits
    second = model(ids[:, split:], cache=cache).logits  # start = split > 0, T > 1
    assert cache.length == 11
    assert (torch.cat([first, second], dim=1) - full).abs().max() < 1e-5
    # Then one decode step still matches.
    nxt = full[:, -1].argmax(-1)
    step = model(nxt[:, None], cache=cache).logits[:, -1]
    ref = model(torch.cat([ids, nxt[:, None]], 1)).logits[:, -1]
    assert (step - ref).abs().max() < 1e-5


@torch.no_grad()
def test_three_chunks_with_explicit_start():
    model = _model(kv_heads=2)
    ids = _prompt(t=12, seed=3)
    full = model(ids).logits
    cache = model.new_kv_cache(2, 12)
    parts = [model(ids[:, a:b], cache=cache, start=a).logits
             for a, b in ((0, 3), (3, 8), (8, 12))]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_last_only_matches_full():
    model = _model()
    ids = _prompt(seed=4)
    full = model(ids).logits
    last = model(ids, last_only=True).logits
    assert last.shape == (2, 1, VOCAB)
    # A one-row matmul may block its sums differently from the full one (a few fp32 ulps on
    # Zen 5); a wrong position or a missed layer would differ by O(1).
    assert (last - full[:, -1:]).abs().max() < 1e-5


def test_batched_generate_equals_per_sequence_generate():
    model = _model(kv_heads=2)
    ids = _prompt(b=3, seed=5)
    batched = generate(model, ids, 8)
    for i in range(3):
        assert torch.equal(batched[i:i + 1], generate(model, ids[i:i + 1], 8))


def test_generate_stops_and_pads_at_eos():
    model = _model(kv_heads=2)
    ids = _prompt(b=2, seed=6)
    free = generate(model, ids, NEW)
    eos = int(free[0, 2])
    out = generate(model, ids, NEW, eos_ids=[eos])
    for row_free, row in zip(free.tolist(), out.tolist()):
        if eos in row_free:
            k = row_free.index(eos)
            assert row[:k + 1] == row_free[:k + 1]
            assert all(tok == eos for tok in row[k:])
        else:
            assert row == row_free[:len(row)]
    # Generation ends once every sequence has stopped.
    hit = [r.index(eos) if eos in r else NEW - 1 for r in free.tolist()]
    assert out.shape[1] == max(hit) + 1


def test_generate_max_new_tokens_and_streaming_callback():
    model = _model()
    ids = _prompt(b=1, seed=7)
    seen: list[int] = []
    out = generate(model, ids, 5, on_token=lambda t: seen.append(int(t[0])))
    assert out.shape == (1, 5) and seen == out[0].tolist()


def test_cache_overflow_raises():
    model = _model()
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError):
        model(_prompt(b=1, t=5), cache=cache)


# ---------------------------------------------------------------------------- sampling
def test_sampling_with_seed_is_reproducible():
    model = _model(init=0.02)
    ids = _prompt(seed=8)
    p = SamplingParams(temperature=1.0, seed=123)
    a, b = generate(model, ids, NEW, p), generate(model, ids, NEW, p)
    assert torch.equal(a, b)
    c = generate(model, ids, NEW, SamplingParams(temperature=1.0, seed=124))
    assert not torch.equal(a, c)


def test_top_k_1_equals_greedy():
    model = _model()
    ids = _prompt(seed=9)
    greedy = generate(model, ids, NEW)
    for seed in range(3):
        out = generate(model, ids, NEW, SamplingParams(temperature=1.5, top_k=1, seed=seed))
        assert torch.equal(out, greedy)


def test_tiny_top_p_equals_greedy():
    model = _model()
    ids = _prompt(seed=10)
    greedy = generate(model, ids, NEW)
    for seed in range(3):
        out = generate(model, ids, NEW, SamplingParams(temperature=1.0, top_p=1e-6, seed=seed))
        assert torch.equal(out, greedy)


def test_sampling_on_flat_distribution_is_not_greedy():
    model = _model(init=0.02)  # near-uniform next-token distribution
    ids = _prompt(seed=11)
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[:, -1], -1)
    assert probs.max() < 0.1
    greedy = generate(model, ids, NEW)
    outs = [generate(model, ids, NEW, SamplingParams(temperature=1.0, seed=s)) for s in range(4)]
    assert any(not torch.equal(o, greedy) for o in outs)
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 1


def test_sample_next_top_k_hand_computed():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(400):
        counts[sample_next(logits, SamplingParams(temperature=1.0, top_k=2), gen)] += 1
    # Only the two most likely tokens (1: 0.4, 3: 0.3) survive; renormalized 4/7 vs 3/7.
    assert counts[0] == 0 and counts[2] == 0
    assert 0.45 < counts[1] / 400 < 0.70


def test_sample_next_top_p_hand_computed():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        seen.add(int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), gen)))
    # Nucleus of mass 0.5: token 0 (0.4) is not enough, token 1 (cum 0.7) completes it.
    assert seen == {0, 1}
    seen = set()
    for _ in range(300):
        seen.add(int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.4), gen)))
    assert seen == {0}


def test_sample_next_greedy_and_low_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    assert sample_next(logits, SamplingParams()).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    out = sample_next(logits, SamplingParams(temperature=1e-3), gen)
    assert out.tolist() == [1, 0]


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------------------- tokenizers
TEXTS = [
    "Hello, world!",
    "naïve café — ünïcödé",
    "emoji 🙂👍🏽🚀 and ZWJ 👨‍👩‍👧",
    "中文测试，日本語のテキスト、한국어",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "",
]


def test_byte_tokenizer_round_trip(tmp_path):
    save_byte_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 259 and tok.bos_id == 1 and tok.eos_id == 2
    all_ids = set()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1
        assert len(ids) == 1 + len(text.encode("utf-8"))  # one id per byte
        assert all(3 <= i < 259 for i in ids[1:])
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=False) == ids[1:]
        all_ids.update(ids[1:])
    # Distinct bytes map to distinct ids.
    all_bytes = set(b"".join(t.encode("utf-8") for t in TEXTS))
    assert len(all_ids) == len(all_bytes)


def test_byte_tokenizer_matches_hf_auto_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_byte_tokenizer(tmp_path)
    ours = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == ours.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == text
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2


def test_text_stream_emits_whole_characters(tmp_path):
    save_byte_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "ab 🙂 中文 é!"
    stream = TextStream(tok, [])
    pieces = [stream.push(i) for i in tok.encode(text, add_bos=False)]
    assert "".join(pieces) + stream.finish() == text == stream.text
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    words = ["hello", "world", "model", "expert", "router", "token", "mixture", "skywork",
             "gate", "layer", "sparse", "dense"]
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8))
                                for _ in range(300)) + "\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(ckpt / "tokenizer"),
                                   vocab_size=72, model_type="bpe", character_coverage=1.0,
                                   minloglevel=2)
    assert (ckpt / "tokenizer.model").is_file()
    assert not (ckpt / "tokenizer.json").exists()
    tok = load_tokenizer(ckpt)
    assert tok.source.endswith("tokenizer.model")
    assert tok.vocab_size == 72 and tok.bos_id == 1 and tok.eos_id == 2
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    for text in ["hello world", "sparse mixture layer expert router gate", "skywork"]:
        ids = tok.encode(text)
        assert ids[0] == 1 and ids[1:] == sp.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=False) == ids[1:]


def test_tokenizer_config_add_bos_false(tmp_path):
    save_byte_tokenizer(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hi")
    assert len(ids) == 2 and ids[0] != 1
    assert tok.decode(ids) == "hi"


def test_missing_tokenizer_is_a_checkpoint_error(tmp_path):
    with pytest.raises(skymoe.CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------- CLI
def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "skymoe", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=180)


def test_cli_init_info_generate(tmp_path):
    out = tmp_path / "tiny"
    proc = _cli("init", "--config", "tiny", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "skywork_moe" and cfg["num_experts"] == [8]

    proc = _cli("info", out)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.lower()
    assert "total" in text and "active" in text
    # Hand-computed for the tiny preset (hidden 256, ffn 512, 4 layers, 8 experts, top-2,
    # vocab 259, untied): attention 4*256*256, norms 2*256, router 256*8, experts 3*256*512.
    attn, norms, router, expert = 4 * 256 * 256, 2 * 256, 256 * 8, 3 * 256 * 512
    emb = 2 * 259 * 256
    total = 4 * (attn + norms + router + 8 * expert) + emb + 256
    active = 4 * (attn + norms + router + 2 * expert) + emb + 256
    assert f"{total:,}" in proc.stdout
    assert skymoe.config.format_count(active) in proc.stdout

    proc = _cli("generate", out, "--prompt", "hi", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hi")
    assert "Traceback" not in proc.stderr


def test_cli_init_refuses_non_empty_dir(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = _cli("init", "--config", "tiny", out)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(out) in lines[0]
    assert (out / "keep.txt").read_text() == "precious"
    assert not (out / "config.json").exists()


def test_cli_init_overwrite_with_config_file(tmp_path):
    cfg = json.loads((Path(skymoe.__file__).parent / "configs" / "tiny.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_experts=[4])
    cfg_path = tmp_path / "small.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = _cli("init", "--config", cfg_path, "--overwrite", "--dtype", "float32", out)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "old.txt").exists()
    model = skymoe.load_model(out)
    assert model.dtype == torch.float32 and model.config.num_experts == 4
    assert model.config.hidden_size == 32


def test_cli_init_overwrite_with_unusable_config_keeps_old_dir(tmp_path):
    # A config the command rejects must not cost the user the directory they asked to replace.
    cfg = json.loads((Path(skymoe.__file__).parent / "configs" / "tiny.json").read_text())
    cfg["vocab_size"] = 64  # too small for the byte-level tokenizer
    cfg_path = tmp_path / "small_vocab.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = _cli("init", "--config", cfg_path, "--overwrite", out)
    assert proc.returncode == 2
    assert "vocab_size" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "old.txt").read_text() == "old"


def test_single_token_prompt_generate_equals_recomputation():
    model = _model(kv_heads=2)
    ids = _prompt(b=2, t=1, seed=12)
    assert torch.equal(generate(model, ids, 6), _greedy_by_recomputation(model, ids, 6))


def test_cli_info_skywork_moe_base_counts(capsys):
    # Skywork-MoE base: 146B total, 22B activated parameters (paper); hand-computed exactly:
    h, layers, ffn, experts, vocab = 4608, 52, 12288, 16, 65532
    per_layer_common = 4 * h * h + 2 * h + h * experts
    total = layers * (per_layer_common + experts * 3 * h * ffn) + 2 * vocab * h + h
    active = layers * (per_layer_common + 2 * 3 * h * ffn) + 2 * vocab * h + h
    from skymoe import cli

    assert cli.main(["info", "skywork-moe-base"]) == 0
    out = capsys.readouterr().out
    assert f"{total:,}" in out and "146." in out
    assert skymoe.config.format_count(active) in out and "22." in out

"""`skymoe eval`: the scoring rule, perplexity against an independent computation, and KL /
top-1 agreement against a reference model."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from skymoe.checkpoint import save_byte_tokenizer, save_model
from skymoe.checkpoint.tokenizer import BYTE_VOCAB_SIZE
from skymoe.config import SkyworkMoeConfig
from skymoe.errors import ConfigError
from skymoe.infer.evaluate import evaluate, token_kl, windows
from skymoe.model.transformer import build_model


def _model(seed: int = 0):
    config = SkyworkMoeConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=40,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                              torch_dtype="float32")
    return build_model(config, seed=seed, dtype=torch.float32).eval()


def _stream(n: int) -> list[int]:
    return torch.randint(48, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_windows_score_every_token_after_the_first_once():
    stream = list(range(23))
    for context, stride in [(8, 7), (8, 3), (8, 1), (30, 5)]:
        scored = []
        for w in windows(stream, context, stride):
            assert len(w.tokens) <= context and w.scored < len(w.tokens)
            scored += w.tokens[len(w.tokens) - w.scored:].tolist()
            if w.tokens[0] > 0:  # past the first window: enough history for every prediction
                assert len(w.tokens) - w.scored >= context - stride
        assert scored == stream[1:], (context, stride)


def test_bad_windows():
    with pytest.raises(ConfigError, match="--stride"):
        list(windows(list(range(10)), 4, 4))
    with pytest.raises(ConfigError, match="fewer than 2 tokens"):
        list(windows([1], 4, 2))


def _nll_sum(model, tokens: list[int], first_target: int) -> float:
    """Sum of -log p(tokens[t] | tokens[:t]) for t >= first_target, full logits."""
    ids = torch.tensor(tokens)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    return float(F.cross_entropy(logits[first_target - 1:-1], ids[first_target:],
                                 reduction="sum"))


def test_perplexity_matches_a_direct_computation():
    model = _model()
    stream = _stream(14)
    # one window holding everything: plain next-token cross-entropy
    whole = evaluate(model, stream, context=32, stride=16)
    assert whole.tokens_scored == 13
    assert whole.nll == pytest.approx(_nll_sum(model, stream, 1) / 13, rel=1e-6)
    # context 8, stride 4 by hand: [0:8) predicts 1..7, [4:12) predicts 8..11, [6:14) 12..13
    got = evaluate(model, stream, context=8, stride=4)
    want = (_nll_sum(model, stream[0:8], 1) + _nll_sum(model, stream[4:12], 4)
            + _nll_sum(model, stream[6:14], 6)) / 13
    assert got.tokens_scored == 13
    assert got.nll == pytest.approx(want, rel=1e-6)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-6)


def test_kl_against_torch_kl_div():
    gen = torch.Generator().manual_seed(1)
    ref, own = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    want = F.kl_div(F.log_softmax(own, -1), F.log_softmax(ref, -1), log_target=True,
                    reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(ref, own), want)


def test_reference_comparison():
    model, stream = _model(), _stream(40)
    same = evaluate(model, stream, context=16, stride=8, reference=_model())
    assert same.kl_max == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    other = evaluate(model, stream, context=16, stride=8, reference=_model(seed=1))
    assert other.kl_mean > 1e-3 and other.top1_agreement < 1.0
    assert other.kl_mean <= other.kl_p999 <= other.kl_max


def test_cli(tmp_path):
    for name, seed in (("model", 0), ("ref", 1)):
        save_model(_model(seed), tmp_path / name)
        save_byte_tokenizer(tmp_path / name)
    (tmp_path / "text.txt").write_text("hello world, " * 40)
    cmd = [sys.executable, "-m", "skymoe", "eval", str(tmp_path / "model"), "--data",
           str(tmp_path / "text.txt"), "--context", "32"]
    out = subprocess.run(cmd + ["--reference", str(tmp_path / "ref")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "windows of 32 tokens advancing by 16" in out.stdout
    assert "perplexity" in out.stdout and "top-1 agreement" in out.stdout
    bad = subprocess.run(cmd + ["--stride", "32"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--stride" in bad.stderr

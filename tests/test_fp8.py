"""FP8 checkpoints: the quantizer's arithmetic, loading checkpoints written by an independent
script in the vLLM conventions (per-tensor, per-channel, block scales), and quantize -> load ->
logits on a small trained model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from skymoe.checkpoint import load_model, save_model
from skymoe.checkpoint.fp8 import FP8_MAX, quantize
from skymoe.checkpoint.names import hf_tensors
from skymoe.config import SkyworkMoeConfig
from skymoe.errors import CheckpointError, ConfigError
from skymoe.infer.evaluate import evaluate
from skymoe.model.transformer import build_model
from skymoe.quantize import quantize_checkpoint
from skymoe.train.trainer import Trainer

from test_train import _config as train_config

E4M3 = torch.float8_e4m3fn


def test_quantize_per_tensor():
    w = torch.randn(64, 32) * 3
    q, s = quantize(w)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == ()
    assert float(s) == pytest.approx(float(w.abs().max()) / FP8_MAX, rel=1e-7)
    back = q.float() * s
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values
    normal = w.abs() > s * 2**-6
    assert ((back - w).abs()[normal] / w.abs()[normal]).max() <= 2**-4 + 1e-6
    q2, s2 = quantize(back)  # quantizing dequantized values changes nothing
    assert torch.equal(q2.float(), q.float()) and float(s2) == pytest.approx(float(s))
    zq, zs = quantize(torch.zeros(3, 3))
    assert float(zs) == 1.0 and torch.equal(zq.float(), torch.zeros(3, 3))


def _tiny(tmp_path, name="model"):
    config = SkyworkMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=4, num_experts_per_tok=2, moe_expert_interval=2,
                              torch_dtype="bfloat16")
    model = build_model(config, seed=0, dtype=torch.bfloat16)
    return save_model(model, tmp_path / name)


def _write_vllm_style(src, dst, scheme: str):
    """An FP8 checkpoint written the way vLLM-style tools do, with plain torch ops (not skymoe):
    returns the fp32 weights a loader must reconstruct."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    out, expected = {}, {}
    quantized = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 ".w1.", ".w2.", ".w3.")
    for name, w in tensors.items():
        if not any(k in name for k in quantized):
            out[name] = w
            continue
        w = w.float()
        if scheme == "per-channel":
            scale = (w.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-12)
            key = name + "_scale"
        elif scheme == "block":
            rows, cols = w.shape
            scale = torch.empty(math.ceil(rows / 16), math.ceil(cols / 16))
            for i in range(scale.shape[0]):
                for j in range(scale.shape[1]):
                    block = w[16 * i:16 * i + 16, 16 * j:16 * j + 16]
                    scale[i, j] = max(float(block.abs().max()) / 448, 1e-12)
            key = name + "_scale_inv"
        else:
            scale = torch.tensor([float(w.abs().max()) / 448])
            key = name + "_scale"
            out[name.replace(".weight", ".input_scale")] = torch.tensor([0.02])  # static act
        full = scale
        if scheme == "block":
            full = scale.repeat_interleave(16, 0)[:w.shape[0]].repeat_interleave(16, 1)[:, :w.shape[1]]
        q = (w / full).clamp(-448, 448).to(E4M3)
        out[name], out[key] = q, scale
        expected[name] = q.float() * full
    save_file(out, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme":
                                     "static" if scheme == "per-tensor" else "dynamic"}
    if scheme == "block":
        config["quantization_config"]["weight_block_size"] = [16, 16]
    (dst / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel", "block"])
def test_independently_written_fp8_checkpoints_load_exactly(tmp_path, scheme):
    src = _tiny(tmp_path)
    expected = _write_vllm_style(src, tmp_path / "fp8", scheme)
    model = load_model(tmp_path / "fp8", dtype=torch.float32, fp8="dequantize")
    weights = dict(hf_tensors(model))
    assert len(expected) == 2 * 4 + 3 + 4 * 3  # q/k/v/o x 2 layers, one dense MLP, 4 experts
    for name, want in expected.items():
        assert torch.equal(weights[name], want), name
    assert "quantization_config" not in model.config.extra  # the model holds plain weights
    if scheme != "per-tensor":
        return  # block scales and per-channel expert scales load dequantized
    # Default: FP8 modules that compute from the stored values and scales...
    fp8_model = load_model(tmp_path / "fp8", dtype=torch.float32)
    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fp8_model(ids).logits, model(ids).logits, rtol=1e-5,
                                   atol=1e-5)
    # ... and, loaded in the checkpoint's own dtype, re-save it bit for bit.
    save_model(load_model(tmp_path / "fp8"), tmp_path / "resaved")
    before = load_file(tmp_path / "fp8" / "model.safetensors")
    after = load_file(tmp_path / "resaved" / "model.safetensors")
    for name, t in after.items():
        want = before[name].reshape(t.shape)
        assert t.dtype == want.dtype and torch.equal(t.view(torch.uint8) if t.dtype == E4M3
                                                     else t, want.view(torch.uint8)
                                                     if want.dtype == E4M3 else want), name
    assert set(before) - set(after) == {n for n in before if n.endswith("input_scale")}
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "fp8"


def test_fp8_linear_applies_per_channel_scales_to_the_output():
    from skymoe.model.fp8 import Fp8Linear

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=gen)
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    q = (w / scale).to(E4M3)
    layer = Fp8Linear(24, 16, per_channel=True)
    layer.weight.copy_(q)
    layer.weight_scale.copy_(scale)
    x = torch.randn(5, 16, generator=gen)
    torch.testing.assert_close(layer(x), x @ (q.float() * scale).t(), rtol=1e-5, atol=1e-6)


def test_fp8_storage_in_memory_gives_the_same_logits(tmp_path):
    out = quantize_checkpoint(_tiny(tmp_path), tmp_path / "q", show_progress=False)
    widened = load_model(out, dtype=torch.float32)
    kept = load_model(out, dtype=torch.float32, fp8="keep")
    q_proj = kept.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == E4M3 and kept.model.layers[1].block_sparse_moe.experts.w13 \
        .dtype == E4M3
    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kept(ids).logits, widened(ids).logits)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_keeping_fp8_on_a_device_that_cannot_hold_it_is_refused(tmp_path):
    from skymoe.model.fp8 import keeps_fp8_values

    assert keeps_fp8_values("keep", torch.device("cpu"))
    assert not keeps_fp8_values("auto", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"fp8='keep' on mps: .*load with fp8='auto'"):
        keeps_fp8_values("keep", torch.device("mps"))
    out = quantize_checkpoint(_tiny(tmp_path), tmp_path / "q", show_progress=False)
    with pytest.raises(ConfigError, match="cannot hold FP8 values"):
        load_model(out, device="mps", fp8="keep")


def test_missing_or_unusable_scales_are_clear_errors(tmp_path):
    src = _tiny(tmp_path)
    _write_vllm_style(src, tmp_path / "fp8", "block")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight_block_size"):
        load_model(tmp_path / "fp8")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.endswith("_scale_inv")}
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint, e.g. '.*weight_scale'"):
        load_model(tmp_path / "fp8")
    with pytest.raises(CheckpointError, match=r"FP8 tensor '.*' has no '.*weight_scale'"):
        load_model(tmp_path / "fp8", fp8="dequantize")


def test_quantize_refuses_quantized_input_and_existing_output(tmp_path):
    src = _tiny(tmp_path)
    out = quantize_checkpoint(src, tmp_path / "q", show_progress=False)
    with pytest.raises(CheckpointError, match="already has a quantization_config"):
        quantize_checkpoint(out, tmp_path / "q2", show_progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        quantize_checkpoint(src, out, show_progress=False)
    names = load_file(out / "model.safetensors")
    assert names["model.layers.0.self_attn.q_proj.weight"].dtype == E4M3
    assert names["model.layers.0.self_attn.q_proj.weight_scale"].shape == ()
    assert names["model.layers.1.block_sparse_moe.experts.3.w2.weight"].dtype == E4M3
    for untouched in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                      "model.layers.1.block_sparse_moe.gate.weight"):
        assert names[untouched].dtype == torch.bfloat16, untouched


# Calibrated on the embedded default run (300 steps): fp8 vs its fp32 weights gave a mean KL of
# 4.1e-4 nats/token and 98.7% top-1 agreement; the test allows 10x that KL.
KL_MEAN_LIMIT = 5e-3


def test_quantized_trained_model_agrees_with_the_original(tmp_path):
    trainer = Trainer(train_config(tmp_path, "run", train={"steps": 40, "precision": "fp32"}),
                      quiet=True)
    trainer.run()
    ckpt = trainer.last_checkpoint
    bf16 = load_model(ckpt, dtype=torch.bfloat16)
    save_model(bf16, tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    cmd = [sys.executable, "-m", "skymoe", "quantize", str(tmp_path / "bf16"),
           str(tmp_path / "fp8"), "--fp8"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    # this model's embeddings (bf16 in both) are a third of it; the real model is ~0.5x
    assert size(tmp_path / "fp8") < 0.75 * size(tmp_path / "bf16")
    reference = load_model(tmp_path / "bf16", dtype=torch.float32)
    quantized = load_model(tmp_path / "fp8", dtype=torch.float32)
    stream = trainer.val_rows.read_range(0, len(trainer.val_rows)).reshape(-1)[:512].tolist()
    result = evaluate(quantized, stream, context=16, stride=8, reference=reference)
    assert result.kl_mean < KL_MEAN_LIMIT, result
    assert result.top1_agreement >= 0.95, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_matmuls_on_gpu_match_the_dequantized_model(tmp_path):
    from skymoe.model.fp8 import scaled_mm_supported

    if not scaled_mm_supported(torch.device("cuda")):
        pytest.skip("FP8 matmuls need an sm_89+ GPU")
    config = SkyworkMoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              num_experts=4, num_experts_per_tok=2, moe_expert_interval=2,
                              torch_dtype="bfloat16")
    save_model(build_model(config, seed=0, dtype=torch.bfloat16), tmp_path / "bf16")
    out = quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", show_progress=False)
    fast = load_model(out, device="cuda")  # sm_89+: FP8 storage, torch._scaled_mm
    assert fast.model.layers[0].self_attn.q_proj.weight.dtype == E4M3
    exact = load_model(out, device="cuda", fp8="dequantize")
    ids = torch.randint(256, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        got, want = fast(ids).logits.float(), exact(ids).logits.float()
    # activations quantized to e4m3 on the fly: close, not equal
    assert (got - want).norm() / want.norm() < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("autocast", [False, True])
def test_a_frozen_fp8_base_passes_exact_input_gradients_and_keeps_one_byte_for_backward(
        autocast):
    """LoRA over an FP8 base: the outputs and input gradients through the frozen FP8
    projections and experts (with their scales) equal those through the dequantized bf16
    weights, and what autograd keeps for the backward holds no widened copy of the weights."""
    from skymoe.model.fp8 import Fp8Experts, Fp8Linear
    from skymoe.model.moe import grouped_linear

    gen = torch.Generator().manual_seed(0)
    linear = Fp8Linear(48, 32, keep_fp8=True)
    experts = Fp8Experts(4, 32, 16, keep_fp8=True)
    for module, names in ((linear, ("weight",)), (experts, ("w13", "w2"))):
        for name in names:
            w = torch.randn(getattr(module, name).shape, generator=gen)
            setattr(module, name, w.to(torch.float8_e4m3fn))
    linear.weight_scale = torch.rand((), generator=gen) + 0.5
    experts.w13_scale = torch.rand(4, 2, generator=gen) + 0.5
    experts.w2_scale = torch.rand(4, generator=gen) + 0.5
    # The dequantized weights, written out independently of the module's code.
    linear_bf16 = (linear.weight.float() * linear.weight_scale).to(torch.bfloat16)
    w13_bf16 = torch.cat([experts.w13[:, :16].float() * experts.w13_scale[:, :1, None],
                          experts.w13[:, 16:].float() * experts.w13_scale[:, 1:, None]],
                         dim=1).to(torch.bfloat16)
    w2_bf16 = (experts.w2.float() * experts.w2_scale[:, None, None]).to(torch.bfloat16)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 32, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                          lambda t: t):
                y = fn()
        (grad,) = torch.autograd.grad(y.float().square().sum(), x)
        return y, grad

    def reference_expert_ffn():  # the dequantized experts, as SwiGLUExperts computes
        h = grouped_linear(x, w13_bf16, counts)
        return grouped_linear(experts.kernels.swiglu(h), w2_bf16, counts)

    for fn, want_fn, weights in (
            (lambda: linear(x), lambda: torch.nn.functional.linear(x, linear_bf16),
             [linear.weight]),
            (lambda: experts.sorted_ffn(x, counts), reference_expert_ffn,
             [experts.w13, experts.w2])):
        saved.clear()
        got, got_grad = run(fn)
        assert not any(t.dtype == torch.bfloat16 and t.shape == w.shape
                       for t in saved for w in weights)
        assert any(t.dtype == torch.float8_e4m3fn and t.data_ptr() == w.data_ptr()
                   for t in saved for w in weights)  # the one-byte values instead
        want, want_grad = run(want_fn)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0, atol=0)

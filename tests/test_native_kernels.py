"""Native CPU decode kernels compute what the PyTorch model computes.

References are independent: fp32 matmuls of the same tensors, the model's own modules on an
unprepared copy, and full-sequence recomputation. fp32 models must agree to rounding noise; bf16
ones to a few bf16 ulps (summation order differs, and the native attention keeps scores in fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch

import skymoe
from skymoe.config import SkyworkMoeConfig
from skymoe.infer import generate
from skymoe.errors import ConfigError
from skymoe.infer.engine import Engine, Request
from skymoe.infer.native_modules import NativeMoEDecoderLayer
from skymoe.infer.prepare import prepare
from skymoe.kernels import native as native_build
from skymoe.kernels import PYTORCH_KERNELS, Kernels, load_native
from skymoe.model.moe import experts_loop

kernels = load_native()
NATIVE = Kernels(kernels)
pytestmark = pytest.mark.skipif(kernels is None, reason="native kernels cannot be built here")

BF16_RTOL = 2 ** -7  # two bf16 ulps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11, 16])
@pytest.mark.parametrize("k", [64, 100, 1408])  # 100: a tail shorter than one vector
def test_linear_matches_fp32_matmul(dtype, rows, k):
    gen = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(37, k, generator=gen).to(dtype)
    ref = x.double() @ w.double().T
    got = kernels.linear(x, w)
    assert got.dtype == dtype and got.shape == (rows, 37)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(got.double(), ref.to(dtype).double(), rtol=BF16_RTOL,
                                   atol=1e-2)


def test_rms_norm_matches_the_module():
    norm = skymoe.model.layers.RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    x = torch.randn(5, 96) * 3
    torch.testing.assert_close(kernels.rms_norm(x, norm.weight, 1e-6), norm(x),
                               rtol=1e-6, atol=1e-6)
    norm16, x16 = norm.to(torch.bfloat16), x.to(torch.bfloat16)
    torch.testing.assert_close(kernels.rms_norm(x16, norm16.weight, 1e-6).float(),
                               norm16(x16).float(), rtol=BF16_RTOL, atol=0)


def test_experts_match_the_reference_loop():
    gen = torch.Generator().manual_seed(0)
    E, H, F, T, K = 6, 48, 40, 7, 2
    w13, w2 = torch.randn(E, 2 * F, H, generator=gen), torch.randn(E, H, F, generator=gen)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    ids[:, 0] = 2  # one expert gets every token; others get none
    weights = torch.rand(T, K, generator=gen)
    torch.testing.assert_close(kernels.experts_decode(x, w13, w2, ids, weights),
                               experts_loop(x, w13, w2, ids, weights), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.experts_decode(x, w13, w2, ids + E, weights)


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("k", [64, 200])  # 200: a tail shorter than one vector
def test_fp8_weights_are_read_exactly_with_their_row_scales(rows, k):
    """Every e4m3 code (NaN aside: quantized weights are finite), subnormals and signs
    included, against torch's own float8 conversion; each output column times its scale."""
    gen = torch.Generator().manual_seed(rows + k)
    codes = torch.randint(0, 256, (37, k), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 1  # NaN -> the largest finite magnitude
    w = codes.view(torch.float8_e4m3fn)
    scale = torch.rand(37, generator=gen) + 0.5
    x = torch.randn(rows, k, generator=gen)
    ref = (x.double() @ w.double().T) * scale.double()
    torch.testing.assert_close(kernels.linear(x, w, scale).double(), ref, rtol=1e-5, atol=1e-3)
    got = kernels.linear(x.bfloat16(), w, scale).double()  # bf16 activations: AVX512-BF16
    ref = (x.bfloat16().double() @ w.double().T) * scale.double()
    torch.testing.assert_close(got, ref, rtol=BF16_RTOL, atol=1e-2)
    with pytest.raises(RuntimeError, match="row scales"):
        kernels.linear(x, w)
    # The prefill's widening: every code, exactly as torch converts it.
    torch.testing.assert_close(kernels.fp8_to_bf16(w), w.to(torch.bfloat16), rtol=0, atol=0)


def test_bad_arguments_are_refused_with_a_message():
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernels.linear(torch.randn(1, 8), torch.randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"\[M, K\]"):
        kernels.linear(torch.randn(1, 8), torch.randn(4, 9))


CONFIG = dict(vocab_size=101, hidden_size=64, intermediate_size=80, num_hidden_layers=4,
              num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts=5,
              num_experts_per_tok=2,
              initializer_range=0.1, max_position_embeddings=256)
VARIANTS = {
    "skywork": dict(moe_use_logits_norm=True, moe_gate_norm_std=1.5,
                    moe_feature_no_mul_topk=False, moe_expert_interval=1),
    "mixtral-window": dict(moe_use_logits_norm=False, sliding_window=7, moe_expert_interval=1),
    "dense-every-other": dict(moe_expert_interval=2, moe_use_logits_norm=True),
    "two-layer-gate": dict(moe_2layer_gate=True, moe_expert_interval=1),
    "routing-bias": dict(moe_use_logits_norm=True, moe_expert_bias=True),
}


def _built(config: SkyworkMoeConfig, dtype: torch.dtype) -> torch.nn.Module:
    model = skymoe.build_model(config, dtype=dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    for block in model.moe_blocks():  # biases large enough to change choices
        if block.expert_bias is not None:
            block.expert_bias.copy_(0.3 * torch.randn(block.num_experts, generator=gen))
    return model


def _pair(variant: str, dtype: torch.dtype):
    config = SkyworkMoeConfig(**CONFIG, **VARIANTS[variant])
    plain = _built(config, dtype).eval()
    native = prepare(_built(config, dtype), kernels=NATIVE)
    return plain, native


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_steps_match_the_plain_model_fp32(variant):
    plain, native = _pair(variant, torch.float32)
    layers = [isinstance(layer, NativeMoEDecoderLayer) for layer in native.model.layers]
    # Single-gate MoE layers run as one call; dense and 2-layer-gate ones through their modules.
    assert any(layers) == (variant != "two-layer-gate")
    ids = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        caches = plain.new_kv_cache(3, 24), native.new_kv_cache(3, 24)
        plain(ids, cache=caches[0]), native(ids, cache=caches[1])
        step = ids[:, :1]
        for _ in range(10):  # past the sliding window
            ref = plain(step, cache=caches[0]).logits
            got = native(step, cache=caches[1]).logits
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            step = ref[:, -1].argmax(-1, keepdim=True)
        torch.testing.assert_close(caches[1].keys[0], caches[0].keys[0], rtol=1e-5, atol=1e-5)
        # And greedy decoding over the cache equals recomputing every sequence in full.
        out = generate(native, ids, 8)
        seq = ids
        for _ in range(8):
            seq = torch.cat([seq, plain(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, ids.shape[1]:])


@pytest.mark.parametrize("variant", ["skywork", "mixtral-window"])
def test_bf16_decode_is_as_accurate_as_the_pytorch_path(variant):
    """Against an fp32 copy of the same (bf16-valued) weights, the native bf16 decode errs no
    more than the PyTorch bf16 path does."""
    plain, native = _pair(variant, torch.bfloat16)
    exact = copy.deepcopy(plain).float()
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    errors = {"plain": [], "native": []}
    with torch.inference_mode():
        caches = [m.new_kv_cache(2, 20) for m in (exact, plain, native)]
        for m, c in zip((exact, plain, native), caches):
            m(ids, cache=c)
        for tok in ids.T[:6]:
            ref, p, n = (m(tok[:, None], cache=c).logits.float()
                         for m, c in zip((exact, plain, native), caches))
            errors["plain"].append((p - ref).abs().mean())
            errors["native"].append((n - ref).abs().mean())
    plain_err, native_err = (torch.stack(e).mean() for e in errors.values())
    assert native_err <= 1.5 * plain_err + 1e-3, (native_err, plain_err)


def test_engine_on_native_kernels_matches_the_plain_engine():
    """Continuous batching (per-row positions in a slot cache, rows joining and leaving)."""
    plain, native = _pair("skywork", torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 101, (n,), generator=gen).tolist() for n in (4, 11, 1, 7, 9)]
    results = []
    for model in (plain, native):
        engine = Engine(model, max_batch=3, max_len=40)
        for i, prompt in enumerate(prompts):
            engine.submit(Request(prompt, 6 + i, request_id=str(i)))
        results.append({c.request_id: c.token_ids for c in engine.run()})
    assert results[0] == results[1]


def test_cache_overflow_is_a_clear_error():
    _, native = _pair("skywork", torch.float32)
    with torch.inference_mode():
        cache = native.new_kv_cache(1, 4)
        native(torch.tensor([[5, 6, 7, 8]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 4 positions"):
            native(torch.tensor([[9]]), cache=cache)


def test_without_native_kernels_inference_falls_back_to_onednn_packing():
    from skymoe.infer.cpu_kernels import PackedLinear, can_pack

    model = skymoe.build_model(SkyworkMoeConfig(**CONFIG, **VARIANTS["skywork"]), seed=0)
    if not can_pack(model):
        pytest.skip("oneDNN packing unavailable on this CPU")
    prepared = prepare(model, kernels=PYTORCH_KERNELS)
    assert isinstance(prepared.lm_head, PackedLinear)
    assert not any(isinstance(m, NativeMoEDecoderLayer) for m in prepared.modules())


def test_a_failed_build_warns_and_returns_none(monkeypatch, tmp_path, capsys):
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "this source does not compile"\n')
    monkeypatch.setattr(native_build, "SOURCES", [broken])
    monkeypatch.setenv("SKYMOE_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="native CPU kernels unavailable"):
        assert native_build.build_native(progress=native_build.to_stderr) is None
    assert "building skymoe's native CPU kernels" in capsys.readouterr().err
    monkeypatch.setenv("SKYMOE_NATIVE", "0")
    assert load_native() is None  # disabled: no attempt, no warning


def test_preparing_twice_is_refused_and_changes_nothing():
    _, native = _pair("skywork", torch.float32)
    before = [type(m).__name__ for m in native.modules()]
    with pytest.raises(ConfigError, match=r"model\.layers\.0: already a NativeMoEDecoderLayer.*"
                                          "prepare a model once"):
        prepare(native, kernels=NATIVE)
    assert [type(m).__name__ for m in native.modules()] == before


def test_the_build_uses_the_cpus_bf16_dot_products_where_it_has_them():
    """-march=native reached the compiler: AVX512-BF16 kernels exactly where the CPU has them."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    has = "avx512_bf16" in flags and "avx512bw" in flags
    assert kernels.has_avx512_bf16() == has


@pytest.mark.parametrize("variant", ["skywork", "dense-every-other"])
def test_fp8_model_holds_one_byte_per_weight_and_computes_the_dequantized_model(
        tmp_path, variant):
    """An FP8 checkpoint (skymoe quantize), prepared: every projection and expert holds its
    e4m3 values (narrowed back from the widened values ``fp8="auto"`` loads) and runs through
    the native kernels, decode and prefill alike. In fp32 its logits are the dequantized
    model's (the bf16 activations' kernel is checked against exact references above)."""
    from skymoe.infer.native_modules import NativeFp8Experts, NativeFp8Linear
    from skymoe.quantize import quantize_checkpoint

    config = SkyworkMoeConfig(**CONFIG, **VARIANTS[variant])
    skymoe.save_model(_built(config, torch.bfloat16), tmp_path / "bf16")
    fp8 = quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", show_progress=False)
    exact = skymoe.load_model(fp8, dtype=torch.float32, fp8="dequantize").eval()
    native = prepare(skymoe.load_model(fp8, dtype=torch.float32, fp8="auto"), kernels=NATIVE)
    fp8_modules = [m for m in native.modules() if isinstance(m, (NativeFp8Linear,
                                                                 NativeFp8Experts))]
    assert fp8_modules and all(t.dtype == torch.float8_e4m3fn for m in fp8_modules
                               for name, t in m.named_buffers() if name in ("weight", "w13",
                                                                             "w2"))
    assert all(layer.self_attn.wqkv.dtype == torch.float8_e4m3fn
               for layer in native.model.layers)
    assert any(isinstance(layer, NativeMoEDecoderLayer) for layer in native.model.layers)
    for length in (6, 24):  # 2 x 24 tokens: the prefill's GEMMs on values widened per call
        ids = torch.randint(3, 101, (2, length), generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            caches = exact.new_kv_cache(2, 32), native.new_kv_cache(2, 32)
            torch.testing.assert_close(native(ids, cache=caches[1]).logits,
                                       exact(ids, cache=caches[0]).logits, rtol=1e-4, atol=1e-4)
            step = ids[:, -1:]
            for _ in range(6):
                want = exact(step, cache=caches[0]).logits
                torch.testing.assert_close(native(step, cache=caches[1]).logits, want,
                                           rtol=1e-4, atol=1e-4)
                step = want[:, -1].argmax(-1, keepdim=True)


def test_an_fp8_lm_head_decodes_through_the_native_kernel_close_to_the_bf16_head():
    """``--fp8-lm-head``: the head as e4m3 values with one scale per vocabulary row; prepared,
    it reads one byte per weight; its logits stay within FP8's rounding of the bf16 head's."""
    from skymoe.infer.native_modules import NativeFp8Linear
    from skymoe.model.fp8 import quantize_lm_head

    config = SkyworkMoeConfig(**CONFIG, **VARIANTS["skywork"])
    plain = _built(config, torch.bfloat16).eval()
    quantized = _built(config, torch.bfloat16)
    quantize_lm_head(quantized)
    native = prepare(quantized, kernels=NATIVE)
    assert isinstance(native.lm_head, NativeFp8Linear)
    assert native.lm_head.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        caches = plain.new_kv_cache(2, 16), native.new_kv_cache(2, 16)
        want = plain(ids, cache=caches[0]).logits.float()
        got = native(ids, cache=caches[1]).logits.float()
        step = want[:, -1:].argmax(-1)
        want_step = plain(step, cache=caches[0]).logits.float()
        got_step = native(step, cache=caches[1]).logits.float()
    for a, b in ((got, want), (got_step, want_step)):
        # e4m3 keeps 3 mantissa bits: each weight within 1/16 of itself.
        assert (a - b).abs().mean() <= 0.1 * b.abs().mean()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    with pytest.raises(ConfigError, match="quantize it once"):
        quantize_lm_head(native)

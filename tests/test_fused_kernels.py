"""Native training kernels (skymoe.kernels) equal the PyTorch ops they replace, forward
and backward: SwiGLU (``F.silu(gate) * up``) and the MoE's gather and weighted combine around the
experts (``dispatch_sorted``'s PyTorch path).

The reference is eager PyTorch on the same tensors. bf16 results may differ from it only where
the last bit of exp tips a rounding (one bf16 ulp); fp32 ones by a few fp32 ulps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import skymoe
from skymoe.config import SkyworkMoeConfig
from skymoe.kernels import PYTORCH_KERNELS, Kernels, load_native
from skymoe.model import moe

NATIVE = Kernels(load_native())
pytestmark = pytest.mark.skipif(NATIVE.native is None,
                                reason="native kernels cannot be built here")

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6),
              torch.bfloat16: dict(rtol=2 ** -8, atol=1e-5)}


def reference_swiglu(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 2 * 1408), (3, 5, 2 * 37), (1, 2)])
def test_swiglu_forward_and_backward_match_pytorch(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    h = (torch.randn(shape, generator=gen) * 4).to(dtype)
    h.view(-1)[:4] = torch.tensor([0.0, -100.0, 100.0, -1.2785])[: h.numel()]  # extremes
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(dtype)
    h_ref, h_got = h.clone().requires_grad_(), h.clone().requires_grad_()
    ref, got = reference_swiglu(h_ref), NATIVE.swiglu(h_got)
    assert got.grad_fn is not None and "NativeSwiGLU" in type(got.grad_fn).__name__
    ref.backward(dy)
    got.backward(dy)
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOLERANCES[dtype])
    torch.testing.assert_close(h_got.grad, h_ref.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_consuming_its_input_gives_the_same_gradients(dtype):
    """With ``consume_input`` the backward writes the gradient over the (dead) input, except
    when the graph is kept: then a second backward still sees the original input."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(9, 2 * 40, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(9, 40, generator=gen).to(dtype)
    (want,) = torch.autograd.grad(reference_swiglu(base * 2), base, dy)

    h = base * 2
    NATIVE.swiglu(h, consume_input=True).backward(dy)
    torch.testing.assert_close(base.grad, want, **TOLERANCES[dtype])
    assert torch.equal(h.detach(), base.grad / 2)  # the input's memory took the gradient

    base.grad = None
    h = base * 2
    out = NATIVE.swiglu(h, consume_input=True)
    out.backward(dy, retain_graph=True)
    torch.testing.assert_close(h.detach(), base.detach() * 2)  # kept: not overwritten
    out.backward(dy)
    torch.testing.assert_close(base.grad, 2 * want, **TOLERANCES[dtype])


def test_swiglu_of_a_non_contiguous_input():
    h = torch.randn(6, 40)[:, 4:36]  # a column slice: rows are not contiguous
    torch.testing.assert_close(NATIVE.swiglu(h), reference_swiglu(h))


def test_swiglu_propagates_nan():
    h = torch.tensor([[float("nan"), 1.0, 2.0, float("nan")]])
    out = NATIVE.swiglu(h)
    assert torch.isnan(out).all()


def test_other_devices_dtypes_and_compiled_code_use_pytorch_ops(monkeypatch):
    assert NATIVE.native_for(torch.zeros(2, dtype=torch.float16)) is None
    assert NATIVE.native_for(torch.zeros(2, device="meta")) is None
    assert PYTORCH_KERNELS.native_for(torch.zeros(2)) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert NATIVE.native_for(torch.zeros(2)) is None
    out = NATIVE.swiglu(torch.randn(3, 8, requires_grad=True))
    assert "NativeSwiGLU" not in type(out.grad_fn).__name__


def test_training_gradients_match_the_pytorch_path():
    """A tiny MoE model's loss and parameter gradients are the same with and without the native
    training kernels (fp32: rounding noise only)."""
    config = SkyworkMoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=4, num_experts_per_tok=2, moe_use_logits_norm=True,
                              moe_gate_norm_std=1.0)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(kernels):
        model = skymoe.build_model(config, seed=0).use_kernels(kernels)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}

    loss_native, grads_native = loss_and_grads(NATIVE)
    loss_plain, grads_plain = loss_and_grads(PYTORCH_KERNELS)
    torch.testing.assert_close(loss_native, loss_plain, rtol=1e-6, atol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_native[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _dispatch(x, ids, weights, keep, y_dtype, kernels):
    """dispatch_sorted around a per-expert scaling 'FFN' (rows of expert e times (e + 1)), whose
    gradients flow back through the gather; the FFN's output has ``y_dtype``."""
    def ffn(x_SH, counts):
        scale = torch.repeat_interleave(torch.arange(1.0, len(counts) + 1),
                                        torch.tensor(counts)).to(x_SH.dtype)
        return (x_SH * scale[:, None]).to(y_dtype)
    return moe.dispatch_sorted(x, ids, weights, 4, ffn, keep, kernels)


@pytest.mark.parametrize("dtype,y_dtype", [(torch.float32, torch.float32),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.bfloat16)])  # autocast-like
@pytest.mark.parametrize("drop", [False, True])
def test_gather_and_combine_match_the_pytorch_path(dtype, y_dtype, drop):
    """Output, input gradient and routing-weight gradient: fp32 equals the PyTorch path to
    rounding noise; with bf16 rows (whose sums round in a different order) the native path is
    no further from an fp64 computation than the PyTorch path is."""
    gen = torch.Generator().manual_seed(3)
    t, k, h = 13, 3, 24
    x = torch.randn(t, h, generator=gen).to(dtype)
    ids = torch.randint(0, 3, (t, k), generator=gen)  # expert 3 receives no tokens
    weights = torch.rand(t, k, generator=gen)
    keep = torch.rand(t, k, generator=gen) > 0.3 if drop else None
    if drop:
        keep[0] = False  # token 0 loses every assignment
    dy = torch.randn(t, h, generator=gen).to(dtype)

    assert NATIVE.native_for(x) is not None  # the first run takes the native path
    native = _dispatch_grads(x, ids, weights, keep, dy, y_dtype, NATIVE)
    plain = _dispatch_grads(x, ids, weights, keep, dy, y_dtype, PYTORCH_KERNELS)
    exact = _dispatch_grads(x.double(), ids, weights.double(), keep, dy.double(), torch.float64,
                            PYTORCH_KERNELS)
    for got, ref, best, name in zip(native, plain, exact, ("output", "x grad", "weights grad")):
        assert got.dtype == ref.dtype, name
        if dtype == y_dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)
        else:
            err_native = (got.double() - best).abs().max().item()
            err_plain = (ref.double() - best).abs().max().item()
            assert err_native <= 1.25 * err_plain + 1e-6, (name, err_native, err_plain)
    if drop:  # a token whose every assignment was dropped gets zero output and gradient
        assert (native[0][0] == 0).all() and (native[1][0] == 0).all()


def _dispatch_grads(x, ids, weights, keep, dy, y_dtype, kernels):
    xr, wr = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = _dispatch(xr, ids, wr, keep, y_dtype, kernels)
    out.backward(dy)
    return out.detach(), xr.grad, wr.grad

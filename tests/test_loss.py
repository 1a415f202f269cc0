"""The causal-LM loss equals fp32 cross-entropy in value and gradient, through the native CPU
kernel and through the chunked PyTorch path."""

import pytest
import torch
import torch.nn.functional as F

from skymoe.kernels import PYTORCH_KERNELS, Kernels, load_native
from skymoe.model import loss as loss_mod
from skymoe.model.loss import causal_lm_loss

NATIVE = Kernels(load_native())
PATHS = ["chunked", pytest.param("native", marks=pytest.mark.skipif(
    NATIVE.native is None, reason="native kernels cannot be built here"))]


def use_path(monkeypatch, path) -> Kernels:
    """The kernels that take ``path``."""
    if path == "chunked":
        monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 3 * 50)  # force several chunks
        return PYTORCH_KERNELS
    return NATIVE


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("grad_scale", [1.0, 2.5])  # 1.0: backward may skip the scaling
def test_matches_fp32_cross_entropy(monkeypatch, path, dtype, tol, grad_scale):
    kernels = use_path(monkeypatch, path)
    torch.manual_seed(0)
    logits = (torch.randn(3, 9, 50) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 9))
    labels[1, 4] = labels[2, 1] = -100
    got = causal_lm_loss(logits, labels, kernels)
    (g_got,) = torch.autograd.grad(got * grad_scale, logits)
    ref = reference(logits, labels)
    (g_ref,) = torch.autograd.grad(ref * grad_scale, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got.float(), g_ref.float(), rtol=tol, atol=tol * 1e-2)
    assert g_got[:, -1].abs().max() == 0 and g_got[1, 3].abs().max() == 0


@pytest.mark.parametrize("path", PATHS)
def test_all_ignored_gives_zero_not_nan(monkeypatch, path):
    kernels = use_path(monkeypatch, path)
    logits = torch.randn(1, 4, 7, requires_grad=True)
    out = causal_lm_loss(logits, torch.full((1, 4), -100), kernels)
    out.backward()
    assert out.item() == 0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("path", PATHS)
def test_large_logits_are_stable(monkeypatch, path):
    """Logits beyond fp32 exp's range (±200; e^88 overflows) give fp32 cross-entropy, no inf
    or NaN (up to the fp32 rounding of the log-sum-exp near 200)."""
    kernels = use_path(monkeypatch, path)
    logits = torch.tensor([[[200.0, -200.0, 0.0, 190.0], [-200.0, -200.0, -200.0, -199.0]]],
                          requires_grad=True)
    labels = torch.tensor([[0, 3]])
    got = causal_lm_loss(logits, labels, kernels)
    (g_got,) = torch.autograd.grad(got, logits)
    ref = reference(logits, labels)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(g_got, g_ref)


def test_native_kernel_rejects_labels_outside_the_vocabulary():
    if NATIVE.native is None:
        pytest.skip("native kernels cannot be built here")
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 5\)"):
        NATIVE.native.cross_entropy_rows(torch.zeros(2, 5), torch.tensor([1, 5]), torch.ones(2))

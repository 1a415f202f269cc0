"""The chunked causal-LM loss equals fp32 cross-entropy in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from skymoe.model import loss as loss_mod
from skymoe.model.loss import causal_lm_loss


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_matches_fp32_cross_entropy(monkeypatch, dtype, tol):
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 3 * 50)  # force several chunks
    torch.manual_seed(0)
    logits = (torch.randn(3, 9, 50) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 9))
    labels[1, 4] = labels[2, 1] = -100
    got = causal_lm_loss(logits, labels)
    (g_got,) = torch.autograd.grad(got * 2.5, logits)
    ref = reference(logits, labels)
    (g_ref,) = torch.autograd.grad(ref * 2.5, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got.float(), g_ref.float(), rtol=tol, atol=tol * 1e-2)
    assert g_got[:, -1].abs().max() == 0 and g_got[1, 3].abs().max() == 0


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 4, 7, requires_grad=True)
    out = causal_lm_loss(logits, torch.full((1, 4), -100))
    out.backward()
    assert out.item() == 0 and torch.isfinite(logits.grad).all()

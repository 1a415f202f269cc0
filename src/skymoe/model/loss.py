"""Next-token cross-entropy that never materializes fp32 copies of the full logits.

``F.cross_entropy(logits.float(), ...)`` on a [tokens, vocab] bf16 tensor writes an fp32 copy,
an fp32 log-softmax, and an fp32 gradient, each as large as the logits (for 4096 tokens x 32k
vocab: 0.5 GB apiece). Here the log-sum-exp and the gradient ``softmax - onehot`` of each row
are computed in fp32 and the gradient is written straight into a tensor of the logits' dtype:
by a native kernel on CPU when the model computes with the native kernels (one pass per row,
see ``skymoe.kernels``), otherwise in chunks of rows through a small fp32 buffer. The math is
cross-entropy in fp32.
"""

from __future__ import annotations

import torch

from ..kernels import PYTORCH_KERNELS, Kernels

IGNORE_INDEX = -100
# fp32 work buffer of at most 4 MiB, reused across chunks: small enough to stay in cache and to
# avoid a fresh (page-faulting) allocation per chunk.
_CHUNK_ELEMENTS = 1 << 20


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


class _RowwiseCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose gradient is computed during the forward pass.

    Each row's log-sum-exp and, when a gradient is needed, ``(softmax - onehot) / count`` are
    computed in one visit to the row (see the module docstring), the latter stored in the
    logits' dtype. Backward only scales it by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor,
                kernels: Kernels) -> torch.Tensor:
        valid = labels_N != IGNORE_INDEX
        safe_labels = labels_N.clamp_min(0)
        count = valid.sum().clamp_min(1)
        want_grad = logits_NV.requires_grad
        grad = torch.empty_like(logits_NV) if want_grad else None
        scale_N = valid.float() / count
        native = kernels.native_for(logits_NV) if logits_NV.is_contiguous() else None
        if native is not None:
            lse = native.cross_entropy_rows(logits_NV, safe_labels.long().contiguous(), scale_N,
                                            grad)
        else:
            lse = _chunked_lse_and_grad(logits_NV, safe_labels, scale_N, grad)
        target = logits_NV.gather(1, safe_labels[:, None]).squeeze(1).float()
        loss = ((lse - target) * valid).sum() / count
        if want_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # The usual incoming gradient is 1: skip a full pass over the logits-sized gradient
        # (checked on CPU only, where reading the value costs no device synchronization).
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            return grad, None, None
        return grad * grad_loss.to(grad.dtype), None, None


def _chunked_lse_and_grad(logits_NV: torch.Tensor, safe_labels_N: torch.Tensor,
                          scale_N: torch.Tensor, grad_NV: torch.Tensor | None) -> torch.Tensor:
    """Row log-sum-exp (fp32) and, into ``grad_NV``, ``(softmax - onehot) * scale`` rows,
    through a small fp32 buffer reused across chunks of rows."""
    n, v = logits_NV.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits_NV.device)
    step = _rows_per_chunk(v)
    buf = torch.empty(min(step, n), v, dtype=torch.float32, device=logits_NV.device)
    for start in range(0, n, step):
        end = min(start + step, n)
        work = buf[:end - start].copy_(logits_NV[start:end])
        row_max = work.amax(dim=-1, keepdim=True)
        work.sub_(row_max).exp_()
        sum_exp = work.sum(dim=-1, keepdim=True)
        lse[start:end] = (row_max + sum_exp.log()).squeeze(1)
        if grad_NV is not None:
            work.div_(sum_exp)  # softmax
            work[torch.arange(end - start, device=work.device), safe_labels_N[start:end]] -= 1.0
            grad_NV[start:end] = work.mul_(scale_N[start:end, None])
    return lse


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                   kernels: Kernels = PYTORCH_KERNELS) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts ``labels[t + 1]``; -100 is ignored.

    The labels are shifted instead of the logits (the last position gets -100), so the logits
    are used in place, without a copy. ``kernels`` may compute the rows natively.
    """
    return _RowwiseCrossEntropy.apply(logits_BTV.reshape(-1, logits_BTV.shape[-1]),
                                      next_token_labels(labels_BT), kernels)


class CausalLMLoss:
    """``causal_lm_loss`` with a fixed kernel choice: the model's ``loss_function`` after
    ``SkyworkForCausalLM.use_kernels``."""

    def __init__(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def __call__(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits_BTV, labels_BT, self.kernels)


def label_count(labels_BT: torch.Tensor) -> int:
    """How many next-token predictions ``causal_lm_loss`` averages over: the label positions
    after each row's first that are not ignored."""
    return int((labels_BT[:, 1:] != IGNORE_INDEX).sum())


def next_token_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Flat [B*T] targets for next-token prediction: ``labels[t + 1]``, -100 at each
    sequence's last position."""
    shifted = torch.cat([labels_BT[:, 1:], labels_BT.new_full((labels_BT.shape[0], 1),
                                                               IGNORE_INDEX)], dim=1)
    return shifted.reshape(-1)

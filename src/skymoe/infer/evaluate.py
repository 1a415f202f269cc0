"""Quality of a model on text: perplexity, and agreement with a reference model (KL divergence,
top-1 agreement), the measures used to judge quantization.

Scoring rule: the documents are tokenized and joined into one stream with EOS between them
(as training packs them). Windows of ``context`` tokens advance by ``stride`` (1 to
``context - 1``, default ``context // 2``, as llama.cpp scores); the first window predicts
all its tokens after the first, each later one only its last ``stride``. So every token after
the first is predicted exactly once, from at least ``context - stride`` tokens of history once
past the first window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ConfigError

if TYPE_CHECKING:  # annotations only: evaluating a model needs no tokenizer code
    from ..checkpoint.tokenizer import Tokenizer
    from ..config import SkyworkMoeConfig


@dataclass
class Window:
    tokens: torch.Tensor  # [length]
    scored: int           # predictions scored: the last ``scored`` positions' next tokens


@dataclass
class EvalResult:
    tokens_scored: int
    nll: float                        # mean negative log-likelihood (nats per token)
    kl_mean: float | None = None      # KL(reference || model) per token, nats
    kl_p999: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nll, 700.0))


def separator_id(tokenizer: Tokenizer, config: SkyworkMoeConfig, where: str) -> int:
    """The EOS id put between documents: the tokenizer's, else the first of config.json's."""
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    if not config.eos_token_ids:
        raise ConfigError(f"{where}: neither the tokenizer nor config.json names an EOS token, "
                          "needed between documents")
    return config.eos_token_ids[0]


def token_stream(documents: Iterable[str], tokenizer: Tokenizer, eos_id: int,
                 max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of the documents, each tokenized without BOS and
    followed by ``eos_id`` (see the module docstring); documents past the cut are not
    tokenized."""
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer.encode(doc, add_bos=False) + [eos_id]
        if len(stream) >= max_tokens:
            break
    return stream[:max_tokens]


def windows(stream: list[int], context: int, stride: int) -> Iterator[Window]:
    """The scoring windows over ``stream`` (see the module docstring)."""
    if context < 2:
        raise ConfigError(f"--context must be >= 2, got {context}")
    if not 1 <= stride < context:
        raise ConfigError(f"--stride must be in [1, context - 1 = {context - 1}], got {stride}")
    if len(stream) < 2:
        raise ConfigError("the evaluation text has fewer than 2 tokens")
    ids = torch.tensor(stream, dtype=torch.long)
    end = min(context, len(stream))
    yield Window(ids[:end], end - 1)
    while end < len(stream):
        new_end = min(end + stride, len(stream))
        start = max(new_end - context, 0)
        yield Window(ids[start:new_end], new_end - end)
        end = new_end


def token_kl(ref_logits_NV: torch.Tensor, logits_NV: torch.Tensor) -> torch.Tensor:
    """Per-token KL(reference || model) in nats, computed in fp32."""
    ref = F.log_softmax(ref_logits_NV.float(), dim=-1)
    own = F.log_softmax(logits_NV.float(), dim=-1)
    return (ref.exp() * (ref - own)).sum(dim=-1)


@torch.no_grad()
def _scored_logits(model: torch.nn.Module, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the scored positions [scored, V] and their target tokens [scored]."""
    ids = window.tokens.to(model.device)[None]
    logits = model(ids).logits[0]
    n = window.tokens.shape[0]
    positions = slice(n - 1 - window.scored, n - 1)
    return logits[positions], ids[0, n - window.scored:]


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: list[int], context: int, stride: int | None = None,
             reference: torch.nn.Module | None = None, progress: bool = False) -> EvalResult:
    """Perplexity of ``model`` on the token ``stream``; with ``reference``, KL divergence and
    top-1 agreement of ``model`` against it on the same positions."""
    stride = stride or context // 2
    model.eval()
    if reference is not None:
        reference.eval()
    nll_sum, count, agree = 0.0, 0, 0
    kls: list[torch.Tensor] = []
    total = max(1, math.ceil((len(stream) - context) / stride) + 1)
    for window in tqdm(windows(stream, context, stride), total=total, desc="eval",
                       unit="window", disable=not progress or None):
        logits, targets = _scored_logits(model, window)
        nll_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        count += targets.numel()
        if reference is not None:
            ref_logits, _ = _scored_logits(reference, window)
            kls.append(token_kl(ref_logits, logits).cpu())
            agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
    result = EvalResult(count, nll_sum / count)
    if reference is not None:
        kl = torch.cat(kls).double()
        result.kl_mean = float(kl.mean())
        result.kl_p999 = float(torch.quantile(kl, 0.999))
        result.kl_max = float(kl.max())
        result.top1_agreement = agree / count
    return result

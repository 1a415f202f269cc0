"""Sampling and KV-cached autoregressive generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model.transformer import SkyworkForCausalLM


@dataclass
class SamplingParams:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits_BV: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if params.temperature == 0:  # (fp32 first: CPU's bf16 argmax is several times slower)
        return logits_BV.float().argmax(dim=-1)
    logits = logits_BV.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: SkyworkForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
             params: SamplingParams | None = None, eos_ids: list[int] | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, T] with a KV cache.

    Prefill runs the prompt once; each decode step feeds one token per sequence. Sequences that
    emit an EOS id stop (they are padded with that EOS while others continue); generation ends
    when all stopped. ``on_token`` gets each step's new ids [B] (for streaming). Returns the new
    tokens [B, n].
    """
    params = params or SamplingParams()
    eos = torch.tensor(eos_ids or [], dtype=torch.long, device=input_ids.device)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(params.seed)
    b, t = input_ids.shape
    cache = model.new_kv_cache(b, t + max_new_tokens)
    logits = model(input_ids, cache=cache, last_only=True).logits[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        nxt = sample_next(logits, params, gen)
        if out and eos.numel():
            nxt = torch.where(done, out[-1], nxt)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if eos.numel():
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(b, 0)

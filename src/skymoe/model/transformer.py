"""Decoder layers and the causal LM (dense or MoE per layer), one definition for every use.

Module and parameter names follow the HF layout (``model.layers.{i}.self_attn.q_proj.weight``,
``...block_sparse_moe.gate.weight``, ``...mlp.gate_proj.weight``) so that checkpoint names map
one-to-one, except the stacked expert weights (see ``skymoe.checkpoint.names``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import SkyworkMoeConfig
from ..kernels import Kernels, UsesKernels
from .layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SlotKVCache
from .loss import CausalLMLoss, causal_lm_loss
from .moe import EXPERT_IMPLS, MoEBlock, MoETrainingOptions


class DenseMLP(nn.Module):
    """Llama's SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and FFN (dense MLP or MoE block), each with a residual connection."""

    def __init__(self, config: SkyworkMoeConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                   c.head_size, layer_idx, c.sliding_window)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.is_moe_layer(layer_idx):
            self.block_sparse_moe = MoEBlock(
                c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok,
                use_logits_norm=c.moe_use_logits_norm, norm_scale=c.moe_gate_norm_std,
                two_layer_gate=c.moe_2layer_gate, mul_topk=not c.moe_feature_no_mul_topk)
        else:
            self.mlp = DenseMLP(c.hidden_size, c.intermediate_size)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None, start: int | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.ffn(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.*`` prefix)."""

    def __init__(self, config: SkyworkMoeConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    """``logits`` [B, T, V] (only the last position when ``last_only``); ``loss`` with labels.

    When training with MoE training options: ``aux_loss``, the sum over MoE layers of
    coefficient * balance loss + z-loss (add it to the loss), and ``moe_stats``, one dict of
    detached per-layer sums per MoE layer (see ``MoEBlock``).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    moe_stats: list[dict[str, torch.Tensor]] | None = None


class SkyworkForCausalLM(nn.Module):
    """Causal language model: Skywork-MoE, Mixtral (normalization off) or dense Llama."""

    def __init__(self, config: SkyworkMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(config.head_size, config.rope_theta)
        # Recompute each layer's activations in backward instead of storing them (training).
        self.activation_checkpointing = False
        # Next-token loss from (logits, labels); tensor parallelism swaps in a vocab-parallel one.
        self.loss_function = causal_lm_loss

    # ------------------------------------------------------------------------------ utilities
    # The embedding is never swapped by inference transforms, so it defines device and dtype.
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.block_sparse_moe for layer in self.model.layers
                if hasattr(layer, "block_sparse_moe")]

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config ties them (call again
        after anything that re-creates parameters, such as ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_expert_impl(self, impl: str) -> None:
        """Select ``"grouped"`` (default) or ``"loop"`` (reference) for every MoE block."""
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown expert implementation {impl!r}; use one of "
                             f"{sorted(EXPERT_IMPLS)}")
        for block in self.moe_blocks():
            block.experts.impl = impl

    def use_kernels(self, kernels: Kernels) -> "SkyworkForCausalLM":
        """Compute the experts' SwiGLU and row gather/combine and the loss with ``kernels``
        (from ``skymoe.kernels.load_kernels``; a new model uses the PyTorch ops). Returns the
        model."""
        for module in self.modules():
            if isinstance(module, UsesKernels):
                module.kernels = kernels
        # A vocabulary-parallel loss (tensor parallelism) has no native kernel: it stays.
        if self.loss_function is causal_lm_loss or isinstance(self.loss_function, CausalLMLoss):
            self.loss_function = CausalLMLoss(kernels)
        return self

    def configure_moe_training(self, options: MoETrainingOptions | None) -> None:
        """Capacity, drop policy and balance losses for training forwards (None: dropless,
        no aux loss). Evaluation mode always routes dropless."""
        for block in self.moe_blocks():
            block.training_options = options

    def set_aux_coefs(self, coefs: list[float]) -> None:
        """Per-MoE-layer balance-loss coefficients (from the adaptive controller)."""
        blocks = self.moe_blocks()
        if len(coefs) != len(blocks):
            raise ValueError(f"got {len(coefs)} coefficients for {len(blocks)} MoE layers")
        for block, coef in zip(blocks, coefs):
            block.aux_coef = float(coef)

    def compile_layers(self, **compile_kwargs) -> "SkyworkForCausalLM":
        """``torch.compile`` each decoder layer in place (as torchtitan does per block).

        Fuses the elementwise work around the matmuls (RMSNorm, RoPE, SwiGLU, routing) in
        forward and backward; the expert dispatch's data-dependent group sizes become graph
        breaks, so the expert GEMMs stay the eager kernels. Meant for training and prefill-heavy
        work with fixed shapes: the first step of each new shape pays the compilation.
        """
        for layer in self.model.layers:
            layer.compile(**compile_kwargs)
        return self

    def init_weights(self, seed: int | None = None) -> None:
        """Random init: N(0, initializer_range) for matrices, ones for norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def new_slot_cache(self, slots: int, max_len: int) -> SlotKVCache:
        """A cache of ``slots`` independent sequences of up to ``max_len`` positions."""
        c = self.config
        return SlotKVCache(c.num_hidden_layers, slots, self.model.layers[0].self_attn.kv_heads,
                           max_len, c.head_size, self.dtype, self.device)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for this model's KV heads (under tensor parallelism: this rank's)."""
        c = self.config
        kv_heads = self.model.layers[0].self_attn.kv_heads
        return KVCache(c.num_hidden_layers, batch, kv_heads, max_len, c.head_size,
                       self.dtype, self.device)

    # -------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None, start: int | None = None,
                last_only: bool = False, slots: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits for ``input_ids`` [B, T].

        With a ``cache`` the tokens are placed at positions ``start ..`` (default: the cache's
        current length) and the cache advances. ``labels`` [B, T] give the next-token loss
        (shifted inside; -100 ignored). With a ``SlotKVCache``, row i continues the sequence
        in cache slot ``slots[i]`` from that slot's own length. ``last_only`` computes the
        logits of the last position only, ``logits_at`` [B] those of position ``logits_at[i]``
        of row i only (rows of different lengths, right-padded); either gives [B, 1, V].
        """
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if isinstance(cache, SlotKVCache):  # each row continues its own sequence
            if slots is None:
                raise ValueError("a SlotKVCache forward needs slots= (the cache slot of each row)")
            cos, sin = self.rotary.cos_sin_at(cache.begin(slots, t), x.dtype)
        else:
            if cache is not None and start is None:
                start = cache.length
            start = start or 0
            cos, sin = self.rotary.cos_sin(start, t, x.device, x.dtype)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, cache, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, start)
        if isinstance(cache, SlotKVCache):
            cache.finish()
        elif cache is not None:
            cache.length = start + t
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at][:, None]
        elif last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = self.lm_head(x)
        loss = self.loss_function(logits, labels) if labels is not None else None
        out = CausalLMOutput(logits=logits, loss=loss)
        if self.training:
            self._collect_moe_training_outputs(out)
        return out

    def _collect_moe_training_outputs(self, out: CausalLMOutput) -> None:
        blocks = [b for b in self.moe_blocks() if b.last_aux is not None]
        if blocks:
            out.aux_loss = torch.stack([b.last_aux for b in blocks]).sum()
            out.moe_stats = [b.last_stats for b in blocks]
        for b in blocks:  # release the graph references; the output owns them now
            b.last_aux = b.last_stats = None


def build_model(config: SkyworkMoeConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, seed: int | None = None,
                expert_impl: str | None = None) -> SkyworkForCausalLM:
    """A randomly initialized model (``seed`` for reproducibility) in ``dtype`` on ``device``."""
    model = SkyworkForCausalLM(config)
    model.init_weights(seed)
    model.to(device=device, dtype=dtype or config.dtype)
    if expert_impl:
        model.set_expert_impl(expert_impl)
    return model


def flops_per_token(config: SkyworkMoeConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token (2 per multiply-add), attention scores included."""
    c = config
    hd = c.head_size
    attn_proj = 2 * c.hidden_size * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    attn_scores = 2 * 2 * c.num_attention_heads * hd * seq_len / 2  # causal: half the keys
    ffn_one = 2 * 3 * c.hidden_size * c.intermediate_size
    total = 0.0
    for i in range(c.num_hidden_layers):
        ffn = ffn_one * (c.num_experts_per_tok if c.is_moe_layer(i) else 1)
        router = 2 * c.hidden_size * c.num_experts if c.is_moe_layer(i) else 0
        total += attn_proj + attn_scores + ffn + router
    return total + 2 * c.hidden_size * c.vocab_size

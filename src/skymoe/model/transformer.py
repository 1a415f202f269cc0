"""Decoder layers and the causal LM (dense or MoE per layer), one definition for every use.

Module and parameter names follow the HF layout (``model.layers.{i}.self_attn.q_proj.weight``,
``...block_sparse_moe.gate.weight``, ``...mlp.gate_proj.weight``) so that checkpoint names map
one-to-one, except the stacked expert weights (see ``skymoe.checkpoint.names``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import SkyworkMoeConfig
from ..kernels import Kernels, UsesKernels
from .layers import (Attention, KVCache, RMSNorm, RotaryEmbedding, SlotKVCache,
                     packed_causal_mask)
from .loss import CausalLMLoss, causal_lm_loss
from .moe import EXPERT_IMPLS, MoEBalance, MoEBlock, MoEOutput, MoEStats


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
    """Pre-norm attention and FFN (dense MLP or MoE block), each with a residual connection.

    Returns ``(hidden, moe)``: ``moe`` is the MoE block's ``MoEOutput`` in a training forward
    (``options`` given, training mode), else None. ``recompute`` marks the layer for activation
    checkpointing in training."""

    def __init__(self, config: SkyworkMoeConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.recompute = False
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                   c.head_size, layer_idx, c.sliding_window)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.is_moe_layer(layer_idx):
            self.block_sparse_moe = MoEBlock(
                c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok,
                use_logits_norm=c.moe_use_logits_norm, norm_scale=c.moe_gate_norm_std,
                two_layer_gate=c.moe_2layer_gate, mul_topk=not c.moe_feature_no_mul_topk,
                expert_bias=c.moe_expert_bias)
        else:
            self.mlp = DenseMLP(c.hidden_size, c.intermediate_size)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, start: int | None = None,
                balance: MoEBalance | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEOutput | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask)
        h = self.post_attention_layernorm(x)
        if not hasattr(self, "block_sparse_moe"):
            return x + self.mlp(h), None
        options = balance.options if balance is not None else None
        coef = balance.coefs.get(self.layer_idx, 0.0) if balance is not None else 0.0
        global_load = balance.global_loads.get(self.layer_idx) if balance is not None else None
        y, moe = self.block_sparse_moe(h, options, coef, global_load)
        return x + y, moe


class LayerStack(nn.ModuleDict):
    """Decoder layers keyed by their index in the whole model, so a model part holding some of
    them (a pipeline stage) keeps the parameter names ``model.layers.{i}.*``. Iterates over
    the layers in model order; indexable by that index."""

    def __init__(self, layers: Iterable[DecoderLayer] = ()) -> None:
        super().__init__({str(layer.layer_idx): layer for layer in layers})

    def __iter__(self) -> Iterator[DecoderLayer]:
        return iter(self.values())

    def __getitem__(self, index: int | str) -> DecoderLayer:
        return super().__getitem__(str(index))

    def __setitem__(self, index: int | str, layer: nn.Module) -> None:
        super().__setitem__(str(index), layer)


class DecoderStack(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.*`` prefix). A model part
    (pipeline stage) holds some layers, and the embedding / norm only at its ends (None
    elsewhere)."""

    def __init__(self, config: SkyworkMoeConfig, layer_ids: Iterable[int], embedding: bool,
                 norm: bool) -> None:
        super().__init__()
        self.embed_tokens = (nn.Embedding(config.vocab_size, config.hidden_size)
                             if embedding else None)
        self.layers = LayerStack(DecoderLayer(config, i) for i in layer_ids)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if norm else None


@dataclass
class CausalLMOutput:
    """``logits`` [B, T, V] (only the last position when ``last_only``); ``loss`` with labels.
    A model part without the LM head (a pipeline stage) returns its hidden states [B, T, H]
    in ``logits``' place.

    In a training forward (``balance`` given, training mode): ``aux_loss``, the sum over the
    MoE layers of coefficient * balance loss + z-loss (add it to the loss), and
    ``moe_stats``, each MoE layer's ``MoEStats`` by global layer index.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    moe_stats: dict[int, MoEStats] | None = None


class SkyworkForCausalLM(nn.Module):
    """Causal language model: Skywork-MoE, Mixtral (normalization off) or dense Llama.

    ``layer_ids`` (default: all), ``embedding`` and ``head`` build a part of the model, as a
    pipeline stage holds it: a part without the embedding takes hidden states instead of token
    ids, one without the head returns hidden states. Parameter names are those of the whole
    model either way.
    """

    def __init__(self, config: SkyworkMoeConfig, layer_ids: Iterable[int] | None = None,
                 embedding: bool = True, head: bool = True) -> None:
        super().__init__()
        self.config = config
        ids = range(config.num_hidden_layers) if layer_ids is None else sorted(layer_ids)
        self.model = DecoderStack(config, ids, embedding, head)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if head else None
        self.tie_weights()
        self.rotary = RotaryEmbedding(config.head_size, config.rope_theta)
        # Next-token loss from (logits, labels); tensor parallelism swaps in a vocab-parallel one.
        self.loss_function = causal_lm_loss

    # ------------------------------------------------------------------------------ utilities
    # Inference transforms never swap the embedding (or, on a part without it, the first
    # norm), so it defines device and dtype.
    @property
    def device(self) -> torch.device:
        return self._reference_weight().device

    @property
    def dtype(self) -> torch.dtype:
        return self._reference_weight().dtype

    def _reference_weight(self) -> torch.Tensor:
        if self.model.embed_tokens is not None:
            return self.model.embed_tokens.weight
        return next(self.parameters())

    @property
    def activation_checkpointing(self) -> bool:
        """Whether every layer recomputes its activations in backward (training)."""
        return all(layer.recompute for layer in self.model.layers)

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        for layer in self.model.layers:
            layer.recompute = bool(on)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.block_sparse_moe for layer in self.model.layers
                if hasattr(layer, "block_sparse_moe")]

    def moe_blocks_by_layer(self) -> dict[int, MoEBlock]:
        """The MoE blocks this model (or part) holds, by global layer index."""
        return {layer.layer_idx: layer.block_sparse_moe for layer in self.model.layers
                if hasattr(layer, "block_sparse_moe")}

    def enable_expert_bias(self) -> None:
        """Give every MoE block a routing bias (zero where it had none) for auxiliary-loss-free
        balancing; the config then says so (``moe_expert_bias``), so checkpoints record it."""
        self.config = dataclasses.replace(self.config, moe_expert_bias=True)
        for block in self.moe_blocks():
            block.enable_expert_bias()

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config ties them (call again
        after anything that re-creates parameters, such as ``to_empty``)."""
        if (self.config.tie_word_embeddings and self.lm_head is not None
                and self.model.embed_tokens is not None):
            self.lm_head.weight = self.model.embed_tokens.weight

    def part(self, layer_ids: Iterable[int], embedding: bool, head: bool
             ) -> "SkyworkForCausalLM":
        """A model holding some of this model's modules (shared, not copied): the layers
        ``layer_ids``, and the embedding / final norm and LM head if asked (a pipeline
        stage's part)."""
        with torch.device("meta"):  # the shell's own modules are replaced below
            part = SkyworkForCausalLM(self.config, (), embedding=False, head=False)
        part.model.layers = LayerStack(self.model.layers[i] for i in layer_ids)
        if embedding:
            part.model.embed_tokens = self.model.embed_tokens
        if head:
            part.model.norm, part.lm_head = self.model.norm, self.lm_head
        part.loss_function = self.loss_function
        return part.train(self.training)

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
        return SlotKVCache(c.num_hidden_layers, slots, self._kv_heads(), max_len, c.head_size,
                           self.dtype, self.device)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for this model's KV heads (under tensor parallelism: this rank's)."""
        c = self.config
        return KVCache(c.num_hidden_layers, batch, self._kv_heads(), max_len, c.head_size,
                       self.dtype, self.device)

    def _kv_heads(self) -> int:
        return next(iter(self.model.layers)).self_attn.kv_heads

    # -------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | SlotKVCache | None = None, start: int | None = None,
                last_only: bool = False, slots: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None,
                balance: MoEBalance | None = None,
                position_ids: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits for ``input_ids`` [B, T] (a part without the embedding: hidden states
        [B, T, H]).

        With a ``cache`` the tokens are placed at positions ``start ..`` (default: the cache's
        current length) and the cache advances. ``labels`` [B, T] give the next-token loss
        (shifted inside; -100 ignored). With a ``SlotKVCache``, row i continues the sequence
        in cache slot ``slots[i]`` from that slot's own length. ``last_only`` computes the
        logits of the last position only, ``logits_at`` [B] those of position ``logits_at[i]``
        of row i only (rows of different lengths, right-padded); either gives [B, 1, V].
        ``balance`` (training) drops assignments beyond capacity and returns the MoE layers'
        aux loss and statistics. ``position_ids`` [B, T] (no cache) give each token's position:
        a row packing several sequences restarts at 0 for each, and attention then stays
        within each sequence (``packed_causal_mask``).
        """
        x = self.embed(input_ids)
        b, t = x.shape[:2]
        mask = None
        if position_ids is not None:
            if cache is not None:
                raise ValueError("position_ids are for forwards without a KV cache")
            cos, sin = self.rotary.cos_sin_at(position_ids, x.dtype)
            mask = packed_causal_mask(position_ids, self.config.sliding_window)
        elif isinstance(cache, SlotKVCache):  # each row continues its own sequence
            if slots is None:
                raise ValueError("a SlotKVCache forward needs slots= (the cache slot of each row)")
            cos, sin = self.rotary.cos_sin_at(cache.begin(slots, t), x.dtype)
        else:
            if cache is not None and start is None:
                start = cache.length
            start = start or 0
            cos, sin = self.rotary.cos_sin(start, t, x.device, x.dtype)
        x, moe = self.run_layers(x, cos, sin, cache, start, balance, mask=mask)
        if isinstance(cache, SlotKVCache):
            cache.finish()
        elif cache is not None:
            cache.length = start + t
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at][:, None]
        elif last_only:
            x = x[:, -1:]
        logits = self.head(x)
        loss = self.loss_function(logits, labels) if labels is not None else None
        out = CausalLMOutput(logits=logits, loss=loss)
        if moe:
            out.aux_loss = torch.stack([m.aux for m in moe.values()]).sum()
            out.moe_stats = {i: m.stats for i, m in moe.items()}
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (a part without the embedding: its input, hidden states)."""
        embed = self.model.embed_tokens
        return embed(input_ids) if embed is not None else input_ids

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (a part without them: ``x`` unchanged)."""
        if self.lm_head is None:
            return x
        return self.lm_head(self.model.norm(x))

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: KVCache | SlotKVCache | None = None, start: int | None = 0,
                   balance: MoEBalance | None = None, layer_ids: Iterable[int] | None = None,
                   mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[int, MoEOutput]]:
        """The decoder layers (``layer_ids``: a subset of those held, in order), with
        activation checkpointing for layers marked ``recompute`` in training; returns the
        hidden states and the MoE layers' training outputs by layer index. (A recomputed
        layer's outputs are discarded by checkpointing, so they are counted once.)"""
        recompute = self.training and torch.is_grad_enabled()
        layers = (self.model.layers if layer_ids is None
                  else [self.model.layers[i] for i in layer_ids])
        moe: dict[int, MoEOutput] = {}
        for layer in layers:
            if recompute and layer.recompute:
                x, out = checkpoint(layer, x, cos, sin, cache, start, balance, mask,
                                    use_reentrant=False)
            else:
                x, out = layer(x, cos, sin, cache, start, balance, mask)
            if out is not None:
                moe[layer.layer_idx] = out
        return x, moe


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

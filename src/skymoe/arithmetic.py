"""Model arithmetic from the config alone: the one source of parameter counts, per-rank shard
sizes under a parallel layout, forward FLOPs and weight bytes.

Pure functions over a ``SkyworkMoeConfig`` (and, for shards, a parallel layout: anything with
``tp``, ``ep``, ``etp`` and ``coords(rank)``, as ``skymoe.parallel.layout.ParallelLayout``).
This module sits at the config level (it imports only the config) so that ``skymoe.config``,
the model, the parallel code and the planners can all use it.

The sharding follows ``skymoe.parallel.placement`` (checked against it on meta-device models in
``tests/test_arithmetic.py``):

- attention: KV heads split over TP ranks, the first ``kv_heads % tp`` ranks one extra, each
  rank taking the query heads of its KV heads; q/o of its query heads, k/v of its KV heads;
- dense MLP: gate/up/down over this rank's part of the intermediate size (the same split);
- experts: ``E / ep`` whole experts per EP rank, each cut along the intermediate size over ETP;
- embedding and LM head: this rank's rows of the vocabulary padded to ``vocab_multiple``;
- norms and routers: replicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .config import SkyworkMoeConfig


class _Layout(Protocol):
    tp: int
    ep: int
    etp: int

    def coords(self, rank: int): ...


def _part(total: int, parts: int, index: int) -> int:
    """Size of part ``index`` of ``total`` over ``parts`` (the first ``total % parts`` parts one
    extra): ``skymoe.parallel.layout.split_sizes``'s rule, restated here to stay below it."""
    base, extra = divmod(total, parts)
    return base + (1 if index < extra else 0)


def padded(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def router_params(config: SkyworkMoeConfig) -> int:
    """Parameters of one MoE layer's router: ``h x E``, or with the two-layer gate
    ``h x 8E + 8E x E``."""
    h, e = config.hidden_size, config.num_experts
    return (h * 8 * e + 8 * e * e) if config.moe_2layer_gate else h * e


@dataclass(frozen=True)
class LayerShard:
    """One decoder layer's parameters held by one rank (element counts; with no layout, the
    whole layer). ``q_heads`` / ``kv_heads``: its attention heads; ``ffn``: its part of a dense
    MLP's intermediate size (0 on MoE layers); ``experts``: its experts (0 on dense layers),
    each of ``expert_params`` elements (``expert_ffn`` of the intermediate size)."""

    moe: bool
    q_heads: int
    kv_heads: int
    attention: int       # q, k, v and o projections
    norms: int           # the two RMSNorms
    router: int
    ffn: int
    mlp: int             # gate, up and down projections of a dense layer
    experts: int
    expert_ffn: int
    expert_params: int   # one expert: w1, w3 and w2

    @property
    def expert_total(self) -> int:
        """Elements of all of its experts."""
        return self.experts * self.expert_params

    @property
    def dense(self) -> int:
        """Elements outside the experts (replicated over data parallelism like dense ones)."""
        return self.attention + self.norms + self.router + self.mlp

    @property
    def total(self) -> int:
        return self.dense + self.expert_total


@dataclass(frozen=True)
class RankShard:
    """Everything one rank holds of the whole model (element counts): its part of every
    decoder layer, ``vocab_rows`` rows of the embedding and of the LM head (one matrix when
    they are ``tied``), and the final norm."""

    layers: tuple[LayerShard, ...]
    hidden: int
    vocab_rows: int
    tied: bool

    @property
    def embedding(self) -> int:
        return self.vocab_rows * self.hidden

    @property
    def lm_head(self) -> int:
        """The LM head's elements (the embedding's own when tied)."""
        return self.vocab_rows * self.hidden

    @property
    def final_norm(self) -> int:
        return self.hidden

    @property
    def dense(self) -> int:
        """Non-expert elements of the model held once (a tied LM head is the embedding)."""
        return (sum(layer.dense for layer in self.layers) + self.embedding + self.final_norm
                + (0 if self.tied else self.lm_head))

    @property
    def expert(self) -> int:
        return sum(layer.expert_total for layer in self.layers)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def layer_shard(config: SkyworkMoeConfig, layer: int, tp: int = 1, tp_rank: int = 0,
                ep: int = 1, etp: int = 1, etp_rank: int = 0) -> LayerShard:
    """Decoder layer ``layer``'s parameters on the rank at TP position ``tp_rank`` of ``tp``
    and ETP position ``etp_rank`` of ``etp``, with experts over ``ep`` ranks (each holds the
    same number)."""
    c = config
    h, hd = c.hidden_size, c.head_size
    kv = _part(c.num_key_value_heads, tp, tp_rank)
    q = kv * (c.num_attention_heads // c.num_key_value_heads)
    moe = c.is_moe_layer(layer)
    ffn = 0 if moe else _part(c.intermediate_size, tp, tp_rank)
    expert_ffn = _part(c.intermediate_size, etp, etp_rank) if moe else 0
    return LayerShard(
        moe=moe, q_heads=q, kv_heads=kv, attention=2 * h * hd * (q + kv), norms=2 * h,
        router=router_params(c) if moe else 0, ffn=ffn, mlp=3 * h * ffn,
        experts=c.num_experts // ep if moe else 0, expert_ffn=expert_ffn,
        expert_params=3 * h * expert_ffn)


def rank_shard(config: SkyworkMoeConfig, layout: _Layout | None = None, rank: int = 0,
               vocab_multiple: int = 1) -> RankShard:
    """What global ``rank`` holds under ``layout`` (None: one rank holds everything), every
    decoder layer included (a pipeline stage holds a contiguous part of ``layers``); the
    vocabulary padded to a multiple of ``vocab_multiple`` before it is split."""
    c = config
    tp = ep = etp = 1
    t = et = 0
    if layout is not None:
        coords = layout.coords(rank)
        tp, ep, etp = layout.tp, layout.ep, layout.etp
        t, et = coords.tp, coords.etp
    layers = tuple(layer_shard(c, i, tp, t, ep, etp, et) for i in range(c.num_hidden_layers))
    return RankShard(layers, c.hidden_size, _part(padded(c.vocab_size, vocab_multiple), tp, t),
                     c.tie_word_embeddings)


def parameter_counts(config: SkyworkMoeConfig) -> dict[str, int]:
    """Parameter counts: ``total``, ``embedding`` (input embedding + untied LM head),
    ``active`` (parameters one token passes through: attention, norms, router, ``top_k``
    experts or the dense MLP, plus embeddings) and ``active_non_embedding``."""
    whole = rank_shard(config)
    embedding = whole.embedding + (0 if whole.tied else whole.lm_head)
    active = whole.final_norm + sum(
        layer.dense + (config.num_experts_per_tok * layer.expert_params if layer.moe else 0)
        for layer in whole.layers)
    return {"total": whole.total, "embedding": embedding, "active_non_embedding": active,
            "active": active + embedding}


def layer_forward_flops(config: SkyworkMoeConfig, layer: LayerShard, tokens: int,
                        seq_len: int, expert_rows: int) -> int:
    """Forward matmul FLOPs (2 per multiply-add) of ``layer`` (a rank's shard of it) for
    ``tokens`` tokens of ``seq_len``-token sequences: attention projections, causal scores and
    values (half of the keys: 2 x 2 x heads x head size x seq_len / 2 per token), router and
    dense MLP for every token; ``expert_rows`` (token, expert) rows through one expert each."""
    scores = 2 * tokens * layer.q_heads * config.head_size * seq_len
    return (2 * tokens * (layer.attention + layer.router + layer.mlp) + scores
            + 2 * expert_rows * layer.expert_params)


def head_forward_flops(shard: RankShard, tokens: int) -> int:
    """Forward FLOPs of the LM head (its rows of the vocabulary) for ``tokens`` tokens."""
    return 2 * tokens * shard.lm_head


def flops_per_token(config: SkyworkMoeConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token (2 per multiply-add), attention scores included: each
    token through ``top_k`` experts of an MoE layer."""
    whole = rank_shard(config)
    k = config.num_experts_per_tok
    layers = sum(layer_forward_flops(config, layer, 1, seq_len, k if layer.moe else 0)
                 for layer in whole.layers)
    return float(layers + head_forward_flops(whole, 1))


def rank_weight_bytes(shard: RankShard, matmul_bytes: float, other_bytes: float = 2,
                      scale_bytes: float = 0) -> float:
    """Bytes of a rank's weights: attention, dense-MLP and expert projections at
    ``matmul_bytes`` per value plus ``scale_bytes`` per projection (a quantized tensor's scale:
    q, k, v, o; gate, up, down; w1, w3, w2 of each expert); router, norms, embedding and LM
    head at ``other_bytes``."""
    total = 0
    for layer in shard.layers:
        total += (layer.attention + layer.mlp + layer.expert_total) * matmul_bytes
        total += (4 + (0 if layer.moe else 3) + 3 * layer.experts) * scale_bytes
        total += (layer.norms + layer.router) * other_bytes
    lm_head = 0 if shard.tied else shard.lm_head
    return total + (shard.embedding + lm_head + shard.final_norm) * other_bytes

"""``parallelize(model, mesh)``: shard a full model in place for this rank's place in the mesh.

Applied from outside, after construction (torchtitan's habit): parameters are cut to this
rank's placement (``skymoe.parallel.placement``), attention and dense MLPs get Megatron's
column/row-parallel hooks, the embedding and the loss become vocabulary-parallel, and each MoE
block's experts get an all-to-all dispatcher (``ExpertParallel``). The model code itself does
not change.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SkyworkMoeConfig
from ..errors import ConfigError
from ..model.moe import MoEBlock
from ..model.transformer import CausalLMOutput, DenseMLP, SkyworkForCausalLM
from .comm import CollectiveOrder, CommGroup, copy_to, gather_rows, reduce_from, single
from .experts import ExpertParallel
from .layout import split_sizes
from .mesh import ParallelMesh
from .placement import Placement, attention_heads, padded_vocab, placement, vocab_rows
from .vocab import VocabParallelEmbedding, VocabParallelLoss


def parameter_placements(model: SkyworkForCausalLM, mesh: ParallelMesh,
                         vocab_multiple: int = 1) -> dict[str, Placement]:
    """The placement of every parameter (and FP8 buffer) name of the full ``model`` on this
    rank."""
    return {name: placement(name, model.config, mesh.layout, mesh.coords, vocab_multiple)
            for name, _ in [*model.named_parameters(remove_duplicate=False),
                            *model.named_buffers()]}


def _shard_tensors(model: nn.Module, placements: dict[str, Placement]) -> None:
    """Replace each parameter and buffer by this rank's part (tied parameters stay tied)."""
    replaced: dict[int, torch.Tensor] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if id(p) not in replaced:
            part = placements[name]
            replaced[id(p)] = p if part.is_whole else nn.Parameter(
                part.take(p.detach()).contiguous(), requires_grad=p.requires_grad)
        setattr(module, attr, replaced[id(p)])
    for name, b in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        part = placements[name]
        if not part.is_whole:
            model.get_submodule(module_name).register_buffer(attr, part.take(b).contiguous())


def _gather_vocab(logits: torch.Tensor, sizes: list[int], vocab_size: int,
                  group: CommGroup) -> torch.Tensor:
    """Full-vocabulary logits from every rank's shard (last dimension), padding dropped."""
    full = gather_rows(logits.movedim(-1, 0).contiguous(), sizes, group).movedim(0, -1)
    return full[..., :vocab_size]


def _column_row_parallel(module: nn.Module, group: CommGroup) -> None:
    """Input enters the group (gradient all-reduced), output is summed over it."""
    module.register_forward_pre_hook(lambda _, args: (copy_to(args[0], group), *args[1:]))
    module.register_forward_hook(lambda _, __, out: reduce_from(out, group))


def parallelize(model: SkyworkForCausalLM, mesh: ParallelMesh,
                a2a_chunks: int = 1, gather_logits: bool = False,
                vocab_multiple: int = 1) -> nn.Module:
    """Shard ``model`` (a full model, identical on every rank, or with pipeline parallelism
    the part of it this rank's ``PipelineStages`` hold) for ``mesh`` in place; ``a2a_chunks > 1`` overlaps the
    expert all-to-all with expert compute. With ``gather_logits`` (inference) the output
    logits are gathered to the full vocabulary on every rank; otherwise they stay
    vocabulary-sharded and the loss is vocabulary-parallel. ``vocab_multiple`` (inference
    only) pads the vocabulary to that multiple before splitting it, so every TP rank holds the
    same number of embedding and LM-head rows (Skywork deploys with 24)."""
    layout, config = mesh.layout, model.config
    layout.validate(config=config)
    if vocab_multiple < 1 or (vocab_multiple > 1 and not gather_logits):
        raise ConfigError("vocab_multiple must be >= 1, and padding the vocabulary needs "
                          "gather_logits (inference): the vocabulary-parallel loss does not "
                          "mask padding rows")
    if layout.world_size == 1:
        return model
    whole = (model.model.embed_tokens is not None and model.lm_head is not None
             and len(model.model.layers) == config.num_hidden_layers)
    if layout.pp > 1 and whole:
        raise ConfigError(f"layout {layout.name}: with pipeline parallelism parallelize the "
                          "model part of this rank's PipelineStages, not the whole model")
    _shard_tensors(model, parameter_placements(model, mesh, vocab_multiple))
    tp = mesh.tp
    if tp.active:
        _vocab_parallel(model, config, tp, gather_logits, vocab_multiple)
        q_heads, kv_heads = attention_heads(config, tp.size, tp.rank)
    token_group = tp if layout.slices_tokens else single(mesh.traffic, order=mesh.order)
    for layer in model.model.layers:
        if tp.active:
            layer.self_attn.heads, layer.self_attn.kv_heads = len(q_heads), len(kv_heads)
            _column_row_parallel(layer.self_attn, tp)
        ffn = layer.ffn
        if isinstance(ffn, DenseMLP) and tp.active:
            _column_row_parallel(ffn, tp)
        elif isinstance(ffn, MoEBlock) and (layout.ep > 1 or layout.etp > 1 or tp.active):
            ffn.experts.parallel = ExpertParallel(ffn.num_experts, mesh.ep, mesh.etp,
                                                  token_group, a2a_chunks)
    _order_collectives(model, mesh.order, whole_forward=layout.pp == 1)
    return model


def _order_collectives(model: SkyworkForCausalLM, order: CollectiveOrder,
                       whole_forward: bool) -> None:
    """Chain the backward collectives of every training forward (``CollectiveOrder``): each
    forward begins a chain and attaches its end to the loss (a pipeline stage: to its
    output, see ``StageChunk``), and each decoder layer's output is a recompute point, so a
    recomputed layer re-issues its forward collectives at the same place of the backward on
    every rank."""
    for layer in model.model.layers:
        layer.register_forward_hook(
            lambda _, __, out: (order.recompute_point(out[0]), *out[1:]))
    if not whole_forward:  # the pipeline's stages begin and finish their own chains
        return
    model.register_forward_pre_hook(lambda m, _: order.begin(m.device))

    def finish(_: nn.Module, __: tuple, out: CausalLMOutput) -> CausalLMOutput:
        if out.loss is not None:
            out.loss = order.finish(out.loss)
        else:
            out.logits = order.finish(out.logits)
        return out

    model.register_forward_hook(finish)


def _vocab_parallel(model: nn.Module, config: SkyworkMoeConfig, tp: CommGroup,
                    gather_logits: bool, vocab_multiple: int) -> None:
    """Embedding rows and LM-head rows split over TP (where this model or stage has them);
    the loss becomes vocabulary-parallel unless the logits are gathered."""
    vocab_start = vocab_rows(config.vocab_size, tp.size, tp.rank, vocab_multiple)[0]
    if model.model.embed_tokens is not None:
        embed = model.model.embed_tokens
        model.model.embed_tokens = VocabParallelEmbedding(embed.weight, vocab_start, tp)
    if model.lm_head is None:
        return
    model.lm_head.register_forward_pre_hook(lambda _, args: (copy_to(args[0], tp),))
    if gather_logits:
        sizes = split_sizes(padded_vocab(config.vocab_size, vocab_multiple), tp.size)
        model.lm_head.register_forward_hook(
            lambda _, __, out: _gather_vocab(out, sizes, config.vocab_size, tp))
    else:
        model.loss_function = VocabParallelLoss(vocab_start, tp)

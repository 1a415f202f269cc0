"""``parallelize(model, mesh)``: shard a full model in place for this rank's place in the mesh.

Applied from outside, after construction (torchtitan's habit): parameters are cut to this
rank's placement (``skymoe.parallel.placement``), attention and dense MLPs get Megatron's
column/row-parallel hooks, the embedding and the loss become vocabulary-parallel, and each MoE
block's experts are replaced by ``ParallelExperts``. The model code itself does not change.
"""

from __future__ import annotations

from torch import nn

from ..model.moe import MoEBlock
from ..model.transformer import DenseMLP, SkyworkForCausalLM
from .comm import CommGroup, copy_to, reduce_from, single
from .experts import ParallelExperts
from .layout import split_range
from .mesh import ParallelMesh
from .placement import Placement, attention_heads, placement
from .vocab import VocabParallelEmbedding, VocabParallelLoss


def parameter_placements(model: SkyworkForCausalLM, mesh: ParallelMesh) -> dict[str, Placement]:
    """The placement of every parameter name of the full ``model`` on this rank."""
    return {name: placement(name, model.config, mesh.layout, mesh.coords)
            for name, _ in model.named_parameters(remove_duplicate=False)}


def _shard_parameters(model: nn.Module, placements: dict[str, Placement]) -> None:
    """Replace each parameter by this rank's part (tied parameters stay tied)."""
    replaced: dict[int, nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if id(p) not in replaced:
            part = placements[name]
            replaced[id(p)] = p if part.is_whole else nn.Parameter(
                part.take(p.detach()).contiguous(), requires_grad=p.requires_grad)
        setattr(module, attr, replaced[id(p)])


def _column_row_parallel(module: nn.Module, group: CommGroup) -> None:
    """Input enters the group (gradient all-reduced), output is summed over it."""
    module.register_forward_pre_hook(lambda _, args: (copy_to(args[0], group), *args[1:]))
    module.register_forward_hook(lambda _, __, out: reduce_from(out, group))


def parallelize(model: SkyworkForCausalLM, mesh: ParallelMesh,
                a2a_chunks: int = 1) -> SkyworkForCausalLM:
    """Shard ``model`` (a full model, identical on every rank) for ``mesh`` in place;
    ``a2a_chunks > 1`` overlaps the expert all-to-all with expert compute."""
    layout, coords, config = mesh.layout, mesh.coords, model.config
    layout.validate(config=config)
    if layout.world_size == 1:
        return model
    if layout.pp > 1:
        raise NotImplementedError("pipeline parallelism is applied by skymoe.parallel.pipeline")
    _shard_parameters(model, parameter_placements(model, mesh))
    tp = mesh.tp
    if tp.active:
        vocab_start = split_range(config.vocab_size, tp.size, tp.rank)[0]
        embed = model.model.embed_tokens
        model.model.embed_tokens = VocabParallelEmbedding(embed.weight, vocab_start, tp)
        model.lm_head.register_forward_pre_hook(lambda _, args: (copy_to(args[0], tp),))
        model.loss_function = VocabParallelLoss(vocab_start, tp)
        q_heads, kv_heads = attention_heads(config, tp.size, tp.rank)
    token_group = tp if layout.slices_tokens else single(mesh.traffic)
    for layer in model.model.layers:
        if tp.active:
            layer.self_attn.heads, layer.self_attn.kv_heads = len(q_heads), len(kv_heads)
            _column_row_parallel(layer.self_attn, tp)
        ffn = layer.ffn
        if isinstance(ffn, DenseMLP) and tp.active:
            _column_row_parallel(ffn, tp)
        elif isinstance(ffn, MoEBlock) and (layout.ep > 1 or layout.etp > 1 or tp.active):
            ffn.experts = ParallelExperts(ffn.experts.w13, ffn.experts.w2, ffn.num_experts,
                                          mesh.ep, mesh.etp, token_group, a2a_chunks)
    return model

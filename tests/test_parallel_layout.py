"""Layouts, placements and the traffic formulas, checked by hand (no processes)."""

from __future__ import annotations

import pytest
import torch

from skymoe.config import SkyworkMoeConfig, resolve_config
from skymoe.errors import ConfigError
from skymoe.parallel.comm import collective_bytes
from skymoe.parallel.experts import source_to_expert_order
from skymoe.parallel.layout import ParallelLayout, parse_layout, split_sizes
from skymoe.parallel.placement import attention_heads, padded_vocab, placement


def test_split_sizes_give_the_first_ranks_one_extra():
    assert split_sizes(36, 8) == [5, 5, 5, 5, 4, 4, 4, 4]
    assert split_sizes(61, 4) == [16, 15, 15, 15]
    assert split_sizes(4, 4) == [1, 1, 1, 1]


def test_expert_mesh_coordinates_of_the_three_layouts():
    # EDP: the EP group is the TP group (same DP index, EP index = TP index).
    edp = ParallelLayout(dp=2, tp=2, ep=2)
    assert [(c.dp, c.tp, c.edp, c.ep) for c in map(edp.coords, range(4))] == \
        [(0, 0, 0, 0), (0, 1, 0, 1), (1, 0, 1, 0), (1, 1, 1, 1)]
    assert edp.name == "dp2-tp2 EDP(ep2)"
    # ETP: EP over DP ranks with the same TP index; the ETP index is the TP index.
    etp = ParallelLayout(dp=2, tp=2, ep=2, etp=2)
    assert [(c.ep, c.etp) for c in map(etp.coords, range(4))] == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert etp.edp == 1 and not etp.slices_tokens
    # Megatron EP over all four ranks.
    assert [ParallelLayout(dp=2, tp=2, ep=4).coords(r).ep for r in range(4)] == [0, 1, 2, 3]


def test_presets():
    assert parse_layout({"dp": 2, "tp": 4, "expert": "edp"}) == ParallelLayout(2, 4, ep=4)
    assert parse_layout({"dp": 2, "tp": 4, "expert": "etp"}) == ParallelLayout(2, 4, ep=2, etp=4)
    with pytest.raises(ConfigError, match="parallel.expert"):
        parse_layout({"expert": "zero"})
    with pytest.raises(ConfigError, match="unknown parallel setting"):
        parse_layout({"cp": 2})


@pytest.mark.parametrize("layout, world, message", [
    (ParallelLayout(dp=2, tp=2), 2, "needs pp\\*dp\\*tp = 1\\*2\\*2 = 4 processes but 2"),
    (ParallelLayout(tp=2, etp=3), 2, "etp must be 1 or equal to parallel.tp"),
    (ParallelLayout(dp=2, ep=3), 2, "must divide the 2 ranks"),
    (ParallelLayout(dp=0), None, "parallel.dp must be >= 1"),
])
def test_bad_layouts_name_the_setting(layout, world, message):
    with pytest.raises(ConfigError, match=message):
        layout.validate(world_size=world)


def test_layout_against_the_model():
    config = resolve_config("tiny")  # 8 experts, 4 KV heads
    with pytest.raises(ConfigError, match="parallel.ep = 3 must divide num_experts = 8"):
        ParallelLayout(dp=3, ep=3).validate(config=config)
    with pytest.raises(ConfigError, match="exceeds num_key_value_heads"):
        ParallelLayout(tp=config.num_key_value_heads + 1).validate(config=config)


def test_skywork_heads_split_five_five_five_five_four_four_four_four():
    real = resolve_config("skywork-moe-base")  # 36 heads, MHA
    assert [len(attention_heads(real, 8, r)[0]) for r in range(8)] == [5, 5, 5, 5, 4, 4, 4, 4]


def test_placements_cover_every_element_exactly_once():
    config = SkyworkMoeConfig(vocab_size=61, hidden_size=48, intermediate_size=22,
                              num_hidden_layers=2, num_attention_heads=6,
                              num_key_value_heads=3, num_experts=4, num_experts_per_tok=2,
                              torch_dtype="float32")
    layout = ParallelLayout(dp=2, tp=2, ep=2, etp=2)
    for name, shape in [("model.layers.0.self_attn.q_proj.weight", (48, 48)),
                        ("model.layers.0.self_attn.k_proj.weight", (24, 48)),
                        ("model.layers.0.self_attn.o_proj.weight", (48, 48)),
                        ("model.embed_tokens.weight", (61, 48)),
                        ("model.layers.1.block_sparse_moe.experts.w13", (4, 44, 48)),
                        ("model.layers.1.block_sparse_moe.experts.w2", (4, 48, 22))]:
        full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
        count = torch.zeros(shape)
        for rank in range(layout.world_size):
            coords = layout.coords(rank)
            if coords.dp != 0 and not name.endswith(("w13", "w2")):
                continue  # dense replicas over DP hold copies
            part = placement(name, config, layout, coords)
            piece = part.take(full)
            back = torch.zeros(shape)
            part.put(back, piece)
            assert torch.equal(back[back != 0], full[back != 0]), name
            part.put(count, torch.ones_like(piece) + part.take(count))
        assert torch.equal(count, torch.ones(shape)), name
    # ETP: w13 keeps the w1 rows and the w3 rows of this rank's slice of the intermediate size.
    part = placement("model.layers.0.block_sparse_moe.experts.w13", config, layout,
                     layout.coords(1))
    assert part.index[1].tolist() == list(range(11, 22)) + list(range(33, 44))


def test_regrouping_received_rows_by_expert():
    # 2 sources x 2 experts: source 0 sends 1 row to e0 and 2 to e1; source 1 sends 3 and 0.
    counts = torch.tensor([[1, 2], [3, 0]])
    # received rows: s0e0 (0), s0e1 (1, 2), s1e0 (3, 4, 5)  ->  e0: 0, 3, 4, 5; e1: 1, 2
    assert source_to_expert_order(counts).tolist() == [0, 3, 4, 5, 1, 2]


def test_ring_formulas():
    assert collective_bytes("all_reduce", 100, 4) == 150
    assert collective_bytes("all_gather", 100, 4) == 300
    assert collective_bytes("reduce", 100, 4) == 75
    assert collective_bytes("all_to_all", 100, 4) == 100
    assert collective_bytes("all_reduce", 100, 1) == 0


def test_padded_vocabulary_gives_equal_shards_and_round_trips():
    config = SkyworkMoeConfig(vocab_size=61, hidden_size=8, intermediate_size=8,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                              num_experts=2, num_experts_per_tok=1, torch_dtype="float32")
    real = resolve_config("skywork-moe-base")
    assert padded_vocab(real.vocab_size) % 8 == 0 and padded_vocab(real.vocab_size) >= 65532
    full = torch.randn(61, 8)
    for tp in (2, 3, 4, 8):
        layout = ParallelLayout(tp=tp)
        back = torch.zeros(61, 8)
        for rank in range(tp):
            part = placement("lm_head.weight", config, layout, layout.coords(rank),
                             vocab_multiple=24)
            piece = part.take(full)
            assert piece.shape == (72 // tp, 8)  # 61 padded to 72, split evenly
            first = rank * 72 // tp
            real_rows = max(0, min(61 - first, 72 // tp))
            assert torch.equal(piece[:real_rows], full[first:first + real_rows])
            assert not piece[real_rows:].any()  # padding rows are zeros
            part.put(back, piece)
        assert torch.equal(back, full)

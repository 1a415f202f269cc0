"""Sequences at different lengths decoding together in one batch (the basis of continuous
batching) give exactly what each gives alone."""

from __future__ import annotations

import pytest
import torch

from skymoe.config import SkyworkMoeConfig
from skymoe.infer.generate import generate
from skymoe.model.transformer import build_model


def _model(sliding_window=None):
    config = SkyworkMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                              sliding_window=sliding_window, torch_dtype="float32")
    return build_model(config, seed=0, dtype=torch.float32).eval()


def _prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(64, (n,), generator=gen) for n in (5, 9, 3, 7)]


@pytest.mark.parametrize("window", [None, 6])
@torch.no_grad()
def test_ragged_batch_decoding_matches_each_sequence_alone(window):
    model = _model(window)
    prompts = _prompts()
    steps = 8
    alone = [generate(model, p[None], steps)[0] for p in prompts]

    cache = model.new_slot_cache(slots=6, max_len=32)
    slot_of = [4, 0, 2]  # the first three requests, in scattered slots
    nxt = {}
    for i, slot in enumerate(slot_of):  # prefill one request at a time
        logits = model(prompts[i][None], cache=cache, slots=torch.tensor([slot])).logits
        nxt[i] = logits[0, -1].argmax()
    produced = {i: [int(nxt[i])] for i in nxt}
    for step in range(steps - 1):
        if step == 3:  # request 1 leaves early; request 3 joins in its slot
            cache.release(slot_of[1])
            del produced[1]
            slot_of[1] = None
            logits = model(prompts[3][None], cache=cache, slots=torch.tensor([0])).logits
            produced[3] = [int(logits[0, -1].argmax())]
            slot_of.append(0)
        active = [i for i in produced if len(produced[i]) < steps]
        slots = torch.tensor([slot_of[i] for i in active])
        ids = torch.tensor([[produced[i][-1]] for i in active])
        logits = model(ids, cache=cache, slots=slots).logits[:, -1]
        for row, i in enumerate(active):
            produced[i].append(int(logits[row].argmax()))
    assert produced[0] == alone[0].tolist()
    assert produced[2] == alone[2].tolist()
    assert produced[3] == alone[3][:len(produced[3])].tolist()
    assert len(produced[3]) >= 4


def test_slot_cache_refuses_to_overflow():
    model = _model()
    cache = model.new_slot_cache(slots=2, max_len=4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache, slots=torch.tensor([1]))

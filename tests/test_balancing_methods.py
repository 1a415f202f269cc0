"""The balancing methods beside Skywork's: auxiliary-loss-free routing biases (the update rule,
the routing, checkpoints, resume and native decode) and the global-batch balance loss (by
hand, and the same gradients however a batch is split into micro-batches). The data-parallel
and pipeline splits of the global loss are checked against one process in
``test_layout_fuzz.py``."""

from __future__ import annotations

import json

import pytest
import torch

from skymoe.checkpoint import load_model
from skymoe.model import balance
from skymoe.model.moe import route
from skymoe.train import config as train_config
from skymoe.train.trainer import Trainer

from test_train import _config


def test_bias_update_by_hand():
    # Mean load 20: expert 0 is under it (+rate), expert 1 over it (-rate), experts 2 and 3
    # exactly at it (no move); then every bias is shifted by the mean of the moved ones.
    bias = torch.tensor([0.10, -0.20, 0.0, 0.05])
    load = torch.tensor([10.0, 30.0, 20.0, 20.0])
    moved = [0.11, -0.21, 0.0, 0.05]
    shift = sum(moved) / 4  # -0.0125
    got = balance.updated_expert_bias(bias, load, rate=0.01)
    torch.testing.assert_close(got, torch.tensor([b - shift for b in moved]))
    assert abs(float(got.sum())) < 1e-7


def test_bias_controller_steps_every_layer_and_reports_ranges():
    controller = balance.ExpertBiasController({1: torch.zeros(3), 3: torch.zeros(3)}, rate=0.5)
    controller.step({1: torch.tensor([0.0, 3.0, 3.0]), 3: torch.tensor([2.0, 2.0, 2.0])})
    # Layer 1: +0.5, -0.5, -0.5, centred: +2/3, -1/3, -1/3. Layer 3 is balanced: unchanged.
    torch.testing.assert_close(controller.biases[1], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert controller.ranges() == ([pytest.approx(-1 / 3), 0.0], [pytest.approx(2 / 3), 0.0])


def test_bias_changes_the_choice_not_the_weights():
    probs = torch.tensor([[0.50, 0.30, 0.15, 0.05]])
    logits = probs.log()
    plain = route(logits, 2)
    assert plain.expert_ids_TK.tolist() == [[0, 1]]
    # +0.2 on expert 2 lifts it over expert 1 (0.35 > 0.30) for the choice; the weights stay
    # the chosen experts' own probabilities, renormalized: 0.50 / 0.65 and 0.15 / 0.65.
    biased = route(logits, 2, torch.tensor([0.0, 0.0, 0.2, 0.0]))
    assert biased.expert_ids_TK.tolist() == [[0, 2]]
    torch.testing.assert_close(biased.weights_TK, torch.tensor([[0.50 / 0.65, 0.15 / 0.65]]))
    torch.testing.assert_close(biased.probs_TE, plain.probs_TE)
    # A shift of every bias changes nothing.
    shifted = route(logits, 2, torch.tensor([1.0, 1.0, 1.2, 1.0]))
    assert torch.equal(shifted.expert_ids_TK, biased.expert_ids_TK)


def test_global_loss_by_hand():
    # Probabilities P: mean [0.4, 0.4, 0.2]. The step's loads [3, 1, 0] give f = [3/4, 1/4, 0]
    # (not this forward's own choices): 3 * (0.75 * 0.4 + 0.25 * 0.4) = 1.2.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    got = balance.aux_loss(probs, torch.tensor([[0], [1]]), "global",
                           global_load_E=torch.tensor([3.0, 1.0, 0.0]))
    assert got.item() == pytest.approx(1.2, rel=1e-6)
    got = balance.aux_loss(probs, torch.tensor([[0], [1]]), "global",
                           global_load_E=torch.tensor([0.0, 0.0, 4.0]))
    assert got.item() == pytest.approx(3 * 0.2, rel=1e-6)
    with pytest.raises(ValueError, match="load"):
        balance.aux_loss(probs, torch.tensor([[0], [1]]), "global")


def _gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.accumulate_gradients(trainer.loader.next_batch())
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_global_loss_is_the_same_for_any_micro_batch_split(tmp_path):
    """One 8-sequence batch as 1 or 4 micro-batches: the global-batch loss counts the loads
    over the whole batch, so the gradients agree; the per-micro-batch Switch loss (each
    forward's own counts) does not."""
    grads = {}
    for aux in ("global", "switch"):
        for micro in (8, 2):
            trainer = Trainer(_config(tmp_path, f"{aux}{micro}", train={
                "precision": "fp32", "micro_batch_size": micro}, moe={
                "aux_loss": aux, "aux_coef": 0.5, "routing_group_size": 0,
                "capacity_factor": 0.0}), quiet=True)
            grads[aux, micro] = _gradients(trainer)
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    for name, g in grads["global", 8].items():
        torch.testing.assert_close(grads["global", 2][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.allclose(grads["switch", 2][gate], grads["switch", 8][gate], rtol=1e-3,
                              atol=0)
    # With the whole batch in one forward the two losses are the same loss.
    torch.testing.assert_close(grads["global", 8][gate], grads["switch", 8][gate])


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_bias_training_checkpoints_and_resumes_bit_exact(tmp_path):
    moe = {"expert_bias": True, "bias_update_rate": 0.01, "aux_coef": 0.0, "adaptive": False}
    full = Trainer(_config(tmp_path, "full", moe=moe), quiet=True)
    full.run()
    rows = _train_rows(tmp_path / "full")
    # Step 1 routes with zero biases; each step moves a bias by at most 2 * rate (its own
    # step and the re-centring), and the biases do move.
    assert rows[0]["moe"]["expert_bias_min"] == rows[0]["moe"]["expert_bias_max"] == [0.0] * 2
    for before, after in zip(rows, rows[1:]):
        for key in ("expert_bias_min", "expert_bias_max"):
            for a, b in zip(before["moe"][key], after["moe"][key]):
                assert abs(b - a) <= 2 * 0.01 + 1e-7
    assert max(rows[-1]["moe"]["expert_bias_max"]) > 0
    # The bias changed the routing only: the gate got gradients and the buffer got none.
    blocks = full.model.moe_blocks_by_layer()
    assert all(b.expert_bias.grad is None and b.gate.weight.grad is not None
               for b in blocks.values())

    saved = load_model(full.last_checkpoint, dtype=torch.float32)
    assert saved.config.moe_expert_bias
    for i, block in saved.moe_blocks_by_layer().items():
        torch.testing.assert_close(block.expert_bias, blocks[i].expert_bias, rtol=0, atol=0)
        torch.testing.assert_close(block.expert_bias, full.bias_controller.biases[i],
                                   rtol=0, atol=0)

    half = Trainer(_config(tmp_path, "half", moe=moe, train={"steps": 3, "lr_decay_steps": 6}),
                   quiet=True)
    half.run()
    resumed_cfg = train_config.load(tmp_path / "half" / "config.toml", ["train.steps=6"])
    Trainer(resumed_cfg, resume=True, quiet=True).run()
    def trace(run: str) -> list:  # bit-identical floats, timings aside
        return [(r["step"], r["loss"], r["moe"]["expert_bias_min"], r["moe"]["expert_bias_max"])
                for r in _train_rows(tmp_path / run)]

    assert trace("half") == trace("full")


def test_bias_on_a_model_that_has_none(tmp_path):
    """Starting from a checkpoint without biases (``model.init_from``) adds zero ones."""
    plain = Trainer(_config(tmp_path, "plain", train={"steps": 1}, moe={"expert_bias": False}),
                    quiet=True)
    plain.run()
    assert not load_model(plain.last_checkpoint).config.moe_expert_bias
    cfg = _config(tmp_path, "biased", train={"steps": 2}, moe={"expert_bias": True},
                  model={"init_from": str(plain.last_checkpoint), "overrides": {}})
    biased = Trainer(cfg, quiet=True)
    assert all(torch.equal(b.expert_bias, torch.zeros(4))
               for b in biased.model.moe_blocks_by_layer().values())
    biased.run()
    assert load_model(biased.last_checkpoint).config.moe_expert_bias


def test_config_refuses_bad_balancing_settings():
    with pytest.raises(Exception, match="moe.aux_loss"):
        train_config.from_dict({"moe": {"aux_loss": "gshard"}}).validate()
    with pytest.raises(Exception, match="moe.bias_update_rate"):
        train_config.from_dict({"moe": {"bias_update_rate": -1.0}}).validate()

"""Pipeline planner: the schedule simulation on hand-computable cases, memory per stage,
recompute chosen only when memory forces it, the real Skywork-MoE plan, measured costs on the
tiny config against the byte formulas, and ``skymoe plan pipeline``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from skymoe.cli import main
from skymoe.config import resolve_config
from skymoe.errors import ConfigError
from skymoe.model.transformer import SkyworkForCausalLM, flops_per_token
from skymoe.parallel.pipeline_cost import (DEVICE_PRESETS, GIB, CostProfile, analytical_profile,
                                           measure_profile)
from skymoe.parallel.pipeline_layout import PipelineLayout
from skymoe.parallel.pipeline_planner import (BACKWARD, FORWARD, evaluate_layout, format_plan,
                                              in_flight, plan_pipeline, simulate, stage_order)



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Timed measurements on one core (the CI machine has two); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def profile(layers: int, f: float = 1.0, b: float = 2.0, rc: float = 1.0, act: int = 0,
            ckpt: int = 0, static: int = 0, head_f: float = 0.0, head_b: float = 0.0,
            p2p: float = 0.0, output_bytes: int = 0) -> CostProfile:
    """Identical layers; embedding and head free unless given."""
    return CostProfile(
        layer_forward=[f] * layers, layer_backward=[b] * layers, layer_recompute=[rc] * layers,
        layer_activation=[act] * layers, layer_checkpoint=[ckpt] * layers,
        layer_static=[static] * layers,
        embed_forward=0.0, embed_backward=0.0, embed_activation=0, embed_static=0,
        head_forward=head_f, head_backward=head_b, head_activation=0, head_static=0,
        output_bytes=output_bytes, p2p_time=p2p, source="synthetic")


# ------------------------------------------------------------------------------- simulation
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_one_stage_runs_every_micro_batch_back_to_back(schedule):
    sim = simulate(PipelineLayout((3,)), profile(3), 5, schedule)
    assert sim.step_time == pytest.approx(5 * (3 * 1.0 + 3 * 2.0))
    assert sim.bubble_fraction == pytest.approx(0.0)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("stages,micro_batches", [(4, 8), (3, 3), (2, 7)])
def test_balanced_stages_take_m_plus_p_minus_one_slots(schedule, stages, micro_batches):
    # Each stage: 2 layers, forward 2, backward 4. Fill and drain cost P - 1 slots of f + b.
    sim = simulate(PipelineLayout.uniform(2 * stages, stages), profile(2 * stages),
                   micro_batches, schedule)
    assert sim.step_time == pytest.approx((micro_batches + stages - 1) * 6.0)
    assert sim.bubble_fraction == pytest.approx((stages - 1) / (micro_batches + stages - 1))


def test_gpipe_pays_the_link_twice_per_hop():
    # Forward of the last micro-batch leaves stage P-1 at M f + (P-1)(f + c); the backward
    # wave then takes M b + (P-1)(b + c).
    p, m, c = 3, 4, 0.25
    sim = simulate(PipelineLayout.uniform(p, p), profile(p, p2p=c), m, "gpipe")
    assert sim.step_time == pytest.approx((m + p - 1) * 3.0 + 2 * (p - 1) * c)


def test_1f1b_two_stages_with_a_link_by_hand():
    # f = 1, b = 2, c = 0.5. Stage 0: F0 [0,1], F1 [1,2]; stage 1: F0 [1.5,2.5], B0 [2.5,4.5],
    # F1 (arrived 2.5, stage busy) [4.5,5.5], B1 [5.5,7.5]; stage 0: B0 [5,7], B1 [8,10].
    sim = simulate(PipelineLayout((1, 1)), profile(2, p2p=0.5), 2, "1f1b")
    assert sim.step_time == pytest.approx(10.0)


def test_1f1b_order_is_torch_schedule1f1b():
    # torch's Schedule1F1B._step_microbatches: min(M, P - s) forwards, then backward/forward
    # pairs, then the remaining backwards.
    f, b = FORWARD, BACKWARD
    assert stage_order(3, 5, "1f1b") == (
        ((f, 0), (f, 1), (f, 2), (b, 0), (f, 3), (b, 1), (f, 4), (b, 2), (b, 3), (b, 4)),
        ((f, 0), (f, 1), (b, 0), (f, 2), (b, 1), (f, 3), (b, 2), (f, 4), (b, 3), (b, 4)),
        ((f, 0), (b, 0), (f, 1), (b, 1), (f, 2), (b, 2), (f, 3), (b, 3), (f, 4), (b, 4)),
    )
    assert stage_order(2, 2, "gpipe")[1] == ((f, 0), (f, 1), (b, 0), (b, 1))


def test_micro_batches_in_flight():
    assert in_flight(4, 8, "1f1b") == [4, 3, 2, 1]
    assert in_flight(4, 4, "1f1b") == [4, 3, 2, 1]
    assert in_flight(4, 6, "gpipe") == [6, 6, 6, 6]
    with pytest.raises(ConfigError, match="at least as many micro-batches"):
        in_flight(4, 3, "1f1b")


def test_stage_memory_is_static_plus_in_flight_activations():
    # 6 layers over 3 stages, 1f1b: in flight 3, 2, 1. Per layer 100 bytes kept, 7 static;
    # non-last stages also keep their 5-byte output per micro-batch.
    sim = simulate(PipelineLayout((2, 2, 2)), profile(6, act=100, static=7, output_bytes=5),
                   6, "1f1b")
    assert sim.peak_bytes == [14 + 3 * 205, 14 + 2 * 205, 14 + 1 * 200]


def test_recompute_trades_backward_time_for_memory():
    prof = profile(4, f=1.0, b=2.0, rc=0.75, act=100, ckpt=10)
    plain = simulate(PipelineLayout((4,)), prof, 3, "gpipe")
    sim = simulate(PipelineLayout((4,), (2,)), prof, 3, "gpipe")
    assert sim.stages[0].backward == pytest.approx(plain.stages[0].backward + 2 * 0.75)
    # GPipe holds all 3 micro-batches: two layers keep 10 instead of 100 bytes each; while one
    # of them recomputes, its 90 bytes come back once.
    assert plain.peak_bytes == [3 * 400]
    assert sim.peak_bytes == [3 * (2 * 10 + 2 * 100) + 90]


# ---------------------------------------------------------------------------------- planning
def test_expensive_head_moves_layers_off_the_last_stage():
    # 8 layers of 3 time units, head worth 2 layers: uniform 2,2,2,2 makes the last stage 12
    # units; 30 units over 4 stages with 3-unit layers cannot beat a slowest stage of 9.
    prof = profile(8, head_f=2.0, head_b=4.0)
    plan = plan_pipeline(prof, 4, 8, GIB)
    slowest = max(c.forward + c.backward for c in plan.simulation.stages)
    assert slowest == pytest.approx(9.0)
    assert plan.layout.layers[-1] <= 1
    assert plan.uniform_layout.layers == (2, 2, 2, 2)
    assert plan.simulation.step_time < plan.uniform.step_time
    assert plan.gain > 0.1
    assert plan.layout.recompute == (0, 0, 0, 0)


@pytest.mark.parametrize("memory,recompute", [(2400, (0, 0)), (2399, (1, 0)), (2310, (1, 0)),
                                              (2309, (2, 0))])
def test_recompute_only_when_memory_forces_it(memory, recompute):
    # 4 layers, 2 stages, 1f1b with 4 micro-batches: in flight 2 and 1. Layer: 1000 bytes
    # static, 100 kept (10 when recomputed). Stage 0 with two layers: 2000 + 2 x 200 = 2400;
    # one recomputed: 2000 + 2 x 110 + 90 = 2310; both: 2000 + 2 x 20 + 90 = 2130. Stage 1:
    # 2200. Any other split puts 3 layers (3000 static) on a stage.
    plan = plan_pipeline(profile(4, act=100, ckpt=10, static=1000), 2, 4, memory)
    assert plan.layout.layers == (2, 2)
    assert plan.layout.recompute == recompute
    assert max(plan.simulation.peak_bytes) <= memory


def test_nothing_fits_says_what_to_change():
    with pytest.raises(ConfigError, match=r"needs 2\.08 KiB on stage 0.*more pipeline stages"):
        plan_pipeline(profile(4, act=100, ckpt=10, static=1000), 2, 4, 2129)


def test_given_layout_that_does_not_fit_names_stage_and_bytes():
    prof = profile(4, act=100, ckpt=10, static=1000)
    with pytest.raises(ConfigError, match=r"stage 0 of layers 2,2 needs 2\.34 KiB.*recompute 1"):
        evaluate_layout(PipelineLayout((2, 2)), prof, 4, 2399)
    plan = evaluate_layout(PipelineLayout((2, 2), (1, 0)), prof, 4, 2399)
    assert not plan.planned and plan.gain == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="must sum to 4"):
        evaluate_layout(PipelineLayout((2, 1)), prof, 4, 2399)


# ----------------------------------------------------------------------------- Skywork-MoE
@pytest.fixture(scope="module")
def skywork():
    return resolve_config("skywork-moe-base")


def test_analytical_static_bytes_from_the_model_parameters(skywork):
    # tp 4, ep 4, dp 4 with ZeRO-1: each rank holds 4 of 16 experts and a quarter of the
    # attention; 4 + 4 + 8 / 4 bytes per parameter.
    prof = analytical_profile(skywork, 4096, 1, DEVICE_PRESETS["a800"], tp=4, ep=4, dp=4)
    with torch.device("meta"):
        model = SkyworkForCausalLM(skywork)
    local = 0
    for name, p in model.model.layers[0].named_parameters():
        if "experts" in name:
            local += p.numel() // 4
        elif "self_attn" in name:
            local += p.numel() // 4
        else:  # norms and router, replicated
            local += p.numel()
    assert prof.layer_static[0] == local * 10
    assert 6.4 * GIB < prof.layer_static[0] < 6.6 * GIB  # ~700M parameters per layer and rank
    # Forward FLOPs per layer and head add up to flops_per_token (tp = 1: nothing split).
    one = analytical_profile(skywork, 4096, 1, DEVICE_PRESETS["a800"])
    tokens = 4096
    layer_flops = sum(one.layer_forward) * DEVICE_PRESETS["a800"].sustained_flops
    head_flops = 2 * tokens * skywork.hidden_size * skywork.vocab_size
    assert layer_flops + head_flops == pytest.approx(flops_per_token(skywork, 4096) * tokens)


def test_skywork_plan_on_a800s_beats_uniform_quickly(skywork):
    prof = analytical_profile(skywork, 4096, 1, DEVICE_PRESETS["a800"], tp=4, ep=4, dp=4)
    memory = DEVICE_PRESETS["a800"].usable_memory
    began = time.perf_counter()
    plan = plan_pipeline(prof, 12, 48, memory)
    assert time.perf_counter() - began < 10.0
    assert plan.layout.num_layers == 52
    assert all(peak <= memory for peak in plan.simulation.peak_bytes)
    assert plan.simulation.in_flight[0] == 12
    assert plan.uniform is not None and plan.gain > 0.0
    # Stage 0 holds 12 micro-batches: it must recompute; the last holds one: it need not.
    assert plan.layout.recompute[0] > 0 and plan.layout.recompute[-1] == 0
    text = format_plan(plan)
    assert "predicted gain over uniform" in text and len(text.splitlines()) == 12 + 6


# ---------------------------------------------------------------------------------- measured
def test_measured_tiny_costs_match_the_byte_formulas():
    for name in ("tiny", "tiny-dense"):
        config = resolve_config(name)
        measured = measure_profile(config, 64, 2, repeats=3, warmup=1)
        formula = analytical_profile(config, 64, 2, DEVICE_PRESETS["a800"])
        assert all(t > 0 for t in measured.layer_forward + measured.layer_recompute)
        assert all(b > f for f, b in zip(measured.layer_forward, measured.layer_backward))
        assert measured.head_forward > 0 and measured.embed_backward > 0
        assert measured.layer_checkpoint[0] == 2 * 64 * config.hidden_size * 4  # fp32 input
        assert measured.layer_checkpoint[0] < measured.layer_activation[0] / 10
        assert measured.layer_static == formula.layer_static
        assert (measured.head_activation, measured.embed_activation) == (
            formula.head_activation, formula.embed_activation)
        if config.is_moe:  # capacity drops make the formula (no drops) an upper bound
            ratio = measured.layer_activation[0] / formula.layer_activation[0]
            assert 0.97 < ratio <= 1.0, ratio
        else:
            assert measured.layer_activation == formula.layer_activation


# -------------------------------------------------------------------------------------- CLI
def test_cli_prints_a_measured_plan_for_tiny():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "skymoe", "plan", "pipeline", "tiny", "--stages", "2",
         "--profile", "measured", "--seq-len", "32", "--micro-batch-size", "1",
         "--micro-batches", "4", "--memory", "1GiB", "--repeats", "1"],
        capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "plan: 4 layers over 2 stages, 1f1b, 4 micro-batches per step"
    assert lines[2].split()[:3] == ["stage", "layers", "n"]
    assert len([line for line in lines if line.split()[0] in ("0", "1")]) == 2
    assert lines[-1].startswith('train config: [parallel] pp = 2, pp_layers = "')


def test_cli_bad_layout_is_a_one_line_error(capsys):
    assert main(["plan", "pipeline", "tiny", "--layout", "2,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--layout" in err and "2,x" in err
    assert main(["plan", "pipeline", "tiny", "--layout", "3,3"]) == 2
    assert "must sum to 4" in capsys.readouterr().err
    assert main(["plan", "pipeline", "skywork-moe-base", "--stages", "12", "--tp", "4", "--ep",
                 "4", "--memory", "20GB"]) == 2
    assert "no split of 52 layers" in capsys.readouterr().err
    assert main(["plan", "pipeline", "tiny", "--stages", "2", "--micro-batches", "8",
                 "--memory", "1GiB"]) == 0
    assert "predicted gain over uniform" in capsys.readouterr().out

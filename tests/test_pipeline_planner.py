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
from skymoe.arithmetic import flops_per_token
from skymoe.model.transformer import SkyworkForCausalLM
from skymoe.parallel.pipeline_layout import PipelineLayout
from skymoe.planning.cost import DEVICE_PRESETS, GIB, CostProfile, analytical_profile
from skymoe.planning.measure import measure_profile
from skymoe.planning.orders import BACKWARD, FORWARD, in_flight, rank_order
from skymoe.planning.report import format_plan
from skymoe.planning.search import evaluate_layout, plan_pipeline
from skymoe.planning.simulate import simulate



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
    # pairs, then the remaining backwards. One stage per rank: rank s runs stage s.
    f, b = FORWARD, BACKWARD
    orders = [[(kind, m) for kind, _, m in ops] for ops in rank_order(3, 5, "1f1b")]
    assert orders == [
        [(f, 0), (f, 1), (f, 2), (b, 0), (f, 3), (b, 1), (f, 4), (b, 2), (b, 3), (b, 4)],
        [(f, 0), (f, 1), (b, 0), (f, 2), (b, 1), (f, 3), (b, 2), (f, 4), (b, 3), (b, 4)],
        [(f, 0), (b, 0), (f, 1), (b, 1), (f, 2), (b, 2), (f, 3), (b, 3), (f, 4), (b, 4)],
    ]
    assert all(s == r for r, ops in enumerate(rank_order(3, 5, "1f1b")) for _, s, _ in ops)
    assert rank_order(2, 2, "gpipe")[1] == ((f, 1, 0), (f, 1, 1), (b, 1, 0), (b, 1, 1))


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


# ----------------------------------------------------------------------- interleaved 1F1B
# P = 2 ranks x V = 2 stages, M = 4: rank 0 runs stages 0 and 2, rank 1 stages 1 and 3. The
# order of rank 0 as torch's ScheduleInterleaved1F1B computes it (F/B, stage, micro-batch).
F, B = FORWARD, BACKWARD
RANK0 = ((F, 0, 0), (F, 0, 1), (F, 2, 0), (F, 2, 1), (F, 0, 2), (B, 2, 0), (F, 0, 3), (B, 2, 1),
         (F, 2, 2), (B, 0, 0), (F, 2, 3), (B, 0, 1), (B, 2, 2), (B, 2, 3), (B, 0, 2), (B, 0, 3))


def test_interleaved_order_comes_from_torch():
    orders = rank_order(2, 4, "interleaved-1f1b", 2)
    assert orders[0] == RANK0
    assert sorted(orders[1]) == sorted((k, s, m) for k in (F, B) for s in (1, 3)
                                       for m in range(4))
    assert in_flight(2, 4, "interleaved-1f1b", 2) == [4, 3, 2, 1]


def test_interleaved_two_ranks_by_hand():
    # Every stage: one layer, f = 1, b = 2, no link time. Tracing both ranks' orders (rank 1:
    # 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3), an operation starting
    # when its rank is free and its input has arrived:
    #   rank 0: 0F0 [0,1] 0F1 [1,2] 2F0 [2,3] 2F1 [3,4] 0F2 [4,5] 2B0 [6,8] 0F3 [8,9]
    #           2B1 [9,11] 2F2 [11,12] 0B0 [12,14] 2F3 [14,15] 0B1 [15,17] 2B2 [18,20]
    #           2B3 [21,23] 0B2 [23,25] 0B3 [25,27]
    #   rank 1: 1F0 [1,2] 1F1 [2,3] 3F0 [3,4] 3B0 [4,6] 3F1 [6,7] 3B1 [7,9] 1F2 [9,10]
    #           1B0 [10,12] 1F3 [12,13] 1B1 [13,15] 3F2 [15,16] 3B2 [16,18] 3F3 [18,19]
    #           3B3 [19,21] 1B2 [21,23] 1B3 [23,25]
    # Step 27; each rank computes 2 stages x 4 x 3 = 24, bubble 3/27. The same 4 layers as
    # 1F1B on 2 ranks (f = 2, b = 4 per stage) take (M + P - 1) x 6 = 30.
    sim = simulate(PipelineLayout((1, 1, 1, 1)), profile(4), 4, "interleaved-1f1b", 2)
    assert sim.step_time == pytest.approx(27.0)
    assert sim.bubble_fraction == pytest.approx(3 / 27)
    assert sim.in_flight == (4, 3, 2, 1) and sim.rank_stages(1) == [1, 3]
    assert simulate(PipelineLayout((2, 2)), profile(4), 4, "1f1b").step_time == 30.0


def test_interleaved_rank_memory_is_its_stages_at_their_joint_peak():
    # Layers 1,1,2,0: kept per micro-batch 105, 105, 205 (100 per layer + the 5-byte output
    # sent on), 0 (the last stage, no layers); 7 static bytes per layer. Rank 0 (stages 0, 2)
    # holds at most (3, 2) or (4, 1) micro-batches of them at once (RANK0 after 0F2 / 0F3):
    # max(3 x 105 + 2 x 205, 4 x 105 + 205) = 725, below 4 x 105 + 2 x 205 = 830 were both at
    # their own most. Rank 1 (stages 1, 3): 3 x 105 (after 1F2, stage 3 holds none then).
    sim = simulate(PipelineLayout((1, 1, 2, 0)), profile(4, act=100, static=7, output_bytes=5),
                   4, "interleaved-1f1b", 2)
    assert sim.peak_bytes == [21 + 725, 7 + 315]
    assert [c.activation for c in sim.stages] == [4 * 105, 3 * 105, 2 * 205, 0]


@pytest.mark.parametrize("stages_per_rank,micro_batches,match", [
    (1, 4, "stages per rank must be >= 2"), (2, 5, "divisible by"),
])
def test_interleaved_shape_errors(stages_per_rank, micro_batches, match):
    layout = PipelineLayout.uniform(4, 2 * stages_per_rank)
    with pytest.raises(ConfigError, match=match):
        simulate(layout, profile(4), micro_batches, "interleaved-1f1b", stages_per_rank)
    with pytest.raises(ConfigError, match="one stage per pipeline rank"):
        simulate(PipelineLayout.uniform(4, 4), profile(4), 4, "1f1b", 2)


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


def test_interleaved_plan_fits_each_rank_and_beats_uniform():
    # 8 layers (100 static bytes, 100 kept or 10 recomputed), an expensive head, 2 ranks x 2
    # stages, 1600 bytes per device: the split is planned with 800 per stage, then recompute
    # is given back while the rank's exact peak fits.
    prof = profile(8, act=100, ckpt=10, static=100, head_f=2.0, head_b=4.0, output_bytes=5)
    plan = plan_pipeline(prof, 2, 4, 1600, "interleaved-1f1b", 2)
    sim = plan.simulation
    assert sim.ranks == 2 and len(sim.stages) == 4
    assert all(peak <= 1600 for peak in sim.peak_bytes)
    assert plan.uniform_layout.layers == (2, 2, 2, 2)
    assert sim.step_time < plan.uniform.step_time
    # The exact rank peak let it keep more than memory / V per stage would.
    assert any(sum(sim.stages[s].peak for s in sim.rank_stages(r)) > 1600 for r in range(2))
    # A given layout is checked against the exact rank peak, naming the rank and its stages.
    with pytest.raises(ConfigError, match=r"rank 0 \(stages 0, 2\) of layers 2,3,3,0 needs"):
        evaluate_layout(PipelineLayout((2, 3, 3, 0)), prof, 4, 1600, "interleaved-1f1b", 2)
    again = evaluate_layout(plan.layout, prof, 4, 1600, "interleaved-1f1b", 2)
    assert again.simulation.step_time == sim.step_time


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
    # The formulas describe the PyTorch ops (what runs on GPU), which the measured model runs:
    # it never chose the fused native kernels (which keep fewer bytes).
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
    assert lines[2].split()[:4] == ["stage", "rank", "layers", "n"]
    assert len([line for line in lines if line.split()[:2] in (["0", "0"], ["1", "1"])]) == 2
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


def test_cli_interleaved_needs_stages_per_rank_and_p_times_v_counts(capsys):
    assert main(["plan", "pipeline", "tiny", "--stages", "2", "--schedule",
                 "interleaved-1f1b"]) == 2
    assert "--stages-per-rank 2 or more" in capsys.readouterr().err
    assert main(["plan", "pipeline", "tiny", "--stages", "2", "--stages-per-rank", "2",
                 "--schedule", "interleaved-1f1b", "--layout", "2,2"]) == 2
    assert "needs --stages 2 x --stages-per-rank 2 counts" in capsys.readouterr().err
    assert main(["plan", "pipeline", "tiny", "--stages-per-rank", "2", "--layout", "1,1,1,1"]) == 2
    assert "--stages-per-rank > 1 needs --schedule interleaved-1f1b" in capsys.readouterr().err
    assert main(["plan", "pipeline", "tiny", "--stages-per-rank", "2", "--schedule",
                 "interleaved-1f1b", "--layout", "1,1,1,1", "--micro-batches", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("layout: 4 layers over 2 ranks x 2 stages, interleaved-1f1b, "
                        "4 micro-batches per step")
    assert [line.split()[:2] for line in lines[3:7]] == [["0", "0"], ["1", "1"], ["2", "0"],
                                                         ["3", "1"]]
    assert lines[-1].startswith("train config: [parallel] pp = 2, pp_stages_per_rank = 2, "
                                'pp_layers = "1,1,1,1"')

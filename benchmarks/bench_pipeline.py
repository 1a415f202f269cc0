"""Pipeline parallelism on CPU: the planner's layout vs the uniform split, and the simulator's
predicted step time vs the measured one for several layouts.

The model makes the imbalance matter (docs/pipeline.md): a large vocabulary next to a small
hidden size and few layers, so the last stage's LM head and loss cost several decoder layers.
The cost profile is measured on this machine (``measure_profile``, one thread, as each pipeline
process runs), the planner picks layers and recompute counts per stage, and every layout is
then trained for real: ``torchrun`` starts one gloo process per stage, one thread each (so 2
stages use the 2 cores without oversubscription), running what ``skymoe train`` runs under
``parallel.pp``: the 1F1B schedule of torch.distributed.pipelining, bf16 autocast over fp32
weights, capacity factor 1.0 with the balance loss, clipping and fused AdamW. Layouts are
measured in alternating rounds; medians reported.

Usage: python benchmarks/bench_pipeline.py [--stages 2] [--steps 4] [--rounds 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Vocabulary 32000 over hidden 256: the head + loss cost about six decoder layers.
MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
             moe_use_logits_norm=True, moe_gate_norm_std=1.0, max_position_embeddings=1024,
             torch_dtype="float32")
SEQ_LEN, MICRO_BATCH_SIZE, MICRO_BATCHES = 256, 2, 8


def _config():
    from skymoe.config import SkyworkMoeConfig

    return SkyworkMoeConfig(**MODEL)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from skymoe.kernels import load_kernels
    from skymoe.model.moe import MoEBalance, MoETrainingOptions
    from skymoe.model.transformer import build_model
    from skymoe.parallel.apply import parallelize, parameter_placements
    from skymoe.parallel.data_parallel import DataParallel
    from skymoe.parallel.layout import ParallelLayout
    from skymoe.parallel.mesh import build_mesh, init_distributed
    from skymoe.parallel.pipeline import PipelineStages, build_schedule
    from skymoe.parallel.pipeline_layout import PipelineLayout
    from skymoe.runtime import keep_freed_memory
    from skymoe.train import step as step_ops
    from skymoe.train.metrics import MoEStepStats

    torch.set_num_threads(1)
    keep_freed_memory()
    init_distributed(600.0)
    pipe = PipelineLayout.parse(args.layers, args.recompute)
    mesh = build_mesh(ParallelLayout(pp=pipe.stages))
    config = _config()
    model = build_model(config, seed=0, dtype=torch.float32).train()
    model.use_kernels(load_kernels("cpu"))
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    balance = MoEBalance.for_layers(MoETrainingOptions(capacity_factor=1.0), moe_layers,
                                    [0.001] * len(moe_layers))
    stages = PipelineStages(model, pipe, mesh.coords.pp)
    stage = stages.model
    placements = parameter_placements(stage, mesh)
    numel = {n: p.numel() for n, p in stage.named_parameters()}
    parallelize(stage, mesh)
    dp = DataParallel(stage, mesh, placements, numel, zero=True)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4, fused=True)
    schedule = step_ops.PipelineSteps(build_schedule(
        stages, mesh, MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ_LEN, "1f1b", torch.bfloat16,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    stats = MoEStepStats(moe_layers)
    batch = torch.randint(config.vocab_size, (MICRO_BATCHES * MICRO_BATCH_SIZE, SEQ_LEN),
                          generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        stats.reset()
        step_ops.accumulate_gradients(schedule, batch, balance, dp, stats)
        dp.clip_grad_norm(1.0)
        step_ops.apply_update(optimizer, dp, 1e-4)
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
    if mesh.is_main:
        Path(args.out).write_text(json.dumps({"step_times": times}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(layout, steps: int, warmup: int) -> list[float]:
    """Step times of ``layout`` trained by one single-threaded process per stage."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(layout.stages), "--master-addr", "127.0.0.1", "--master-port",
               str(_free_port()), __file__, "--worker", "--layers",
               ",".join(map(str, layout.layers)), "--recompute",
               ",".join(map(str, layout.recompute)), "--steps", str(steps), "--warmup",
               str(warmup), "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["step_times"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (allocator and kernel caches warm up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    parser.add_argument("--recompute", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from skymoe.parallel.pipeline_layout import PipelineLayout
    from skymoe.planning.measure import measure_profile
    from skymoe.planning.search import plan_pipeline
    from skymoe.planning.simulate import simulate

    torch.set_num_threads(1)  # profile as each pipeline process runs
    config = _config()
    profile = measure_profile(config, SEQ_LEN, MICRO_BATCH_SIZE, precision="bf16")
    plan = plan_pipeline(profile, args.stages, MICRO_BATCHES, 1 << 40)
    uniform = PipelineLayout.uniform(config.num_hidden_layers, args.stages)
    layouts = {"uniform": uniform, "planned": plan.layout}
    # More layouts for the simulator-vs-measured table: the planned split with every layer
    # recomputed, and the uniform split with every layer recomputed.
    layouts["planned, all recomputed"] = PipelineLayout(plan.layout.layers, plan.layout.layers)
    layouts["uniform, all recomputed"] = PipelineLayout(uniform.layers, uniform.layers)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.rounds):  # alternate, so machine drift hits every layout alike
        for name, layout in layouts.items():
            times[name] += measure(layout, args.steps, args.warmup)

    tokens = MICRO_BATCHES * MICRO_BATCH_SIZE * SEQ_LEN
    print(f"model: vocab {config.vocab_size}, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, {config.num_experts} experts top-"
          f"{config.num_experts_per_tok}; {MICRO_BATCHES} micro-batches of {MICRO_BATCH_SIZE} x "
          f"{SEQ_LEN} tokens, 1F1B, {args.stages} stages, one thread per process; "
          f"torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"profile: {profile.source}")
    print(f"{'layout':28} {'layers':>10} {'recompute':>10} {'simulated s':>11} "
          f"{'measured s':>10} {'error':>7} {'tokens/s':>9}")
    results = []
    for name, layout in layouts.items():
        predicted = simulate(layout, profile, MICRO_BATCHES).step_time
        measured = statistics.median(times[name])
        error = predicted / measured - 1.0
        print(f"{name:28} {','.join(map(str, layout.layers)):>10} "
              f"{','.join(map(str, layout.recompute)):>10} {predicted:11.2f} {measured:10.2f} "
              f"{error:+7.1%} {tokens / measured:9.1f}")
        results.append({"name": name, "layers": layout.layers, "recompute": layout.recompute,
                        "simulated_s": predicted, "measured_s": measured,
                        "all_measured_s": times[name], "tokens_per_s": tokens / measured})
    gain = statistics.median(times["uniform"]) / statistics.median(times["planned"])
    print(f"planned vs uniform: {gain:.2f}x measured throughput "
          f"(simulator predicted {1 + plan.gain:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "gain": gain,
                                         "predicted_gain": 1 + plan.gain}, indent=2))


if __name__ == "__main__":
    main()

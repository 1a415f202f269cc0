"""Distributed training step: tokens/s per process and bytes sent per rank, EP vs EDP.

For each layout, ``torchrun`` starts N worker processes (gloo on CPU, the cores split evenly
between them) that train the shared "bench" config on one global batch of 8 x 512 tokens (bf16 autocast over
fp32 master weights, capacity factor 1.0, ZeRO-1 AdamW): forward + backward, gradient
reduction, statistics, clipping, the update and the ZeRO broadcast, exactly the collectives
``skymoe train`` issues. Rank 0 reports the median step time and the bytes it sent per
collective kind, counted by ``skymoe.parallel.comm``; next to them, the prediction of
``skymoe.parallel.traffic`` for the same layout. The last table applies that prediction to
the real Skywork-MoE config.

On a 2-core machine, 2 and 4 processes share the same two cores, so tokens/s per process
falls with the process count by construction; the traffic columns are the portable result.
The peer is one process on all the cores: "vs 1" is the job's total tokens/s over that
process's (1.00 = the same machine as fast split into N processes).

Usage: python benchmarks/bench_parallel.py [--steps 3] [--json F]
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

GLOBAL_BATCH, SEQ_LEN = 8, 512
# (processes, dp, tp, ep, etp, all-to-all chunks, label)
LAYOUTS = [
    (1, 1, 1, 1, 1, 1, "single process"),
    (2, 2, 1, 2, 1, 1, "EP  (ep=dp=2)"),
    (2, 1, 2, 2, 1, 1, "EDP (ep=tp=2)"),
    (2, 1, 2, 2, 1, 4, "EDP (ep=tp=2), a2a in 4 chunks"),
    (4, 2, 2, 4, 1, 1, "EP  (dp2 tp2, ep=4)"),
    (4, 2, 2, 2, 1, 1, "EDP (dp2 tp2, ep=tp=2)"),
    (4, 2, 2, 2, 2, 1, "ETP (dp2 tp2, ep=dp=2, etp=2)"),
]
KINDS = ("all_to_all", "all_reduce", "all_gather", "reduce", "broadcast")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from skymoe.config import resolve_config
    from skymoe.kernels import load_kernels
    from skymoe.model.moe import MoEBalance, MoETrainingOptions
    from skymoe.model.transformer import build_model
    from skymoe.parallel.apply import parallelize, parameter_placements
    from skymoe.parallel.data_parallel import DataParallel
    from skymoe.parallel.layout import ParallelLayout, split_range
    from skymoe.parallel.mesh import build_mesh, init_distributed
    from skymoe.runtime import keep_freed_memory
    from skymoe.train import step as step_ops
    from skymoe.train.metrics import MoEStepStats

    torch.set_num_threads(_threads_per_process(args.procs))
    keep_freed_memory()
    init_distributed(600.0)
    layout = ParallelLayout(dp=args.dp, tp=args.tp, ep=args.ep, etp=args.etp)
    mesh = build_mesh(layout)
    config = resolve_config("bench")
    model = build_model(config, seed=0, dtype=torch.float32).train()
    model.use_kernels(load_kernels("cpu"))
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    balance = MoEBalance.for_layers(MoETrainingOptions(capacity_factor=1.0), moe_layers,
                                    [0.001] * len(moe_layers))
    placements = parameter_placements(model, mesh)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    parallelize(model, mesh, args.chunks)
    dp = DataParallel(model, mesh, placements, numel, zero=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    stats = MoEStepStats(moe_layers)
    batch = torch.randint(config.vocab_size, (GLOBAL_BATCH, SEQ_LEN),
                          generator=torch.Generator().manual_seed(0))
    rows = split_range(GLOBAL_BATCH, layout.dp, mesh.coords.dp)
    local = batch[rows[0]:rows[1]]
    device = torch.device("cpu")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    strategy = step_ops.MicroBatchLoop(model, GLOBAL_BATCH, autocast, device)

    times, traffic, drops = [], {}, []
    for step in range(args.warmup + args.steps):
        mesh.traffic.reset()
        if mesh.world.active:
            dist.barrier()
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        stats.reset()
        step_ops.accumulate_gradients(strategy, local, balance, dp, stats)
        dp.clip_grad_norm(1.0)
        step_ops.apply_update(optimizer, dp, 1e-4)
        elapsed = time.perf_counter() - began
        if step >= args.warmup:
            times.append(elapsed)
            traffic = mesh.traffic.snapshot()
            drops.append(sum(stats.drop_rates()) / len(stats.drop_rates()))
    if mesh.is_main:
        Path(args.out).write_text(json.dumps({
            "step_s": statistics.median(times), "traffic": traffic,
            "drop_rate": statistics.mean(drops)}))
    if mesh.world.active:
        dist.destroy_process_group()


def _threads_per_process(procs: int) -> int:
    """The machine's cores shared evenly, at least one thread each."""
    return max(1, (os.cpu_count() or 1) // procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(procs: int, dp: int, tp: int, ep: int, etp: int, chunks: int,
               steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               __file__, "--worker", "--procs", str(procs), "--dp", str(dp), "--tp", str(tp),
               "--ep", str(ep), "--etp", str(etp), "--chunks", str(chunks),
               "--steps", str(steps), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(_threads_per_process(procs))}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("procs", "dp", "tp", "ep", "etp", "chunks"):
        parser.add_argument(f"--{flag}", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from skymoe.config import resolve_config
    from skymoe.parallel.layout import ParallelLayout
    from skymoe.parallel.traffic import StepShape, step_traffic

    config = resolve_config("bench")
    tokens = GLOBAL_BATCH * SEQ_LEN
    print(f"bench config, global batch {GLOBAL_BATCH} x {SEQ_LEN} tokens, bf16 autocast, "
          f"gloo on CPU ({os.cpu_count()} cores), torch {torch.__version__}")
    print("MiB sent by rank 0 per step, measured (predicted)")
    header = (f"{'layout':32} {'procs':>5} {'step s':>7} {'tok/s/proc':>10} {'vs 1':>5} "
              + " ".join(f"{k:>20}" for k in KINDS))
    print(header)
    results = []
    single_tok_s = None
    for procs, dp, tp, ep, etp, chunks, label in LAYOUTS:
        r = run_layout(procs, dp, tp, ep, etp, chunks, args.steps)
        layout = ParallelLayout(dp=dp, tp=tp, ep=ep, etp=etp)
        predicted = step_traffic(config, layout, StepShape(SEQ_LEN, GLOBAL_BATCH // dp,
                                                          drop_rate=r["drop_rate"]))
        per_proc = tokens / r["step_s"] / procs
        single_tok_s = single_tok_s or per_proc  # the first row is the single process
        cells = " ".join(f"{_mb(r['traffic'].get(k, 0))} ({_mb(predicted.get(k, 0)).strip():>7})"
                         for k in KINDS)
        print(f"{label:32} {procs:5d} {r['step_s']:7.2f} {per_proc:10.1f} "
              f"{per_proc * procs / single_tok_s:5.2f} {cells}")
        results.append({"label": label, "procs": procs, "layout": layout.name, **r,
                        "tokens_per_s_per_process": per_proc, "predicted": predicted})

    real = resolve_config("skywork-moe-base")
    print(f"\nSkywork-MoE ({real.num_hidden_layers} layers, {real.num_experts} experts, hidden "
          f"{real.hidden_size}), one 4096-token sequence per micro-batch, 16 micro-batches, "
          "drop rate 0.1, 32 ranks holding the whole model (no pipeline split); predicted GiB "
          "sent per rank per step")
    print(f"{'layout':34} " + " ".join(f"{k:>11}" for k in KINDS) + "   token exchange")
    for dp, tp, ep, etp, label, where in [
            (8, 4, 16, 1, "EP  (dp8 tp4, ep=16)", "16 ranks: across nodes"),
            (8, 4, 8, 4, "ETP (dp8 tp4, ep=dp=8, etp=4)", "8 DP ranks: across nodes"),
            (8, 4, 4, 1, "EDP (dp8 tp4, ep=tp=4)", "the TP group: inside a node")]:
        layout = ParallelLayout(dp=dp, tp=tp, ep=ep, etp=etp)
        layout.validate(config=real)
        pred = step_traffic(real, layout, StepShape(4096, 1, micro_batches=16, drop_rate=0.1))
        print(f"{label:34} " + " ".join(f"{pred.get(k, 0) / 2**30:11.2f}" for k in KINDS)
              + f"   {where}")
        results.append({"label": label, "config": "skywork-moe-base", "layout": layout.name,
                        "predicted": pred})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

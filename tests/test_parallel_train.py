"""`skymoe train` under torchrun: the same losses as one process, checkpoints that resume under
another layout, and a rank that stalls or dies named in the error instead of a hang."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skymoe.checkpoint.dcp import ShardedCheckpoint, read_metadata
from skymoe.config import SkyworkMoeConfig
from skymoe.errors import TrainingError
from skymoe.model.transformer import build_model
from skymoe.parallel import sharded_state
from skymoe.parallel.comm import all_reduce_
from skymoe.parallel.health import guard_collectives
from skymoe.parallel.layout import ParallelLayout
from skymoe.parallel.mesh import build_mesh
from skymoe.parallel.placement import placement
from skymoe.train import config as train_config
from skymoe.train.trainer import Trainer

from distributed import free_port
from test_train import _config

# Eight AdamW steps across four layouts: the layouts sum some gradients in another order
# (last-bit differences), and AdamW's per-element normalization turns those into whole
# learning-rate steps on elements whose gradient is near zero (1e-5 held on one CPU and not on
# another). Gradient parity at 1e-5 is checked step by step, with SGD, in
# test_parallel_pipeline.py and test_layout_fuzz.py.
TOLERANCE = 1e-4


def _losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    key = "loss" if kind == "train" else "val_loss"
    return {r["step"]: r[key] for r in rows if r["kind"] == kind}


def _torchrun(config_file: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "skymoe", "train", str(config_file), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_layouts_match_one_process_and_resume_across_layouts(tmp_path):
    settings = dict(train={"precision": "fp32", "steps": 8, "lr_decay_steps": 8,
                           "batch_size": 4, "micro_batch_size": 2, "checkpoint_every": 2},
                    tokenizer={"vocab_size": 301})  # odd vocabulary: uneven vocab shards
    reference = Trainer(_config(tmp_path, "single", **settings), quiet=True)
    reference.run()
    reference.close()
    want = _losses(tmp_path / "single")

    # One process for 2 steps, then EDP (experts over the TP group) for 2, then DP + EP for
    # 2, then a 2-stage pipeline (the embedding alone on the first stage, one layer recomputed
    # on the second) for the last 2:
    # each resume reads a whole-model checkpoint written under another layout.
    cfg = _config(tmp_path, "sharded", **settings)
    cfg.tokenizer.path = str(tmp_path / "single" / "tokenizer")  # the same token ids
    cfg.train.steps = 2
    first = Trainer(cfg, quiet=True)
    first.run()
    first.close()
    cfg.train.steps = 8
    config_file = tmp_path / "sharded.toml"
    cfg.save(config_file)
    _torchrun(config_file, 2, "--resume", "--steps", "4", "--set", "parallel.tp=2",
              "--set", "parallel.expert=edp")
    _torchrun(config_file, 2, "--resume", "--steps", "6", "--set", "parallel.dp=2",
              "--set", "parallel.ep=2")
    _torchrun(config_file, 2, "--resume", "--set", "parallel.pp=2",
              "--set", "parallel.pp_layers=0,2", "--set", "parallel.pp_recompute=0,1")
    got = _losses(tmp_path / "sharded")
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step, loss in want.items():
        assert abs(got[step] - loss) / loss < TOLERANCE, (step, got[step], loss)
    # Validation under every layout too (the pipeline's forward-only schedule at step 8; each
    # leg also validates at its last step).
    want_val, got_val = _losses(tmp_path / "single", "val"), _losses(tmp_path / "sharded", "val")
    assert sorted(want_val) == [3, 6, 8] and sorted(got_val) == [2, 3, 4, 6, 8]
    for step, loss in want_val.items():
        assert abs(got_val[step] - loss) / loss < TOLERANCE, ("val", step, got_val[step], loss)


def _pieces_by_rank(checkpoint: Path) -> dict[int, dict[str, tuple[tuple, tuple]]]:
    """Per rank, the (offsets, sizes) of every piece its ``__<rank>_*.distcp`` file holds."""
    metadata = read_metadata(checkpoint / "sharded")
    sizes = {(key, tuple(c.offsets)): tuple(c.sizes)
             for key, md in metadata.state_dict_metadata.items() for c in md.chunks}
    out: dict[int, dict[str, tuple[tuple, tuple]]] = {}
    for index, info in metadata.storage_data.items():
        rank = int(re.match(r"__(\d+)_", info.relative_path)[1])
        offsets = tuple(index.offset)
        out.setdefault(rank, {})[index.fqn] = (offsets, sizes[(index.fqn, offsets)])
    return out


def test_sharded_checkpoints_four_ranks_each_write_their_own_and_resume_anywhere(tmp_path):
    """DP 2 x TP 2 with experts split over DP and sliced over TP (ZeRO-1): every rank writes
    only its own pieces; resuming under the same layout continues bit for bit, and one process
    continues the same run."""
    settings = dict(train={"precision": "fp32", "steps": 4, "lr_decay_steps": 4,
                           "batch_size": 4, "micro_batch_size": 2, "checkpoint_every": 2,
                           "keep_last": 0, "eval_every": 0},
                    tokenizer={"vocab_size": 301})
    cfg = _config(tmp_path, "straight", **settings)
    config_file = tmp_path / "run.toml"
    cfg.save(config_file)
    layout = ("--set", "parallel.dp=2", "--set", "parallel.tp=2", "--set", "parallel.expert=etp")
    _torchrun(config_file, 4, *layout)
    straight = tmp_path / "straight"
    step2 = straight / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in (step2 / "sharded").glob("*.distcp")) == [
        f"__{r}_0.distcp" for r in range(4)]

    # Rank r's file holds its own cut: its query heads, its half of the vocabulary, the
    # experts of its DP rank sliced to its TP half; replicated norms are written once.
    by_rank = _pieces_by_rank(step2)
    model = build_model(SkyworkMoeConfig.from_json_file(step2), dtype=torch.float32)
    cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.expert = 2, 2, "etp"
    mesh_layout = cfg.layout()
    assert (mesh_layout.ep, mesh_layout.etp) == (2, 2)
    for rank, pieces in by_rank.items():
        coords = mesh_layout.coords(rank)
        placements = {n: placement(n, model.config, mesh_layout, coords)
                      for n, _ in [*model.named_parameters(), *model.named_buffers()]}
        local = {n: placements[n].take(t.detach()) for n, t in
                 [*model.named_parameters(), *model.named_buffers()]}
        rank_pieces = sharded_state.model_pieces(_Holder(model.config, local), placements)
        mine = {k: (p.offsets, tuple(p.tensor.shape)) for k, p in rank_pieces.items()}
        # Each piece is its rank's whole local tensor, which DCP writes without a copy.
        assert all(p.tensor.untyped_storage().nbytes() == p.tensor.numel() *
                   p.tensor.element_size() for p in rank_pieces.values())
        for key, cut in pieces.items():
            name = key.split(".", 2)[2] if key.startswith("optimizer.") else key
            assert mine.get(name) == cut, (rank, key, cut, mine.get(name))
    norm = "model.norm.weight"
    assert sum(norm in pieces for pieces in by_rank.values()) == 1
    assert sum(f"optimizer.exp_avg.{norm}" in pieces for pieces in by_rank.values()) == 1

    # The same layout from step 2: the same losses and final weights, bit for bit, also
    # when saving in the background.
    cfg = _config(tmp_path, "straight", **settings)
    for name in ("again", "alone"):
        shutil.copytree(straight, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-00000004")
        cfg.run.dir = str(tmp_path / name)
        cfg.save(tmp_path / f"{name}.toml")
    # Resumed with background saves: the same checkpoints as the synchronous straight run's.
    _torchrun(tmp_path / "again.toml", 4, "--resume", *layout,
              "--set", "train.async_checkpoint=true")
    want = _losses(straight)
    assert _losses(tmp_path / "again") == want
    final = "checkpoints/step-00000004/sharded"
    a, b = ShardedCheckpoint(straight / final), ShardedCheckpoint(tmp_path / "again" / final)
    keys = list(a.shapes())
    assert keys == list(b.shapes())
    for key in keys:
        assert torch.equal(a.read([key])[key], b.read([key])[key]), key

    # One process from the 4-rank checkpoint: the same run within the layouts' rounding.
    alone = train_config.load(tmp_path / "alone.toml")
    trainer = Trainer(alone, resume=True, quiet=True)
    trainer.run()
    trainer.close()
    got = _losses(tmp_path / "alone")
    for step in (3, 4):
        assert abs(got[step] - want[step]) / want[step] < TOLERANCE, (step, got, want)


class _Holder(torch.nn.Module):
    """Named tensors with a config: what ``model_pieces`` reads of a sharded model."""

    def __init__(self, config: SkyworkMoeConfig, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        self.tensors = tensors

    def named_parameters(self, *args, **kwargs):
        return iter([(n, t) for n, t in self.tensors.items() if not n.endswith("expert_bias")])

    def named_buffers(self, *args, **kwargs):
        return iter([(n, t) for n, t in self.tensors.items() if n.endswith("expert_bias")])


def _failing_rank(rank: int, world: int, port: int, mode: str, result: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=3))
    mesh = build_mesh(ParallelLayout(dp=world))
    all_reduce_(torch.ones(1), mesh.world)  # everyone is up
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        time.sleep(30)  # stalls: never joins the next collective
        os._exit(0)
    began = time.monotonic()
    try:
        with guard_collectives(mesh, probe_s=3.0):
            all_reduce_(torch.ones(1), mesh.world)
        result.put(("no error", time.monotonic() - began))
    except TrainingError as exc:
        result.put((str(exc), time.monotonic() - began))
    result.close()
    result.join_thread()  # flush before the hard exit below
    os._exit(0)  # skip destroying the broken group


@pytest.mark.parametrize("mode", ["dies", "stalls"])
def test_a_dead_or_stalled_rank_is_named_within_the_timeout(mode):
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_failing_rank, args=(r, 2, port, mode, result))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        message, seconds = result.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert "rank(s) 1 did not respond" in message, message
    assert seconds < 15, seconds  # timeout 3 s + probe 3 s, not forever

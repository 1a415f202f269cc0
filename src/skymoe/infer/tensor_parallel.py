"""The part one process plays when a model runs for inference on ``tp`` processes.

``skymoe generate --tp N`` and ``skymoe serve --tp N`` run under ``torchrun --nproc-per-node
N``: every process loads the whole checkpoint, then shards it in place (attention heads split
unevenly, the first ``heads % N`` ranks taking one more; experts and dense MLPs along the
intermediate size; the vocabulary padded to a multiple of ``VOCAB_MULTIPLE``). Logits are
gathered to the full vocabulary on every rank, so every rank computes the same next-token
distribution and, sampling with one shared seed, picks the same token: the ranks' sequences
and KV caches never diverge. Rank 0 is the main rank (it prints, or serves HTTP); the others
step with it. With one process the model gets the CPU inference modules instead.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..model.transformer import SkyworkForCausalLM
from ..parallel.apply import parallelize
from ..parallel.layout import ParallelLayout
from ..parallel.mesh import build_mesh, init_distributed
from ..parallel.placement import VOCAB_MULTIPLE
from .generate import SamplingParams
from .prepare import prepare


@dataclass(frozen=True)
class InferenceRank:
    """This process's model, ready to run, and its place among the ``tp`` processes."""

    model: SkyworkForCausalLM
    tp: int = 1
    is_main: bool = True  # rank 0: the one that reports

    def shared_sampling(self, params: SamplingParams) -> SamplingParams:
        """``params`` with a seed every rank agrees on (rank 0 draws it) when it samples without
        one; unchanged for one process, greedy decoding or a given seed."""
        if self.tp == 1 or params.temperature == 0 or params.seed is not None:
            return params
        seed = torch.randint(2**31 - 1, (1,))
        dist.broadcast(seed, src=0)
        return dataclasses.replace(params, seed=int(seed))


def prepare_inference(model: SkyworkForCausalLM, tp: int = 1) -> InferenceRank:
    """Make ``model`` (loaded whole) ready for inference on this process, in place.

    ``tp == 1``: the fastest CPU inference path. ``tp > 1``: join the ``tp`` processes torchrun
    started and shard the model over them (raises ``ConfigError`` when torchrun started a
    different number)."""
    if tp <= 1:
        return InferenceRank(prepare(model))
    _, world = init_distributed()
    if world != tp:
        raise ConfigError(f"--tp {tp} needs {tp} processes; start them with torchrun "
                          f"--nproc-per-node {tp} -m skymoe ... (got {world})")
    mesh = build_mesh(ParallelLayout(tp=tp, etp=tp))  # experts split by rows, like dense MLPs
    parallelize(model, mesh, gather_logits=True, vocab_multiple=VOCAB_MULTIPLE)
    # The sharded modules keep their hooks and dispatcher: only the kernels are chosen.
    return InferenceRank(prepare(model, cpu_modules=False), tp, mesh.is_main)


@contextmanager
def inference_rank(model: SkyworkForCausalLM, tp: int = 1) -> Iterator[InferenceRank]:
    """``prepare_inference`` for the ``with`` block; the process group, if one was joined, is
    left at its end (also on an error), so no rank exits with the group still open."""
    try:
        yield prepare_inference(model, tp)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

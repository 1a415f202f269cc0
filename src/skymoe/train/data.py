"""Training data: read a corpus, split it, tokenize it, pack it into fixed-length rows and serve
deterministic, resumable batches.

Everything here is deterministic given a seed, so a training run can be resumed bit-exactly from
``SequenceLoader.state_dict()``. Every problem a user can cause (missing path, non-UTF-8 file,
broken JSONL/Parquet, empty corpus) is raised as a one-line ``DataError``.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..errors import DataError
from .sources import iter_chunks
from .token_rows import TokenRows


# --------------------------------------------------------------------------------------- reading
def read_documents(sources: Sequence[str | Path], patterns: Sequence[str] = ("*",),
                   text_field: str = "text") -> list[str]:
    """Every document of a corpus in memory, read as ``sources.iter_chunks`` describes
    (directories walked in sorted order, JSONL and Parquet by ``text_field``, empty documents
    dropped); bad input raises a one-line ``DataError``."""
    docs, parts = [], []
    for chunk in iter_chunks(sources, patterns, text_field):
        parts.append(chunk.text)
        if chunk.ends_document:
            docs.append("".join(parts))
            parts = []
    return docs


# ------------------------------------------------------------------------------ split and pack

def split_documents(docs: list[str], val_fraction: float, seed: int
                    ) -> tuple[list[str], list[str]]:
    """Split documents into (train, validation), holding out whole documents.

    A seeded permutation picks ``max(1, round(val_fraction * n))`` validation documents (at most
    ``n - 1``, so training keeps one) when ``val_fraction > 0`` and ``n >= 2``. Both lists keep
    the original document order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} is out of range; use 0 <= val_fraction < 1")
    n = len(docs)
    if val_fraction == 0 or n < 2:
        return list(docs), []
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx = set(perm[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def tokenize_documents(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, without BOS (``pack_documents`` separates them with EOS)."""
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal; small corpora need no bar.
    bar = tqdm(docs, desc="tokenizing", unit="doc", disable=None if len(docs) > 1000 else True)
    return [tokenizer.encode(doc, add_bos=False) for doc in bar]


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into rows.

    Returns an int64 tensor ``[N, seq_len]`` of consecutive rows; the incomplete tail is dropped.
    """
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be at least 1")
    stream = array("q")  # 8 bytes per token instead of ~36 for a list of Python ints
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise DataError(f"the corpus has {len(stream)} tokens (with EOS), fewer than seq_len="
                        f"{seq_len}; use a smaller seq_len or more data")
    rows = torch.frombuffer(stream, dtype=torch.int64)[: n_rows * seq_len]
    return rows.view(n_rows, seq_len).clone()  # clone: own the memory instead of the array's


# ---------------------------------------------------------------------------------------- loader

class SequenceLoader:
    """Deterministic, resumable shuffled batches over rows of tokens (``TokenRows``, a tensor
    ``[N, L]``, or any rows read the same way, such as fine-tuning rows).

    Epoch ``e`` visits the rows in ``torch.randperm(N)`` order seeded with ``seed + e`` (or in
    order when ``shuffle=False``), ``batch_size`` rows at a time; an incomplete last batch is
    dropped. ``state_dict()`` / ``load_state_dict()`` resume exactly where a run stopped.
    ``next_batch(local)`` reads only the rows ``local`` of the batch: a data-parallel rank's.
    """

    def __init__(self, sequences: torch.Tensor | TokenRows, batch_size: int, seed: int,
                 shuffle: bool = True) -> None:
        self.rows = (TokenRows.from_tensor(sequences) if isinstance(sequences, torch.Tensor)
                     else sequences)
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        n = len(self.rows)
        if n < batch_size:
            raise DataError(f"only {n} sequences for batch_size={batch_size}; use a smaller "
                            "batch_size or seq_len, or more data")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self._epoch, self._position = 0, 0
        self._order: torch.Tensor | None = None  # cached visiting order of self._epoch

    @property
    def epoch(self) -> int:
        """The epoch (0-based) that the next batch comes from; after all full batches of
        epoch ``e`` were drawn it is already ``e + 1``."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            n = len(self.rows)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + self._epoch)
                self._order = torch.randperm(n, generator=gen)
            else:
                self._order = torch.arange(n)
        return self._order

    def take(self, count: int) -> torch.Tensor:
        """The indices of the next ``count`` rows (continuing into later epochs), advancing
        the state as drawing them would."""
        parts = []
        while count > 0:
            n = min(count, self.batches_per_epoch * self.batch_size - self._position)
            parts.append(self._epoch_order()[self._position: self._position + n])
            self._position += n
            count -= n
            self._roll_over()
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def next_batch(self, local: tuple[int, int] | None = None) -> torch.Tensor:
        """The next ``[batch_size, L]`` int64 batch, moving to the next epoch when needed; with
        ``local = (start, stop)`` only those rows of it are read and returned."""
        idx = self.take(self.batch_size)
        return self.rows.read(idx if local is None else idx[local[0]:local[1]])

    def _roll_over(self) -> None:
        # Move to the next epoch as soon as no full batch is left, so that `epoch` (and a saved
        # state) already names the epoch of the next batch: `while loader.epoch < n` stops right.
        if self._position + self.batch_size > len(self.rows):
            self._epoch, self._position, self._order = self._epoch + 1, 0, None

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands, as plain ints (safe to store in JSON or a checkpoint)."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state_dict()`` of a loader built with the same data and settings."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"bad loader state {state!r}; expected {{'epoch': int, "
                            "'position': int}") from None
        if epoch < 0 or not 0 <= position <= len(self.rows):
            raise DataError(f"loader state {state!r} does not fit {len(self.rows)} "
                            "sequences; resume with the same data and seq_len")
        self._epoch, self._position, self._order = epoch, position, None
        self._roll_over()

    def iter_batches_once(self) -> Iterator[torch.Tensor]:
        """All full batches in order, without shuffling and without touching the state."""
        for start in range(0, self.batches_per_epoch * self.batch_size, self.batch_size):
            yield self.rows.read_range(start, start + self.batch_size)

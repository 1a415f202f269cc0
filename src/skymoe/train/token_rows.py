"""Fixed-length training rows over a token stream, read by row index.

The stream is the corpus's documents, each followed by EOS, held in segments: the memory-mapped
shards of a prepared data directory (``skymoe data prepare``), or one array in memory (a corpus
tokenized at start-up). Row ``i`` is tokens ``[i * seq_len, (i + 1) * seq_len)`` of the whole
stream (a row may span two segments); the incomplete tail is not a row. Reading a row touches
only its own bytes, so a process reading its rows of each batch keeps the rest of a memory
mapped corpus on disk.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError


class TokenRows:
    """Rows of ``seq_len`` tokens of the stream made of ``segments`` (1-D integer arrays)."""

    def __init__(self, segments: Sequence[np.ndarray], seq_len: int) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be at least 1")
        self.segments = [s for s in segments if len(s)]
        self.seq_len = seq_len
        self._starts = [0]
        for s in self.segments:
            self._starts.append(self._starts[-1] + len(s))
        self.tokens = self._starts[-1]

    @classmethod
    def from_tensor(cls, rows: torch.Tensor) -> "TokenRows":
        """Rows already cut: an integer tensor ``[N, seq_len]``."""
        if rows.dim() != 2 or rows.is_floating_point() or rows.is_complex():
            raise DataError(f"sequences must be an integer tensor [N, seq_len], got "
                            f"{rows.dtype} {list(rows.shape)}")
        return cls([rows.reshape(-1).numpy()], rows.shape[1])

    def __len__(self) -> int:
        return self.tokens // self.seq_len

    def read(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Rows ``index`` as an int64 tensor ``[len(index), seq_len]``."""
        index = torch.as_tensor(index, dtype=torch.int64).tolist()
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        for j, row in enumerate(index):
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} of {len(self)}")
            self._copy(row * self.seq_len, out[j])
        return torch.from_numpy(out)

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start`` to ``stop`` (exclusive), clipped to the rows there are."""
        return self.read(range(start, min(stop, len(self))))

    def _copy(self, begin: int, dest: np.ndarray) -> None:
        """Tokens ``begin ...`` of the stream into ``dest`` (across segments if need be)."""
        seg = bisect.bisect_right(self._starts, begin) - 1
        filled = 0
        while filled < len(dest):
            at = begin + filled - self._starts[seg]
            part = self.segments[seg][at: at + len(dest) - filled]
            dest[filled: filled + len(part)] = part
            filled += len(part)
            seg += 1


__all__ = ["TokenRows"]

"""Training data: read a corpus, split it, tokenize it, pack it into fixed-length rows and serve
deterministic, resumable batches.

Everything here is deterministic given a seed, so a training run can be resumed bit-exactly from
``SequenceLoader.state_dict()``. Every problem a user can cause (missing path, non-UTF-8 file,
broken JSONL/Parquet, empty corpus) is raised as a one-line ``DataError``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..errors import DataError

_SKIP_DIRS = ("__pycache__",)


# --------------------------------------------------------------------------------------- reading
# Parts of the standard library left out of the default corpus: tests (odd encodings on
# purpose), vendored packages and GUI demos.
_STDLIB_EXCLUDED = {"test", "tests", "site-packages", "lib2to3", "idlelib", "tkinter",
                    "turtledemo", "ensurepip", "__pycache__", "lib-dynload"}


def default_corpus_sources() -> list[Path]:
    """The Python standard library's own source: present on every machine that runs us."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.iterdir())
            if p.name not in _STDLIB_EXCLUDED and not p.name.startswith("config-")
            and (p.is_dir() or p.suffix == ".py")]


def read_documents(sources: Sequence[str | Path], patterns: Sequence[str] = ("*",),
                   text_field: str = "text") -> list[str]:
    """Read every document of a corpus.

    Each source is a file or a directory; directories are walked recursively in sorted order and
    only files whose name matches one of the fnmatch ``patterns`` are read (hidden files and
    directories and ``__pycache__`` are skipped). ``.jsonl`` files hold one JSON object per line
    with the document in ``text_field``; ``.parquet`` files hold it in column ``text_field``; any
    other file is one UTF-8 document. Empty and whitespace-only documents are dropped, and so
    are empty files found in a directory (a package's empty ``__init__.py``).

    Raises ``DataError`` for a missing source, a directory without matching files or without
    any non-empty document, an unreadable file, and an explicitly named file without any
    non-empty document.
    """
    if isinstance(sources, (str, Path)):  # a lone path would otherwise be iterated per character
        sources = [sources]
    if isinstance(patterns, str):
        patterns = [patterns]
    docs: list[str] = []
    for source in sources:
        source_docs = []
        for path in _corpus_files(Path(source), patterns):
            source_docs.extend(d for d in _read_file(path, text_field) if d.strip())
        if not source_docs:
            raise DataError(f"{source}: empty (no non-empty documents); add text to it or "
                            "point the data sources elsewhere")
        docs.extend(source_docs)
    if not docs:
        raise DataError("the corpus is empty: no sources given; pass at least one file or "
                        "directory")
    return docs


def _corpus_files(source: Path, patterns: Sequence[str]) -> list[Path]:
    """The files a source stands for: itself, or the matching files below a directory."""
    if not source.exists():
        raise DataError(f"{source}: no such file or directory; check the data path")
    if not source.is_dir():
        return [source]  # an explicitly named file is read whatever its name
    found = []
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]  # prune
        for name in files:
            if not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in patterns):
                found.append(Path(root) / name)
    if not found:
        raise DataError(f"{source}: directory has no files matching {list(patterns)}; check the "
                        "path or the patterns")
    # Sort on path components (not strings) so the order does not depend on os.walk or on '/'.
    return sorted(found, key=lambda p: p.relative_to(source).parts)


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    return [_read_text(path)]


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); convert it to "
                     "UTF-8 or exclude it with patterns")


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: a byte-order mark is an encoding artefact, not text to train on.
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    try:
        # Iterate the file's lines, not str.splitlines(): that would also split at U+2028 and
        # friends, which JSON allows unescaped inside strings.
        with open(path, encoding="utf-8-sig", newline=None) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    docs.append(_jsonl_text(line, text_field, path, lineno))
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    return docs


def _jsonl_text(line: str, text_field: str, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                        "each line must be one JSON object") from None
    text = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: no string field {text_field!r}; set text_field to the "
                        "field that holds the document text")
    return text


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {schema.names}); set "
                            "text_field to the column that holds the document text")
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {text_field!r} has type {kind}, not string; set "
                            "text_field to a string column")
        docs = []
        for batch in pf.iter_batches(columns=[text_field]):
            docs.extend(d for d in batch.column(0).to_pylist() if d is not None)
    except (pa.ArrowException, OSError) as exc:  # corrupt or truncated file
        raise DataError(f"{path}: not a readable Parquet file ({exc}); re-export it or exclude "
                        "it with patterns") from None
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
    """Deterministic, resumable shuffled batches over packed sequences ``[N, L]``.

    Epoch ``e`` visits the rows in ``torch.randperm(N)`` order seeded with ``seed + e`` (or in
    order when ``shuffle=False``), ``batch_size`` rows at a time; an incomplete last batch is
    dropped. ``state_dict()`` / ``load_state_dict()`` resume exactly where a run stopped.
    """

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int,
                 shuffle: bool = True) -> None:
        if sequences.dim() != 2 or sequences.is_floating_point() or sequences.is_complex():
            raise DataError(f"sequences must be an integer tensor [N, seq_len], got "
                            f"{sequences.dtype} {list(sequences.shape)}")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        n = sequences.shape[0]
        if n < batch_size:
            raise DataError(f"only {n} sequences for batch_size={batch_size}; use a smaller "
                            "batch_size or seq_len, or more data")
        self.sequences = sequences.long()
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
        return self.sequences.shape[0] // self.batch_size

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            n = self.sequences.shape[0]
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + self._epoch)
                self._order = torch.randperm(n, generator=gen)
            else:
                self._order = torch.arange(n)
        return self._order

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, L]`` int64 batch, moving to the next epoch when needed."""
        idx = self._epoch_order()[self._position: self._position + self.batch_size]
        self._position += self.batch_size
        self._roll_over()
        return self.sequences[idx]

    def _roll_over(self) -> None:
        # Move to the next epoch as soon as no full batch is left, so that `epoch` (and a saved
        # state) already names the epoch of the next batch: `while loader.epoch < n` stops right.
        if self._position + self.batch_size > self.sequences.shape[0]:
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
        if epoch < 0 or not 0 <= position <= self.sequences.shape[0]:
            raise DataError(f"loader state {state!r} does not fit {self.sequences.shape[0]} "
                            "sequences; resume with the same data and seq_len")
        self._epoch, self._position, self._order = epoch, position, None
        self._roll_over()

    def iter_batches_once(self) -> Iterator[torch.Tensor]:
        """All full batches in order, without shuffling and without touching the state."""
        for start in range(0, self.batches_per_epoch * self.batch_size, self.batch_size):
            yield self.sequences[start: start + self.batch_size]

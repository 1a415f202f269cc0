"""``skymoe data prepare``: tokenize a corpus once into memory-mappable token shards, and open
such a directory for training.

The corpus is read as a stream (``sources.iter_chunks``), tokenized in batches of about
``batch_bytes`` of text by the tokenizer library's own parallel batch encoder, and written as
it goes, so memory stays bounded whatever the corpus size. Every document is followed by EOS.
A document goes to the validation split when a seeded hash of its index falls below
``val_fraction`` (stable: the same corpus, seed and fraction give the same split). Layout::

    OUT/meta.json                  format, dtype, EOS, tokenizer fingerprint, counts, sources
    OUT/tokenizer/                 the tokenizer files (training uses them by default)
    OUT/train-00000.bin ...        tokens, uint16 when the vocabulary fits, else uint32
    OUT/train-00000.idx ...        int64 end offset of each document in its shard
    OUT/val-00000.bin/.idx ...     the validation documents, likewise

Shards end at document boundaries after about ``shard_tokens`` tokens. Everything is written
into a temporary sibling directory and renamed into place after ``meta.json``, so an
interrupted prepare never leaves a directory that looks complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from ..checkpoint.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer
from ..errors import DataError
from .mixture import seeded_uniform
from .sources import corpus_files, iter_chunks
from .token_rows import TokenRows

FORMAT, VERSION, META = "skymoe-tokens", 1, "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
_VAL_SEED_SALT = 0x5EED  # keeps the split's hash apart from the mixture's sample hash
_SKIPPED_SHOWN = 20


def tokenizer_fingerprint(directory: str | Path) -> str:
    """sha256 of the tokenizer file ``load_tokenizer`` reads in ``directory``."""
    d = Path(directory)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (d / name).is_file():
            return hashlib.sha256((d / name).read_bytes()).hexdigest()
    raise DataError(f"{d}: no tokenizer.json or tokenizer.model")


@dataclass
class PrepareReport:
    """What a prepare wrote and skipped."""

    directory: Path
    documents: dict[str, int]
    tokens: dict[str, int]
    bytes_read: int
    seconds: float
    skipped: list[str] = field(default_factory=list)
    skipped_count: int = 0


class _ShardWriter:
    """One split's shards: tokens appended document by document, a new shard after about
    ``shard_tokens`` tokens (at a document boundary)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._ends = array("q")
        self._tokens = 0

    def write(self, ids: np.ndarray, ends_document: bool) -> None:
        if self._file is None:
            name = f"{self.split}-{len(self.shards):05d}"
            self._file = open(self.directory / f"{name}.bin", "wb")
            self.shards.append({"file": f"{name}.bin", "index": f"{name}.idx"})
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self._tokens += len(ids)
        if ends_document:
            self._ends.append(self._tokens)
            if self._tokens >= self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        shard = self.shards[-1]
        (self.directory / shard["index"]).write_bytes(
            np.frombuffer(self._ends, dtype=np.int64).astype("<i8").tobytes())
        shard.update(tokens=self._tokens, documents=len(self._ends))
        self._ends, self._tokens = array("q"), 0

    def close(self) -> dict[str, Any]:
        if self._file is not None:
            self._close_shard()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards)}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()


def prepare_dataset(sources: Sequence[str | Path], tokenizer_dir: str | Path,
                    out_dir: str | Path, patterns: Sequence[str] = ("*",),
                    text_field: str = "text", val_fraction: float = 0.0, seed: int = 0,
                    skip_bad: bool = False, shard_tokens: int = 2**28,
                    batch_bytes: int = 4 * 2**20, show_progress: bool | None = None
                    ) -> PrepareReport:
    """Tokenize ``sources`` with the tokenizer in ``tokenizer_dir`` into ``out_dir`` (which
    must not exist) as the module describes; with ``skip_bad`` bad input is skipped and
    counted instead of stopping the prepare."""
    out = Path(out_dir)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another output directory")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} is out of range; use 0 <= it < 1")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise DataError(f"{tokenizer_dir}: the tokenizer has no EOS token, needed between "
                        "documents")
    vocab = max(tokenizer.vocab_size, tokenizer.eos_id + 1)
    dtype = np.dtype("<u2") if vocab <= 2**16 else np.dtype("<u4")
    total = sum(f.stat().st_size for s in sources for f in corpus_files(Path(s), patterns))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    skipped: list[str] = []
    count = [0]

    def on_bad(error: DataError) -> None:
        count[0] += 1
        if len(skipped) < _SKIPPED_SHOWN:
            skipped.append(str(error))

    began = time.perf_counter()
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True,
                  disable=(not show_progress) if show_progress is not None else None) as bar:
            done = _tokenize_into(
                iter_chunks(sources, patterns, text_field, on_bad if skip_bad else None),
                tokenizer, writers, val_fraction, seed, batch_bytes, bar, began)
        splits = {split: w.close() for split, w in writers.items()}
        _copy_tokenizer(Path(tokenizer_dir), tmp / TOKENIZER_DIR)
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": {"sha256": tokenizer_fingerprint(tokenizer_dir),
                          "source": str(Path(tokenizer_dir).resolve())},
            "splits": splits, "val_fraction": val_fraction, "seed": seed,
            "sources": [str(Path(s).resolve()) for s in sources], "patterns": list(patterns),
            "text_field": text_field, "bytes_read": done,
            "skipped": {"count": count[0], "first": skipped},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareReport(out, {k: v["documents"] for k, v in splits.items()},
                         {k: v["tokens"] for k, v in splits.items()}, done,
                         time.perf_counter() - began, skipped, count[0])


@dataclass
class _Batch:
    texts: list[str]
    ends: list[bool]  # whether each text ends its document
    nbytes: int  # input bytes the texts came from


def _batches(chunks, batch_bytes: int) -> Iterator[_Batch]:
    """The chunks grouped into batches of at least ``batch_bytes`` characters (the last one
    may be smaller, or empty when there was no input)."""
    batch = _Batch([], [], 0)
    size = 0
    for chunk in chunks:
        batch.texts.append(chunk.text)
        batch.ends.append(chunk.ends_document)
        batch.nbytes += chunk.nbytes
        size += len(chunk.text)
        if size >= batch_bytes:
            yield batch
            batch, size = _Batch([], [], 0), 0
    yield batch


def _tokenize_into(chunks, tokenizer: Tokenizer, writers: dict[str, _ShardWriter],
                   val_fraction: float, seed: int, batch_bytes: int, bar: tqdm,
                   began: float) -> int:
    """Tokenize the chunks batch by batch into the writers; the input bytes read.

    One batch is tokenized (in the tokenizer library, which releases the GIL) while this
    thread reads the next one and writes the previous one, so the Python-side work hides
    behind the tokenizer's instead of adding to it."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    state = {"document": 0, "tokens": 0, "read": 0}
    val_salted = seed ^ _VAL_SEED_SALT

    def write(encoded: list[list[int]], batch: _Batch) -> None:
        # The document each chunk belongs to, and which of them are held out.
        docs = state["document"] + np.cumsum([0] + batch.ends[:-1])
        held_out = seeded_uniform(val_salted, docs) < val_fraction
        for ids, end, val in zip(encoded, batch.ends, held_out):
            tokens = np.asarray(ids, dtype=np.int64)
            writers["val" if val else "train"].write(
                np.concatenate([tokens, eos]) if end else tokens, end)
            state["tokens"] += len(tokens) + end
        state["document"] += sum(batch.ends)
        state["read"] += batch.nbytes
        bar.update(batch.nbytes)
        rate = state["tokens"] / max(time.perf_counter() - began, 1e-9)
        bar.set_postfix(tokens=f"{state['tokens']:,}", tok_s=f"{rate:,.0f}", refresh=False)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        previous: tuple[Future, _Batch] | None = None
        for batch in _batches(chunks, batch_bytes):
            current = (pool.submit(tokenizer.encode_batch, batch.texts, False), batch)
            if previous is not None:
                write(previous[0].result(), previous[1])
            previous = current
        if previous is not None:
            write(previous[0].result(), previous[1])
    return state["read"]


def _copy_tokenizer(source: Path, dest: Path) -> None:
    dest.mkdir()
    for name in (*TOKENIZER_FILES, "config.json"):  # config.json: BOS/EOS ids when only there
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


# ------------------------------------------------------------------------------------ reading
class PreparedData:
    """A directory ``skymoe data prepare`` wrote, checked and memory-mapped."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_file = self.directory / META
        try:
            self.meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise DataError(f"{self.directory}: not prepared data (no {META}); make it with "
                            "skymoe data prepare (an interrupted prepare leaves none)") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{meta_file}: unreadable ({exc})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(f"{meta_file}: not {FORMAT} version {VERSION} data; prepare it "
                            "again with this skymoe")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["sha256"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / TOKENIZER_DIR

    def tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def rows(self, split: str, seq_len: int) -> TokenRows:
        """The split's documents as training rows of ``seq_len`` tokens (memory-mapped)."""
        segments = []
        for shard in self.meta["splits"][split]["shards"]:
            path = self.directory / shard["file"]
            expected = int(shard["tokens"]) * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path}: missing or not {expected} bytes as {META} says; "
                                "the directory is damaged, prepare it again")
            if expected:
                segments.append(np.memmap(path, dtype=self.dtype, mode="r"))
        return TokenRows(segments, seq_len)


__all__ = ["PrepareReport", "PreparedData", "prepare_dataset", "tokenizer_fingerprint"]

"""A corpus read as a stream of text chunks: files, directories, JSONL and Parquet, in bounded
memory whatever the sizes.

Each source is a file or a directory; directories are walked recursively in sorted order and
only files whose name matches one of the fnmatch ``patterns`` are read (hidden files and
directories and ``__pycache__`` are skipped). ``.jsonl`` files hold one JSON object per line
with the document in ``text_field``; ``.parquet`` files hold it in column ``text_field`` (read
a row batch at a time); any other file is one UTF-8 document. Empty and whitespace-only
documents are dropped.

A text file larger than ``chunk_bytes`` is read in pieces (``Chunk`` objects of one document:
only the last has ``ends_document``). Pieces are cut after a newline that has text on both
sides of it (``"...x\\ny..."``), where byte-level BPE tokenizers of the GPT-2 family split
anyway, so the pieces tokenize as the whole file would; a tokenizer that prefixes a space to
every text it is given (sentencepiece's Llama convention) may still tokenize the first word of
a piece differently. A file with no such newline is cut at any newline, failing that at a
character boundary.

Bad input (a missing path, non-UTF-8 bytes, a broken JSON line, a missing field, an unreadable
file) raises a one-line ``DataError`` naming the file and line; with an ``on_bad`` callback the
error is passed to it instead and the bad part skipped: a JSON line, a Parquet file, or a text
file (of a text file read in pieces, what came before the bad byte is kept).
"""

from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import DataError

DEFAULT_CHUNK_BYTES = 16 * 2**20
_SKIP_DIRS = ("__pycache__",)
_BOM = b"\xef\xbb\xbf"
_SPACE = frozenset(b" \t\r\n\x0b\x0c")

# Parts of the standard library left out of the default corpus: tests (odd encodings on
# purpose), vendored packages and GUI demos.
_STDLIB_EXCLUDED = {"test", "tests", "site-packages", "lib2to3", "idlelib", "tkinter",
                    "turtledemo", "ensurepip", "__pycache__", "lib-dynload"}

OnBad = Callable[[DataError], None]


@dataclass(frozen=True)
class Chunk:
    """Text of one document (all of it, or a piece when ``ends_document`` is False on all but
    its last piece); ``nbytes``: the input bytes read for it (and for skipped input before it),
    for progress."""

    text: str
    ends_document: bool
    nbytes: int


def default_corpus_sources() -> list[Path]:
    """The Python standard library's own source: present on every machine that runs us."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.iterdir())
            if p.name not in _STDLIB_EXCLUDED and not p.name.startswith("config-")
            and (p.is_dir() or p.suffix == ".py")]


def corpus_files(source: Path, patterns: Sequence[str]) -> list[Path]:
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


def iter_chunks(sources: Sequence[str | Path], patterns: Sequence[str] = ("*",),
                text_field: str = "text", on_bad: OnBad | None = None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Every document of the corpus, in order, as chunks. Raises ``DataError`` (or reports to
    ``on_bad``) as the module says; a source without any non-empty document, or no source at
    all, is always an error."""
    if isinstance(sources, (str, Path)):  # a lone path would otherwise be iterated per character
        sources = [sources]
    if isinstance(patterns, str):
        patterns = [patterns]
    if not sources:
        raise DataError("the corpus is empty: no sources given; pass at least one file or "
                        "directory")

    def bad(error: DataError) -> None:
        if on_bad is None:
            raise error
        on_bad(error)

    for source in sources:
        found = False
        for path in corpus_files(Path(source), patterns):
            for chunk in _file_chunks(path, text_field, bad, chunk_bytes):
                found = found or chunk.ends_document
                yield chunk
        if not found:
            raise DataError(f"{source}: empty (no non-empty documents); add text to it or "
                            "point the data sources elsewhere")


def _file_chunks(path: Path, text_field: str, bad: OnBad, chunk_bytes: int
                 ) -> Iterator[Chunk]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _jsonl_chunks(path, text_field, bad)
        elif suffix == ".parquet":
            yield from _parquet_chunks(path, text_field, bad)
        else:
            yield from _text_chunks(path, bad, chunk_bytes)
    except OSError as exc:
        bad(DataError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions"))


def _not_utf8(path: Path, line: int, exc: UnicodeDecodeError, offset: int) -> DataError:
    return DataError(f"{path}:{line}: not UTF-8 text (bad byte at offset {offset + exc.start});"
                     " convert it to UTF-8, exclude it with patterns, or skip bad input")


def _text_chunks(path: Path, bad: OnBad, chunk_bytes: int) -> Iterator[Chunk]:
    with open(path, "rb") as f:
        pending, offset, line, first = b"", 0, 1, True
        while True:
            block = f.read(chunk_bytes)
            data, at_end = pending + block, len(block) < chunk_bytes
            cut = len(data) if at_end else _cut_point(data)
            piece, pending = data[:cut], data[cut:]
            try:
                text = piece.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError as exc:
                bad(_not_utf8(path, line + piece[:exc.start].count(b"\n"), exc, offset))
                if not first:  # close the document read so far
                    yield Chunk("", True, len(piece))
                return
            ends = at_end and not pending
            if not first or not ends or text.strip():  # a whole whitespace-only file is dropped
                yield Chunk(text, ends, len(piece))
            if ends:
                return
            offset, line, first = offset + len(piece), line + piece.count(b"\n"), False


def _cut_point(data: bytes) -> int:
    """Where to end a piece of ``data`` (an index > 0): after the last newline with text on both
    sides, else after the last newline, else at the last character boundary."""
    end = len(data) - 1
    for _ in range(4096):  # bounded search; long runs of blank lines fall through
        i = data.rfind(b"\n", 1, end)
        if i < 0:
            break
        if data[i - 1] not in _SPACE and data[i + 1] not in _SPACE:
            return i + 1
        end = i
    i = data.rfind(b"\n")
    if i >= 0:
        return i + 1
    cut = len(data)
    while cut > 1 and data[cut - 1] & 0xC0 == 0x80:  # back over UTF-8 continuation bytes
        cut -= 1
    cut = cut - 1 if data[cut - 1] >= 0xC0 else cut  # and over a lead byte without its tail
    return cut if cut > 0 else len(data)  # no character boundary: not UTF-8, said when decoded


def _jsonl_chunks(path: Path, text_field: str, bad: OnBad) -> Iterator[Chunk]:
    skipped = 0
    # Binary lines, not text mode: only b"\n" ends a line (JSON strings may hold U+2028), and a
    # bad byte is reported with its line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            skipped += len(raw)
            try:
                line = (raw.removeprefix(_BOM) if lineno == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                bad(_not_utf8(path, lineno, exc, 0))
                continue
            if not line.strip():
                continue
            try:
                text = _jsonl_text(line, text_field, path, lineno)
            except DataError as error:
                bad(error)
                continue
            if text.strip():
                yield Chunk(text, True, skipped)
                skipped = 0


def _jsonl_text(line: str, text_field: str, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                        "each line must be one JSON object") from None
    text = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: no string field {text_field!r}; set the text field "
                        "to the one that holds the document text")
    return text


def _parquet_chunks(path: Path, text_field: str, bad: OnBad) -> Iterator[Chunk]:
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
                            "the text field to the column that holds the document text")
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {text_field!r} has type {kind}, not string; set "
                            "the text field to a string column")
        rows, size = max(1, pf.metadata.num_rows), path.stat().st_size
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            share = size * batch.num_rows // rows
            for text in batch.column(0).to_pylist():
                if text is not None and text.strip():
                    yield Chunk(text, True, share)
                    share = 0
    except DataError as error:
        bad(error)
    except (pa.ArrowException, OSError) as exc:  # corrupt or truncated file
        bad(DataError(f"{path}: not a readable Parquet file ({exc}); re-export it or exclude "
                      "it with patterns"))


__all__ = ["Chunk", "corpus_files", "default_corpus_sources", "iter_chunks"]

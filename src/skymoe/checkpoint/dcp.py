"""Tensors in pieces, written and read with torch.distributed.checkpoint (DCP).

A ``Piece`` is the part of a named whole tensor that one process holds: a contiguous block
(a view, possibly strided) at some offsets in the whole. ``save_pieces`` has every process
write its own pieces in parallel (DCP's ``FileSystemWriter``: ``__<rank>_*.distcp`` files plus
one ``.metadata`` index); a piece several processes hold identically (a replicated norm) is
written once. ``load_pieces`` fills any other set of pieces from it, cut differently or by
another number of processes (DCP reads the overlapping regions of the saved chunks). Loading
reads one saved chunk at a time. Saving adds no copy of a piece that owns its storage; a piece
that is a view into a larger tensor is copied by DCP's writer, which keeps a file's tensors
until the file is closed, so such views cost their size in memory while saving.

DCP's own readers unpickle the ``.metadata`` file, which can run code. Here it is read by an
unpickler that builds only DCP's metadata classes and torch's sizes and dtypes, and tensors are
read weights-only; no other object is ever loaded.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, ReadItem, SavePlan,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..errors import CheckpointError

METADATA_FILE = ".metadata"


@dataclass(frozen=True)
class Piece:
    """``tensor`` (this process's part) sits at ``offsets`` in a whole tensor of ``shape``."""

    tensor: torch.Tensor
    shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != self.tensor.ndim or len(self.offsets) != self.tensor.ndim or any(
                o < 0 or o + n > s for o, n, s in zip(self.offsets, self.tensor.shape,
                                                        self.shape)):
            raise ValueError(f"a piece of shape {tuple(self.tensor.shape)} at {self.offsets} "
                             f"does not fit in a tensor of shape {self.shape}")

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> "Piece":
        return cls(tensor, tuple(tensor.shape), (0,) * tensor.ndim)

    @property
    def chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets),
                                    sizes=torch.Size(self.tensor.shape))


# ------------------------------------------------------------------------------------ saving
class _PieceSavePlanner(DefaultSavePlanner):
    """Write items at each piece's offsets (DCP's default planner knows offsets only for
    DTensor and ShardedTensor, which cannot express uneven head splits or paired w1/w3 rows)."""

    def __init__(self, pieces: dict[str, Piece]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces = pieces

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan([
            WriteItem(index=MetadataIndex(key, torch.Size(p.offsets)), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(
                          chunk=p.chunk, properties=TensorProperties.create_from_tensor(p.tensor),
                          size=torch.Size(p.shape)))
            for key, p in self.pieces.items()])
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
        # The state dict DCP was given (a staged copy when saving in the background).
        return self.state_dict[index.fqn].detach()


def save_pieces(pieces: dict[str, Piece], directory: str | Path,
                process_group: dist.ProcessGroup | None = None) -> None:
    """Every process of ``process_group`` (or just this one, when torch.distributed is not
    initialized) writes its ``pieces`` into ``directory``; a collective. Identical pieces of
    several processes are written once, and DCP refuses pieces that overlap otherwise or leave
    part of a tensor unwritten."""
    distributed = dist.is_available() and dist.is_initialized()
    with _quiet():
        dcp.save({k: p.tensor for k, p in pieces.items()},
                 storage_writer=dcp.FileSystemWriter(str(directory), thread_count=1),
                 planner=_PieceSavePlanner(pieces), process_group=process_group,
                 no_dist=not distributed)


@contextlib.contextmanager
def _quiet():
    """DCP's warnings that say what is intended here: one process without a process group,
    and a fresh (temporary) directory it calls overwriting."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint")
        yield


# ----------------------------------------------------------------------------------- loading
class _PieceLoadPlanner(DefaultLoadPlanner):
    """Read each piece's region from whichever saved chunks overlap it."""

    def __init__(self, pieces: dict[str, Piece], directory: Path) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces, self.directory = pieces, directory

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        saved = self.metadata.state_dict_metadata
        for key, p in self.pieces.items():
            md = saved.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self.directory}: holds no tensor '{key}'; the "
                                      "checkpoint belongs to another model or is incomplete")
            if tuple(md.size) != p.shape:
                raise CheckpointError(f"{self.directory}: '{key}' has shape {list(md.size)}, "
                                      f"the model expects {list(p.shape)}")
            items += create_read_items_for_chunk_list(key, md, [p.chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.pieces[index.fqn].tensor

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(f"{self.directory}: '{read_item.dest_index.fqn}' is a pickled "
                              "object, not a tensor; refused (loading it could run code)")


class _SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata is read by ``read_metadata`` below (or given)."""

    def __init__(self, directory: Path, metadata: Metadata | None = None) -> None:
        super().__init__(str(directory))
        self.known = metadata

    def read_metadata(self) -> Metadata:
        metadata = self.known or read_metadata(self.path)
        metadata.storage_meta = metadata.storage_meta or dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_pieces(pieces: dict[str, Piece], directory: str | Path,
                process_group: dist.ProcessGroup | None = None) -> None:
    """Fill every piece in place from the checkpoint in ``directory``, whatever layout and
    number of processes wrote it; a collective over ``process_group`` when torch.distributed
    is initialized (every process calls it, with its own pieces, possibly none)."""
    _load(pieces, Path(directory), process_group,
          alone=not (dist.is_available() and dist.is_initialized()))


def _load(pieces: dict[str, Piece], directory: Path, process_group: dist.ProcessGroup | None,
          alone: bool, metadata: Metadata | None = None) -> None:
    try:
        with _quiet():
            dcp.load({k: p.tensor for k, p in pieces.items()},
                     storage_reader=_SafeReader(directory, metadata),
                     planner=_PieceLoadPlanner(pieces, directory), process_group=process_group,
                     no_dist=alone)
    except CheckpointException as exc:
        raise CheckpointError(_first_failure(exc, directory)) from None


def _first_failure(exc: CheckpointException, directory: Path) -> str:
    """One line from DCP's per-rank failures (a CheckpointError we raised, or an I/O error)."""
    for failure in exc.failures.values():
        if isinstance(failure, CheckpointError):
            return str(failure)
    first = next(iter(exc.failures.values()), exc)
    text = str(first).strip().splitlines()
    return (f"{directory}: the sharded checkpoint could not be read "
            f"({text[0] if text else type(first).__name__}); it is incomplete or corrupt")


# ---------------------------------------------------------------------------------- metadata
# The only globals a DCP ``.metadata`` pickle may name: its dataclasses and torch's own small
# value types. Anything else (a function, an arbitrary class) is refused before it exists.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
     ("torch", "Size"), ("torch.serialization", "_get_layout"),  # a layout by its name
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),       # the checkpoint's own path
     ("collections", "OrderedDict")}
_TORCH_VALUES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "strided",
                 "contiguous_format", "preserve_format", "channels_last"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and name in _TORCH_VALUES:
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_metadata(directory: str | Path) -> Metadata:
    """The index of a DCP checkpoint directory, unpickled with DCP's classes only."""
    file = Path(directory) / METADATA_FILE
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {METADATA_FILE}; not a sharded checkpoint, or "
                              "its save did not finish") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError,
            IndexError) as exc:
        raise CheckpointError(f"{file}: refused or unreadable ({exc}); it is corrupt or was "
                              "not written by torch.distributed.checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class ShardedCheckpoint:
    """A DCP checkpoint directory, read by this process alone: what it holds, and whole
    tensors assembled from their saved chunks."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.metadata = read_metadata(self.directory)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor key with its whole shape and dtype, in the order they were saved."""
        return {key: (tuple(md.size), md.properties.dtype)
                for key, md in self.metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The whole tensors ``keys``."""
        shapes = self.shapes()
        return {k: self.read_block(k, (0,) * len(shapes[k][0]), shapes[k][0])
                if k in shapes else self._missing(k) for k in keys}

    def read_block(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]
                   ) -> torch.Tensor:
        """The block of tensor ``key`` of ``sizes`` at ``offsets``; only the saved chunks
        that overlap it are read."""
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            self._missing(key)
        out = torch.empty(sizes, dtype=md.properties.dtype)
        _load({key: Piece(out, tuple(md.size), tuple(offsets))}, self.directory, None,
              alone=True, metadata=self.metadata)
        return out

    def _missing(self, key: str) -> NoReturn:
        raise CheckpointError(f"{self.directory}: holds no tensor '{key}'")


__all__ = ["Piece", "ShardedCheckpoint", "load_pieces", "read_metadata", "save_pieces"]

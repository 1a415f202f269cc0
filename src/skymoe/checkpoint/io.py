"""Reading and writing HF weight files: safetensors (single or sharded + index) and .bin shards.

Readers go shard by shard and tensor by tensor so a loader never holds more than one shard's
tensors besides the model. ``.bin`` files are opened with ``weights_only=True``: no arbitrary
object is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def _read_index(path: Path) -> list[Path]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("'weight_map' is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a weight index ({exc}); expected "
                              "{\"weight_map\": {tensor name: shard file}}") from None
    shards = list(dict.fromkeys(weight_map.values()))
    files = [path.parent / name for name in shards]
    for name, file in zip(shards, files):
        if not file.is_file():
            tensor = next(t for t, s in weight_map.items() if s == name)
            raise CheckpointError(f"{path}: shard '{name}' (holding e.g. '{tensor}') is missing "
                                  f"from {path.parent}")
    return files


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of an HF checkpoint directory, in load order.

    Prefers safetensors (index, then single file), then ``.bin`` (index, single, or a glob of
    ``pytorch_model-*.bin`` shards).
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected an HF checkpoint directory)")
    if (d / SAFE_INDEX).is_file():
        return _read_index(d / SAFE_INDEX)
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    if (d / BIN_INDEX).is_file():
        return _read_index(d / BIN_INDEX)
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    shards = sorted(d.glob("pytorch_model-*.bin")) or sorted(d.glob("model-*.safetensors"))
    if shards:
        return shards
    if (d / "sharded").is_dir():
        raise CheckpointError(f"{d}: a sharded training checkpoint (its weights are pieces "
                              "under sharded/); write it as an HF directory with skymoe export "
                              f"{d} OUT, or resume it with skymoe train --resume")
    raise CheckpointError(f"{d}: no weights found (looked for {SAFE_INDEX}, model.safetensors, "
                          f"{BIN_INDEX}, pytorch_model*.bin)")


def iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, read lazily where the format allows."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt "
                                  f"({exc}); re-download or re-save it") from None
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise CheckpointError(f"{file}: unreadable .bin file, truncated or corrupt "
                                  f"({exc})") from None
        state = _load_bin_without_mmap(file)
    except Exception as exc:  # pickle errors of every kind: refuse, never execute
        raise CheckpointError(f"{file}: {pickle_refusal(exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
    for name in list(state):
        yield name, state.pop(name)


def read_tensors(files: list[Path], wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors whose names satisfy ``wanted`` (small ones, such as FP8 scales) from the
    safetensors files among ``files``, without loading the others. ``.bin`` files are not
    searched (reading one means reading all of it; FP8 checkpoints are safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for file in (f for f in files if f.suffix == ".safetensors"):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if wanted(name):
                        out[name] = f.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file, truncated or "
                                  f"corrupt ({exc}); re-download or re-save it") from None
    return out


def _load_bin_without_mmap(file: Path) -> dict:
    # Legacy (pre-zipfile) .bin files cannot be memory-mapped.
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: {pickle_refusal(exc)}") from None


def pickle_refusal(exc: BaseException) -> str:
    """One line for a ``.bin`` that ``torch.load(weights_only=True)`` refused: the object it
    would have had to create, and the safe way on (never loading it with code execution)."""
    text = str(exc)
    found = re.search(r"unsupported (?:global: )?GLOBAL \S+", text, re.IGNORECASE)
    if found:
        return (f"refused: it holds pickled objects other than tensors ({found.group(0)}), "
                "which would run code when loaded; if you trust its source, convert it to "
                "safetensors with the tool that wrote it")
    # torch's own lines around the reason advise weights_only=False: unsafe, left out.
    reasons = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(
        ("Weights only load failed", "Check the documentation"))]
    return ("cannot be read as a weights-only PyTorch file, truncated or corrupt "
            f"({reasons[0] if reasons else type(exc).__name__})")


def tensor_infos(directory: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], Path]]:
    """dtype, shape and file of every tensor, from safetensors headers when possible."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...], Path]] = {}
    for file in weight_files(directory):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        out[name] = (_SAFE_DTYPES.get(sl.get_dtype(), sl.get_dtype()),
                                     tuple(sl.get_shape()), file)
            except SafetensorError as exc:
                raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
        else:
            for name, t in iter_tensors(file):
                out[name] = (t.dtype, tuple(t.shape), file)
    return out


_SAFE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F64": torch.float64, "I16": torch.int16}


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], directory: str | Path,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write tensors as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index.

    Shards are filled in order until ``max_shard_bytes``; each file is written under a temporary
    name and renamed into place, the index last, so a crash never leaves an index that points to
    half-written shards. Stale shards of an earlier save in the same directory are removed.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Only the shard being filled holds tensors: written shards keep their names alone, so
    # memory stays bounded by one shard however many tensors stream through.
    shard_names: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    tmp_files: list[Path] = []
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            tmp_files.append(_write_shard(current, d, len(tmp_files)))
            shard_names.append(list(current))
            current, size = {}, 0
        current[name] = t
        size += nbytes
        total += nbytes
    tmp_files.append(_write_shard(current, d, len(tmp_files)))
    shard_names.append(list(current))
    del current
    return _publish_shards(d, tmp_files, shard_names, total)


def write_streamed(specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                   tensor: Callable[[str], torch.Tensor], directory: str | Path,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   written: Callable[[int], None] | None = None) -> list[Path]:
    """``write_sharded`` for tensors known in advance by (name, shape, dtype) and produced one
    at a time by ``tensor(name)``: each shard's header is written first, then the tensors'
    bytes as they come, so memory holds one tensor, however large the shard. ``written``
    is told the bytes of each tensor written (a progress bar)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = total = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
        total += nbytes
    tmp_files = []
    for i, group in enumerate(groups):
        path = d / f".shard-{i:05d}.safetensors.tmp"
        with open(path, "wb") as f:
            f.write(_safetensors_header(group))
            for name, shape, dtype in group:
                t = tensor(name)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise CheckpointError(f"'{name}': produced {t.dtype} {list(t.shape)}, "
                                          f"announced {dtype} {list(shape)}")
                f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
                if written is not None:
                    written(t.numel() * t.element_size())
        tmp_files.append(path)
    return _publish_shards(d, tmp_files, [[name for name, _, _ in g] for g in groups], total)


_SAFE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def _safetensors_header(group: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding ``group`` in order
    (padded with spaces to 8 bytes, as safetensors itself writes it)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in group:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _publish_shards(d: Path, tmp_files: list[Path], shard_names: list[list[str]],
                    total: int) -> list[Path]:
    """Rename the written shards into place, remove stale ones, write the index last."""
    n = len(tmp_files)
    final = [d / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
             for i in range(n)]
    for tmp, dst in zip(tmp_files, final):
        os.replace(tmp, dst)
    keep = {p.name for p in final}
    for stale in list(d.glob("model*.safetensors")):
        if stale.name not in keep:
            stale.unlink()
    index_path = d / SAFE_INDEX
    if n == 1:
        index_path.unlink(missing_ok=True)
    else:
        weight_map = {name: dst.name for group, dst in zip(shard_names, final) for name in group}
        tmp = index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                  indent=2) + "\n")
        os.replace(tmp, index_path)
    return final


def _owns_storage(t: torch.Tensor) -> bool:
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _write_shard(group: dict[str, torch.Tensor], directory: Path, i: int) -> Path:
    path = directory / f".shard-{i:05d}.safetensors.tmp"
    # Expert slices share storage with their stacked parameter, which safetensors refuses:
    # those are copied (memory bounded by one shard); tensors that own their storage are not.
    save_file({k: v if _owns_storage(v) else v.clone() for k, v in group.items()}, str(path),
              metadata={"format": "pt"})
    return path

"""Safetensors header parsing and validation, without the ``safetensors`` package.

File layout: 8 bytes little-endian ``n`` (header length), ``n`` bytes of UTF-8 JSON, then the
data area. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data area) plus an optional ``"__metadata__"`` str -> str map.

Everything is checked before a tensor is read: header length in (0, 100 MB] and inside the file,
JSON object without duplicate keys, known dtype, non-negative integer shape,
``0 <= begin <= end <= data size``, ``end - begin == numel * itemsize`` and no two tensors
overlapping. Gaps between tensors are tolerated (harmless to a reader).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.errors import CheckpointError
from mergeforge.io.dtypes import ITEMSIZE, ST_TO_TORCH
from mergeforge.io.tensor_info import TensorInfo

HEADER_LIMIT = 100_000_000
FIX = "the file is truncated or corrupt; re-download or re-save it."


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file; ``tensors`` sorted by data offset."""

    path: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int


def _fail(path: Path, problem: str, fix: str = FIX) -> CheckpointError:
    return CheckpointError(f"cannot read safetensors file {path}: {problem}; {fix}")


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of the safetensors file at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint file {path} does not exist; check the path (and, for a sharded "
            "checkpoint, that every shard was downloaded)."
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint file {path}: {e.strerror}.") from None
    try:
        size = os.fstat(fd).st_size
        raw = _read_header_bytes(path, fd, size)
    finally:
        os.close(fd)
    data_start = 8 + len(raw)
    header = _decode_header(path, raw)
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    infos = [
        _parse_entry(path, name, entry, data_start, size - data_start)
        for name, entry in header.items()
    ]
    infos.sort(key=lambda t: (t.offset, t.offset + t.nbytes, t.name))
    _check_overlaps(path, infos)
    return SafetensorsHeader(path, tuple(infos), metadata, data_start)


def _read_header_bytes(path: Path, fd: int, size: int) -> bytes:
    if size < 8:
        raise _fail(path, f"it is {size} bytes long, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n == 0:
        raise _fail(path, "the header length is 0")
    if n > HEADER_LIMIT:
        raise _fail(path, f"the header length {n} exceeds the 100 MB limit")
    if n > size - 8:
        raise _fail(path, f"the header length {n} is larger than the {size - 8} bytes after it")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise _fail(path, f"only {len(raw)} of the {n} header bytes could be read")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _decode_header(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"the header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _fail(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _fail(path, "__metadata__ must be an object mapping strings to strings")
    return dict(value)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(
    path: Path, name: str, entry: object, data_start: int, data_size: int
) -> TensorInfo:
    def fail(problem: str, fix: str = FIX) -> CheckpointError:
        return _fail(path, f"tensor {name!r} {problem}", fix)

    if not isinstance(entry, dict):
        raise fail(f"is described by a JSON {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise fail(f"has no {key!r} field")
    dtype_name = entry["dtype"]
    if dtype_name not in ST_TO_TORCH:
        known = ", ".join(ST_TO_TORCH)
        raise fail(
            f"has unknown dtype {dtype_name!r} (known: {known})",
            "the file is corrupt or uses a dtype this torch build lacks; re-download it or "
            "re-save it with one of the known dtypes.",
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"has shape {shape!r}; a shape must be a list of non-negative integers")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise fail(f"has data_offsets {offsets!r}; they must be two integers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise fail(f"has data_offsets [{begin}, {end}]; need 0 <= begin <= end")
    if end > data_size:
        raise fail(
            f"has data_offsets [{begin}, {end}], ending beyond the {data_size}-byte data area"
        )
    dtype = ST_TO_TORCH[dtype_name]
    numel = math.prod(shape)
    expected = numel * ITEMSIZE[dtype]
    if end - begin != expected:
        raise fail(
            f"has data_offsets [{begin}, {end}] ({end - begin} bytes) but dtype {dtype_name} and "
            f"shape {shape} need {numel} x {ITEMSIZE[dtype]} = {expected} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_overlaps(path: Path, infos: list[TensorInfo]) -> None:
    """``infos`` sorted by offset: each non-empty tensor must start at or after the last end."""
    last_end, last_name = -1, ""
    for info in infos:
        if info.nbytes == 0:
            continue
        if info.offset < last_end:
            raise _fail(path, f"tensors {last_name!r} and {info.name!r} overlap in the data area")
        last_end, last_name = info.offset + info.nbytes, info.name

"""Sharded safetensors writer: headers first, then each tensor straight to its offset.

The layout is fixed before any tensor exists: :func:`plan_layout` assigns tensors to shards in
the given order (a new shard starts when the next tensor would push a non-empty shard past
``shard_size`` bytes), names the shards the Hugging Face way (``model.safetensors`` or
``model-00001-of-0000N.safetensors``) and orders each shard's data by item size, largest first,
so every tensor starts at a multiple of its item size (no padding: the format forbids gaps).

:class:`ShardedWriter` writes each header, preallocates each file, and then writes every tensor
with ``os.pwrite`` at its offset as it arrives, in any order and from any thread. Memory use is
one tensor, whatever the shard size. Same entries give byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from mergeforge.errors import OutputError
from mergeforge.io.dtypes import ITEMSIZE, st_name
from mergeforge.io.rawio import write_tensor
from mergeforge.io.side_files import write_json

Entry = tuple[str, torch.dtype, tuple[int, ...]]
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Slot:
    """Where one tensor goes: file, absolute byte offset, dtype, shape and size."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file_name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its name, header bytes, tensors (data order) and total size."""

    file_name: str
    header: bytes
    slots: tuple[Slot, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    @property
    def file_bytes(self) -> int:
        return 8 + len(self.header) + self.data_bytes


def entry_nbytes(entry: Entry) -> int:
    """Bytes of tensor data for ``(name, dtype, shape)``."""
    name, dtype, shape = entry
    st_name(dtype, tensor=name)  # error if safetensors cannot store it
    return math.prod(shape) * ITEMSIZE[dtype]


def plan_shards(entries: Sequence[Entry], shard_size: int) -> list[list[str]]:
    """Tensor names per shard, in the given order; a tensor larger than shard_size is alone."""
    if shard_size <= 0:
        raise OutputError(f"shard size must be a positive number of bytes, got {shard_size}.")
    shards: list[list[str]] = [[]]
    used = 0
    for entry in entries:
        n = entry_nbytes(entry)
        if shards[-1] and used + n > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(entry[0])
        used += n
    return shards


def shard_file_names(n: int) -> list[str]:
    """HF shard names: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors``."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def plan_layout(
    entries: Sequence[Entry], shard_size: int, metadata: dict[str, str] | None = None
) -> list[ShardPlan]:
    """Files, headers and tensor offsets for ``entries``: what :class:`ShardedWriter` writes."""
    _check_entries(entries, metadata)
    by_name = {e[0]: e for e in entries}
    groups = plan_shards(entries, shard_size)
    meta = {"format": "pt", **(metadata or {})}
    return [
        _shard(file_name, [by_name[n] for n in names], meta)
        for file_name, names in zip(shard_file_names(len(groups)), groups, strict=True)
    ]


def _check_entries(entries: Sequence[Entry], metadata: dict[str, str] | None) -> None:
    seen: set[str] = set()
    for name, _dtype, shape in entries:
        if not isinstance(name, str) or name == "__metadata__" or name in seen:
            raise OutputError(
                f"output tensor name {name!r} is invalid: names must be unique strings other "
                "than '__metadata__'."
            )
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise OutputError(f"output tensor {name!r} has invalid shape {shape!r}.")
        seen.add(name)
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise OutputError(f"safetensors metadata must map strings to strings, got {metadata!r}.")


def _shard(file_name: str, entries: list[Entry], meta: dict[str, str]) -> ShardPlan:
    order = sorted(range(len(entries)), key=lambda i: (-ITEMSIZE[entries[i][1]], i))
    header_obj: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    begins: list[tuple[Entry, int, int]] = []
    pos = 0
    for i in order:
        entry = entries[i]
        n = entry_nbytes(entry)
        name, dtype, shape = entry
        header_obj[name] = {
            "dtype": st_name(dtype, tensor=name),
            "shape": list(shape),
            "data_offsets": [pos, pos + n],
        }
        begins.append((entry, pos, n))
        pos += n
    header = json.dumps(header_obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    slots = tuple(
        Slot(name, dtype, tuple(shape), file_name, start + begin, n)
        for (name, dtype, shape), begin, n in begins
    )
    return ShardPlan(file_name, header, slots)


class ShardedWriter:
    """Write tensors into preallocated safetensors shards under ``directory``.

    ``write(name, tensor)`` may be called from several threads, in any order, once per entry;
    ``close()`` checks that every entry was written, fsyncs the files and writes
    ``model.safetensors.index.json`` when there is more than one shard. Use as a context manager:
    on an exception the files are closed without the checks (the caller discards the directory).
    """

    def __init__(
        self,
        directory: Path,
        entries: Sequence[Entry],
        shard_size: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.shards = plan_layout(entries, shard_size, metadata)
        self.slots = {s.name: s for shard in self.shards for s in shard.slots}
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._closed = False
        try:
            for shard in self.shards:
                self._fds[shard.file_name] = self._create(shard)
        except BaseException:
            self.abort()
            raise

    @property
    def file_names(self) -> list[str]:
        """The shard file names, in order."""
        return [s.file_name for s in self.shards]

    def _create(self, shard: ShardPlan) -> int:
        path = self.directory / shard.file_name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create output file {path}: {e.strerror}.") from None
        try:
            os.pwrite(fd, len(shard.header).to_bytes(8, "little") + shard.header, 0)
            _preallocate(fd, path, shard.file_bytes)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (dtype and shape must match its entry) at its place in its shard."""
        slot = self.slots.get(name)
        if slot is None:
            raise OutputError(f"cannot write tensor {name!r}: it is not among the planned outputs.")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise OutputError(
                f"cannot write tensor {name!r}: got dtype {tensor.dtype} shape "
                f"{tuple(tensor.shape)}, planned dtype {slot.dtype} shape {slot.shape}."
            )
        with self._lock:
            if self._closed:
                raise OutputError(f"cannot write tensor {name!r}: the writer is closed.")
            if name in self._written:
                raise OutputError(f"tensor {name!r} was written twice.")
            self._written.add(name)
            fd = self._fds[slot.file_name]
        data = tensor.detach().to("cpu").contiguous()  # same shape, dense CPU memory
        try:
            write_tensor(fd, data, slot.offset)
        except OSError as e:
            path = self.directory / slot.file_name
            raise OutputError(
                f"cannot write tensor {name!r} to {path}: {e.strerror}; free disk space or "
                "choose another output directory."
            ) from None

    def close(self) -> None:
        """Check every tensor was written, fsync the shards, write the index (if sharded)."""
        missing = [n for n in self.slots if n not in self._written]
        if missing:
            self.abort()
            shown = ", ".join(map(repr, missing[:5]))
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise OutputError(
                f"the output in {self.directory} is incomplete: {len(missing)} planned "
                f"tensor(s) were never written ({shown}{more})."
            )
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        try:
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        if len(self.shards) > 1:
            write_json(self.directory / INDEX_NAME, self.index())

    def index(self) -> dict[str, object]:
        """The ``model.safetensors.index.json`` content (sorted weight map, total tensor bytes)."""
        total = sum(s.nbytes for s in self.slots.values())
        weight_map = {n: self.slots[n].file_name for n in sorted(self.slots)}
        return {"metadata": {"total_size": total}, "weight_map": weight_map}

    def abort(self) -> None:
        """Close the files without checks (after an error; the caller discards them)."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.abort()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _preallocate(fd: int, path: Path, size: int) -> None:
    """Reserve ``size`` bytes (fails early when the disk is full); sparse where unsupported."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise OutputError(
                    f"not enough disk space for {path} ({size} bytes); free disk space or "
                    "choose another output directory."
                ) from None
    os.ftruncate(fd, size)

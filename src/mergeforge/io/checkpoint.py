"""``Checkpoint``: a model's weights as named tensors, read one at a time on demand.

Opening a checkpoint parses every safetensors header (or unpickles every torch shard with
``weights_only=True``, memory-mapped) and validates it, so shapes and dtypes are known before
any tensor bytes are read. ``read(name)`` then costs one positional read into a fresh buffer;
it is thread-safe, so a prefetcher may read several tensors at once.
"""

from __future__ import annotations

import difflib
import json
import os
import threading
from pathlib import Path
from types import TracebackType

import torch

from mergeforge.errors import CheckpointError
from mergeforge.io.bin_reader import load_torch_file
from mergeforge.io.discover import Format, WeightFiles, find_weight_files
from mergeforge.io.dtypes import ITEMSIZE
from mergeforge.io.rawio import read_bytes
from mergeforge.io.safetensors_reader import FIX, read_safetensors_header
from mergeforge.io.tensor_info import TensorInfo


class Checkpoint:
    """Named tensors of one model. Create with :func:`open_checkpoint`; close when done.

    Attributes: ``root`` (the directory or file given), ``format`` (``"safetensors"`` or
    ``"bin"``), ``tensors`` (name -> :class:`TensorInfo`, in file then offset order), ``files``
    (every weight file, sorted), ``index_path`` (the shard index, if any), ``config`` (parsed
    ``config.json`` next to the weights, or None) and ``config_path``.
    """

    def __init__(
        self,
        found: WeightFiles,
        tensors: dict[str, TensorInfo],
        state: dict[str, torch.Tensor] | None,
    ) -> None:
        self.root: Path = found.root
        self.format: Format = found.format
        self.tensors: dict[str, TensorInfo] = tensors
        self.files: tuple[Path, ...] = found.files
        self.index_path: Path | None = found.index_path
        self.config_path: Path | None = None
        self.config: dict | None = None
        config_path = found.config_dir / "config.json"
        if config_path.is_file():
            self.config_path = config_path
            self.config = _read_config(config_path)
        self._state = state  # bin checkpoints: name -> (memory-mapped) tensor
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, {len(self.tensors)} tensors, {self.format})"

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of ``name``; ``CheckpointError`` naming close matches if absent."""
        try:
            return self.tensors[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.tensors, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise CheckpointError(
                f"checkpoint {self.root} has no tensor {name!r} ({len(self.tensors)} tensors).{hint}"
            ) from None

    def read(self, name: str) -> torch.Tensor:
        """A new contiguous CPU tensor (owning its memory) holding the tensor ``name``."""
        info = self.info(name)
        if self._closed:
            raise CheckpointError(f"checkpoint {self.root} was closed before reading {name!r}.")
        if self._state is not None:
            src = self._state[name]
            return torch.empty(src.shape, dtype=src.dtype).copy_(src)
        buf, got = read_bytes(self._fd(info.file), info.offset, info.nbytes)  # (nbytes,) uint8
        if got != info.nbytes:
            raise CheckpointError(
                f"cannot read tensor {name!r} from {info.file}: only {got} of {info.nbytes} bytes "
                f"at offset {info.offset} could be read (the file shrank after it was opened); "
                f"{FIX}"
            )
        return buf.view(info.dtype).reshape(info.shape)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:
            if self._closed:
                raise CheckpointError(f"checkpoint {self.root} was closed.")
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(
                        f"cannot open checkpoint file {file}: {e.strerror}; it was readable when "
                        "the checkpoint was opened: check that it was not moved or deleted."
                    ) from None
            return self._fds[file]

    def close(self) -> None:
        """Close the open files and drop memory-mapped state; safe to call twice."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
            self._state = None
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open the checkpoint at ``path``: an HF model directory or one weight file.

    Directory layouts, in order of preference: ``model.safetensors.index.json`` + shards,
    ``model.safetensors``, loose ``*.safetensors`` shards, ``pytorch_model.bin.index.json`` +
    shards, ``pytorch_model.bin``. Files: ``.safetensors``, ``.bin``, ``.pt``, ``.pth``. Every
    header is validated here; problems raise ``CheckpointError`` naming the file and tensor.
    """
    found = find_weight_files(Path(path).expanduser().absolute())
    if found.format == "safetensors":
        return Checkpoint(found, _safetensors_tensors(found), None)
    tensors, state = _bin_tensors(found)
    return Checkpoint(found, tensors, state)


def _safetensors_tensors(found: WeightFiles) -> dict[str, TensorInfo]:
    per_file = {f: read_safetensors_header(f).tensors for f in found.files}
    if found.weight_map is None:
        return _merge_unindexed(found, {f: [(t.name, t) for t in ts] for f, ts in per_file.items()})
    wanted = _names_by_file(found)
    out: dict[str, TensorInfo] = {}
    for file, infos in per_file.items():
        names = wanted[file]
        _check_index_names(found, file, names, {t.name for t in infos})
        out.update((t.name, t) for t in infos if t.name in names)
    return out


def _bin_tensors(found: WeightFiles) -> tuple[dict[str, TensorInfo], dict[str, torch.Tensor]]:
    per_file = {f: load_torch_file(f) for f in found.files}
    if found.weight_map is not None:
        wanted = _names_by_file(found)
        for file, sd in per_file.items():
            _check_index_names(found, file, wanted[file], set(sd))
            per_file[file] = {k: v for k, v in sd.items() if k in wanted[file]}
    pairs = {
        f: [(name, _bin_info(name, t, f)) for name, t in sd.items()] for f, sd in per_file.items()
    }
    tensors = _merge_unindexed(found, pairs)
    state = {name: t for sd in per_file.values() for name, t in sd.items()}
    return tensors, state


def _bin_info(name: str, t: torch.Tensor, file: Path) -> TensorInfo:
    nbytes = t.numel() * ITEMSIZE.get(t.dtype, t.element_size())
    return TensorInfo(name, t.dtype, tuple(t.shape), file, -1, nbytes)


def _names_by_file(found: WeightFiles) -> dict[Path, set[str]]:
    assert found.weight_map is not None
    out: dict[Path, set[str]] = {f: set() for f in found.files}
    for name, file in found.weight_map.items():
        out[file].add(name)
    return out


def _check_index_names(found: WeightFiles, file: Path, wanted: set[str], present: set[str]) -> None:
    missing = sorted(wanted - present)
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(
            f"shard index {found.index_path} says tensor(s) {shown} are in {file.name}, but that "
            "shard does not hold them; the index and shards come from different saves or a "
            "download is incomplete: re-download the model (index and shards together)."
        )


def _merge_unindexed(
    found: WeightFiles, per_file: dict[Path, list[tuple[str, TensorInfo]]]
) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for file in found.files:
        for name, info in per_file[file]:
            if name in out:
                raise CheckpointError(
                    f"tensor {name!r} is in both {out[name].file} and {file} under {found.root}; "
                    "a directory of shards must hold each tensor once: remove the extra file(s) "
                    "or add the model's index json."
                )
            out[name] = info
    return out


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"model config {path} cannot be parsed ({e}); re-download it or re-save the model."
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"model config {path} is not a JSON object; re-download it.")
    return config

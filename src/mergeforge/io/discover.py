"""Find the weight files of a checkpoint path and read its shard index.

A directory is searched in this order (safetensors preferred over torch pickles):

1. ``model.safetensors.index.json`` (sharded safetensors)
2. ``model.safetensors``
3. every ``*.safetensors`` file, sorted (shards without an index)
4. ``pytorch_model.bin.index.json`` (sharded torch pickles)
5. ``pytorch_model.bin``

A file is used as is: ``.safetensors``, or ``.bin``/``.pt``/``.pth`` for torch pickles. With an
index, its ``weight_map`` is the table of contents (as in mergekit): tensors a
shard holds but the index does not list are not part of the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mergeforge.errors import CheckpointError

Format = Literal["safetensors", "bin"]
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class WeightFiles:
    """Where a checkpoint's weights are: the files and, if sharded with an index, its map."""

    root: Path
    format: Format
    files: tuple[Path, ...]
    index_path: Path | None
    weight_map: dict[str, Path] | None
    config_dir: Path


def find_weight_files(path: Path) -> WeightFiles:
    """Locate the weight files for ``path`` (an HF model directory or a single weight file)."""
    if path.is_file():
        return _single_file(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint path {path} does not exist; give a local model directory or a "
            ".safetensors/.bin file (models are never downloaded)."
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is neither a file nor a directory.")
    return _directory(path)


def _single_file(path: Path) -> WeightFiles:
    if path.suffix == ".safetensors":
        fmt: Format = "safetensors"
    elif path.suffix in TORCH_SUFFIXES:
        fmt = "bin"
    else:
        raise CheckpointError(
            f"checkpoint file {path} has an unknown extension {path.suffix!r}; allowed are "
            ".safetensors, .bin, .pt and .pth (or give the model directory)."
        )
    return WeightFiles(path, fmt, (path,), None, None, path.parent)


def _directory(path: Path) -> WeightFiles:
    st_index = path / "model.safetensors.index.json"
    if st_index.is_file():
        return _indexed(path, st_index, "safetensors")
    if (path / "model.safetensors").is_file():
        return WeightFiles(path, "safetensors", (path / "model.safetensors",), None, None, path)
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        return WeightFiles(path, "safetensors", tuple(shards), None, None, path)
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return _indexed(path, bin_index, "bin")
    if (path / "pytorch_model.bin").is_file():
        return WeightFiles(path, "bin", (path / "pytorch_model.bin",), None, None, path)
    present = sorted(p.name for p in path.iterdir())[:20]
    raise CheckpointError(
        f"no weights found in directory {path}: expected model.safetensors, sharded "
        "model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin[.index.json]; "
        f"it holds {present or 'nothing'}. Point to the model directory that has the weights."
    )


def _indexed(path: Path, index_path: Path, fmt: Format) -> WeightFiles:
    weight_map = read_index(index_path)
    files = tuple(sorted(set(weight_map.values())))
    return WeightFiles(path, fmt, files, index_path, weight_map, path)


def read_index(index_path: Path) -> dict[str, Path]:
    """Parse a shard index (``{"weight_map": {tensor: shard_file}}``); check every shard exists."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"shard index {index_path} cannot be parsed ({e}); the file is truncated or corrupt; "
            "re-download it or re-save the model."
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"shard index {index_path} has no 'weight_map' object mapping tensor names to shard "
            "file names; the file is truncated or corrupt; re-download it or re-save the model."
        )
    if not weight_map:
        raise CheckpointError(
            f"shard index {index_path} has an empty 'weight_map'; re-download it or re-save the "
            "model."
        )
    resolved = {name: index_path.parent / shard for name, shard in weight_map.items()}
    missing = sorted(
        {str(p.relative_to(index_path.parent)) for p in resolved.values() if not p.is_file()}
    )
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(
            f"shard index {index_path} names shard file(s) that do not exist: {shown}; the "
            "download is incomplete: download the missing shards (or the whole model) again."
        )
    return resolved

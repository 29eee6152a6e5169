"""Write in-memory tensors as a model directory with the writer ``mergeforge merge`` uses.

Fusion algorithms produce their result in memory (a fused body's state, or an upscaled module's
tensors). ``write_state_dir`` writes it like a merge: safetensors shards planned up front and
written at their final offsets (``io.writer.ShardedWriter``), inside a temporary sibling that
becomes ``out_dir`` only when everything is written (``io.output_dir.atomic_output_dir``) — a
failure leaves no half-written output. Side files (config, tokenizer, JSON descriptions, the
model card) are written into the same temporary directory by the caller's ``extra`` callback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from mergeforge import __version__
from mergeforge.io.output_dir import atomic_output_dir
from mergeforge.io.side_files import copy_side_files
from mergeforge.io.writer import ShardedWriter

DEFAULT_SHARD_SIZE = 5 * 10**9


def write_tensors(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` (contiguous CPU copies) as safetensors shards into ``directory``; the
    shard file names."""
    cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in cpu.items()]
    meta = {"mergeforge": __version__, **(metadata or {})}
    with ShardedWriter(directory, entries, shard_size, metadata=meta) as writer:
        for name, t in cpu.items():
            writer.write(name, t)
    return writer.file_names


def write_state_dir(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    config_from: str | Path | None = None,
    json_files: Mapping[str, object] | None = None,
    card: str | None = None,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """``out_dir`` holding ``tensors`` (``model.safetensors`` or shards + index), the
    ``config.json``, tokenizer files and ``generation_config.json`` of ``config_from`` (a model
    directory), ``json_files`` (name → JSON-able object), ``README.md`` = ``card``, and whatever
    ``extra(tmp_dir)`` writes. Atomic: the directory appears complete or not at all."""
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        write_tensors(tmp, tensors, shard_size=shard_size)
        if config_from is not None:
            src = Path(config_from)
            if (src / "config.json").is_file():
                (tmp / "config.json").write_bytes((src / "config.json").read_bytes())
            copy_side_files(src, tmp)
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if extra is not None:
            extra(tmp)
    return out

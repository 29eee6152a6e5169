"""Checkpoints as named tensors: reading, sharded writing, atomic output, side files.

Reading: :func:`open_checkpoint` -> :class:`Checkpoint` (safetensors parsed and validated here,
read with positional reads; torch pickles loaded with ``weights_only=True``). Writing:
:class:`ShardedWriter` (headers first, tensors by ``pwrite``), :func:`plan_layout` /
:func:`plan_shards` to know the files without writing, :func:`atomic_output_dir` so the output
appears only when complete.
"""

from __future__ import annotations

from mergeforge.io.checkpoint import Checkpoint, open_checkpoint
from mergeforge.io.dtypes import ST_TO_TORCH, TORCH_TO_ST
from mergeforge.io.lora import AdaptedCheckpoint, is_adapter_dir
from mergeforge.io.model_card import render_model_card
from mergeforge.io.output_dir import (
    atomic_output_dir,
    clean_stale_siblings,
    install_signal_handlers,
)
from mergeforge.io.safetensors_reader import SafetensorsHeader, read_safetensors_header
from mergeforge.io.side_files import (
    SIDE_FILES,
    TOKENIZER_FILES,
    copy_side_files,
    sha256_file,
    write_json,
)
from mergeforge.io.tensor_info import TensorInfo
from mergeforge.io.writer import (
    INDEX_NAME,
    ShardedWriter,
    ShardPlan,
    Slot,
    entry_nbytes,
    plan_layout,
    plan_shards,
    shard_file_names,
)

__all__ = [
    "INDEX_NAME",
    "SIDE_FILES",
    "ST_TO_TORCH",
    "TOKENIZER_FILES",
    "TORCH_TO_ST",
    "AdaptedCheckpoint",
    "Checkpoint",
    "SafetensorsHeader",
    "ShardPlan",
    "ShardedWriter",
    "Slot",
    "TensorInfo",
    "atomic_output_dir",
    "clean_stale_siblings",
    "copy_side_files",
    "entry_nbytes",
    "install_signal_handlers",
    "is_adapter_dir",
    "open_checkpoint",
    "plan_layout",
    "plan_shards",
    "read_safetensors_header",
    "render_model_card",
    "sha256_file",
    "shard_file_names",
    "write_json",
]

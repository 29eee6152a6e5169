"""``TensorInfo``: where one named tensor lives, known before any of its bytes are read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype, shape and location of one tensor in a checkpoint file.

    ``offset`` is the absolute byte offset of the tensor data in ``file`` (safetensors), or -1
    for torch pickles (``.bin``/``.pt``), whose data location is not exposed. ``nbytes`` is
    ``numel * itemsize``.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-dim tensor, 0 for an empty one)."""
        return math.prod(self.shape)

"""Positional reads and writes straight between a file and a tensor's memory.

``os.preadv``/``os.pwrite`` take the file offset as an argument, so several threads may use one
file descriptor at once. The tensor's memory is exposed to them as a ctypes buffer: no
intermediate ``bytes`` object, no copy.
"""

from __future__ import annotations

import ctypes
import os

import torch

# Linux transfers at most 0x7FFFF000 bytes per read/write call; ask for chunks of at most 1 GiB.
_CHUNK = 1 << 30


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview of the memory of contiguous CPU tensor ``t``."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; returns the bytes read (short only at EOF)."""
    done = 0
    total = len(view)
    while done < total:
        chunk = view[done : min(total, done + _CHUNK)]
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [chunk], offset + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(chunk), offset + done)
            n = len(data)
            chunk[:n] = data
        if n == 0:
            break
        done += n
    return done


def read_bytes(fd: int, offset: int, nbytes: int) -> tuple[torch.Tensor, int]:
    """Read ``nbytes`` at ``offset`` into a new uint8 tensor; returns it and the count read."""
    buf = torch.empty(nbytes, dtype=torch.uint8)  # (nbytes,)
    return buf, _pread_into(fd, _byte_view(buf), offset)


def write_tensor(fd: int, t: torch.Tensor, offset: int) -> None:
    """Write the bytes of contiguous CPU tensor ``t`` to ``fd`` at ``offset``."""
    view = _byte_view(t)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _CHUNK], offset + done)

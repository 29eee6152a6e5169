"""Per-tensor random generators, so that a stochastic merge does not depend on tensor order.

A tensor's generator is seeded from ``(seed, tensor name)`` only: streamed, chunked, parallel and
in-memory runs draw the same numbers for the same tensor.
"""

from __future__ import annotations

import hashlib

import torch

_SEED_MASK = (1 << 63) - 1


def derive_seed(seed: int, tensor_name: str) -> int:
    """63-bit seed: the first 8 bytes (big-endian) of ``sha256(f"{seed}:{tensor_name}")``."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & _SEED_MASK


def seeded_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, tensor_name)``."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, tensor_name))

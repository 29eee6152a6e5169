"""Exact order statistics of per-model value streams, in two passes and bounded memory.

Whole-model statistics (the r-th smallest |δ| of a model over all its tensors, a quantile of a
score) must not hold the model in memory. Each float32 value maps to a 32-bit key that orders
like the value (``float_keys``); pass 1 counts the high 16 bits of every key, which fixes the
bucket holding each wanted rank; pass 2 counts the low 16 bits inside those buckets only. Memory:
two 65,536-bin histograms per model and wanted bucket. Ranks are 1-based over the values seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BINS = 1 << 16
HALF = 1 << 31
Visit = Callable[[int, torch.Tensor], None]
Scan = Callable[[Visit], None]
"""A scan calls ``visit(model_index, keys)`` for every chunk of every model's values."""


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2³²) of the float32 values of ``x`` (flattened), ordered like them.

    Non-negative floats keep their bit pattern (offset by 2³¹); negative ones have their magnitude
    bits reversed so that more negative gives a smaller key.
    """
    bits = x.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64)  # (n,)
    mag = bits & (HALF - 1)
    return torch.where(bits < 0, HALF - 1 - mag, HALF + mag)


def key_value(key: int) -> float:
    """The float32 value of a key made by ``float_keys``."""
    bits = key - HALF if key >= HALF else (HALF - 1 - key) | HALF
    signed = bits - (1 << 32) if bits >= HALF else bits
    return float(torch.tensor([signed], dtype=torch.int32).view(torch.float32))


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bucket holding the ``rank``-th smallest (1-based) and the rank within that bucket."""
    cum = torch.cumsum(counts, 0)
    bucket = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype)))
    before = int(cum[bucket - 1]) if bucket > 0 else 0
    return bucket, rank - before


def totals(scan: Scan, k: int) -> list[int]:
    """Number of values of each of ``k`` models (one pass)."""
    n = [0] * k

    def visit(i: int, keys: torch.Tensor) -> None:
        n[i] += keys.numel()

    scan(visit)
    return n


def select(scan: Scan, ranks: Sequence[Sequence[int]]) -> list[list[float]]:
    """``out[i][j]`` = the ``ranks[i][j]``-th smallest value of model ``i`` (exact; two passes).

    Every rank must be in ``[1, n_i]``.
    """
    k = len(ranks)
    hi = torch.zeros(k, BINS, dtype=torch.int64)
    scan(lambda i, keys: hi[i].add_(torch.bincount(keys >> 16, minlength=BINS).cpu()))
    found = [[_locate(hi[i], r) for r in ranks[i]] for i in range(k)]
    buckets = [sorted({b for b, _ in found[i]}) for i in range(k)]
    lo = [{b: torch.zeros(BINS, dtype=torch.int64) for b in buckets[i]} for i in range(k)]

    def visit_lo(i: int, keys: torch.Tensor) -> None:
        top = keys >> 16
        for b, counts in lo[i].items():
            counts.add_(torch.bincount(keys[top == b] & (BINS - 1), minlength=BINS).cpu())

    scan(visit_lo)
    out = []
    for i in range(k):
        row = []
        for b, r in found[i]:
            low, _ = _locate(lo[i][b], r)
            row.append(key_value((b << 16) | low))
        out.append(row)
    return out

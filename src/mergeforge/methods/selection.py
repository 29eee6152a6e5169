"""Exact k-th largest magnitude without sorting: the threshold of magnitude trimming.

``magnitude_threshold(x, d)`` returns the value t such that keeping ``|x| ≥ t`` keeps the top
``k = max(1, int(d · numel))`` entries (mergekit 0.1.5 ``sparsify.magnitude``; ties with t are kept).
A full sort (mergekit's ``argsort``) costs O(n log n) time and 8n bytes of indices; this costs a few
linear passes over chunks and O(√n)-ish extra memory:

1. ``sample_abs``: |x| at m pseudo-random positions (fixed seed, so the result is deterministic);
2. ``bracket``: sample order statistics ``[lo, hi]`` that hold the k-th largest with overwhelming
   probability (5 binomial standard deviations each side);
3. ``count_and_collect``: one chunked pass counts entries ``> hi`` and collects those in ``[lo, hi]``;
4. ``select_in_bracket``: the exact answer is the ``(k − above)``-th largest candidate.

If the bracket misses (step 4 returns ``None``), ``torch.kthvalue`` over all of |x| gives the answer,
so the result is always exact; only the speed depends on the sample. Inputs must be finite: NaN
entries are never counted.

``model_magnitude_threshold`` does the same over a whole model's task vector, streamed tensor by
tensor (TIES-paper trimming, ``trim_scope: model``): one pass samples, one counts and collects; on a
miss, count-only passes bisect the float bit pattern until the bracket is small (exact, and still
only O(√n) memory).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

SAMPLE_MIN, SAMPLE_MAX = 1 << 10, 1 << 17
"""Bounds of the sample size m ≈ n^(2/3), which balances sorting the sample (m log m) against
selecting among the ~10·n/√m candidates it leaves."""

DIRECT_MAX = 1 << 15
"""Tensors up to this many elements use ``torch.kthvalue`` directly (as fast as sampling)."""

SAMPLE_SEED = 0x6D657267
"""Seed of the private generator that picks sample positions (never the global RNG)."""

SELECT_CHUNK = 1 << 18
"""Elements per chunk in the counting pass."""

MODEL_SAMPLE_MAX = 1 << 22
"""Sample size cap for a whole model (16 MiB of samples)."""

COLLECT_LIMIT = 1 << 24
"""Most candidates the bisection fallback collects at once (64 MiB)."""

TaskVectors = Callable[[], Iterable[tuple[Tensor, Tensor | None]]]
"""Yields one model's ``(x, base)`` tensor pairs (base may be ``None``: x is the task vector);
every call yields the same pairs in the same order."""


def keep_count(numel: int, density: float) -> int:
    """Entries a magnitude trim keeps: 0 if ``d ≤ 0`` or empty, all if ``d ≥ 1``, else
    ``max(1, int(d · numel))`` (mergekit 0.1.5: a positive density keeps at least one entry)."""
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    return min(numel, max(1, int(density * numel)))


def magnitude_threshold(x: Tensor, density: float, *, base: Tensor | None = None) -> float:
    """The t with ``|δ| ≥ t`` selecting the top ``keep_count(numel, d)`` entries of ``δ = x − base``.

    ``base`` (optional, same shape) lets a caller trim a task vector without materialising it.
    Returns ``0.0`` when everything is kept and ``inf`` when nothing is (``d ≤ 0``).
    """
    n = x.numel()
    k = keep_count(n, density)
    if k == 0:
        return math.inf
    if k == n:
        return 0.0
    flat = x.reshape(-1)  # (n,)
    flat_base = None if base is None else base.reshape(-1)  # (n,)
    if n <= DIRECT_MAX:
        return _exact_kth_largest(flat, flat_base, k)
    lo, hi = bracket(sample_abs(flat, flat_base, sample_size(n)), k / n)
    above, candidates = count_and_collect(flat, flat_base, lo, hi)
    t = select_in_bracket(above, candidates, k)
    return _exact_kth_largest(flat, flat_base, k) if t is None else t


def sample_size(n: int) -> int:
    """Sample size for an n-element population: ``n^(2/3)`` within ``[SAMPLE_MIN, SAMPLE_MAX]``."""
    return int(min(max(n ** (2.0 / 3.0), SAMPLE_MIN), SAMPLE_MAX))


def _abs_delta(x: Tensor, base: Tensor | None) -> Tensor:
    return x.abs() if base is None else (x - base).abs_()


def _exact_kth_largest(flat: Tensor, flat_base: Tensor | None, k: int) -> float:
    """k-th largest of ``|x − base|`` by ``torch.kthvalue`` (the (n − k + 1)-th smallest)."""
    a = _abs_delta(flat, flat_base)  # (n,)
    return float(torch.kthvalue(a, a.numel() - k + 1).values)


def sample_abs(flat: Tensor, flat_base: Tensor | None, size: int) -> Tensor:
    """``|x − base|`` at ``size`` positions drawn uniformly with replacement (fixed seed)."""
    gen = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED)
    idx = torch.randint(flat.numel(), (size,), generator=gen).to(flat.device)  # (size,)
    picked = flat[idx]  # (size,)
    return picked.abs() if flat_base is None else (picked - flat_base[idx]).abs_()


def bracket(sample: Tensor, q: float, sigmas: float = 5.0) -> tuple[float, float]:
    """``(lo, hi)`` from a sample of |x| so that the population's top-q quantile lies in it.

    With m samples, the number at or above the true threshold is Binomial(m, q); we step
    ``sigmas · √(m q (1 − q)) + 8`` ranks either side of ``q · m``. ``hi = inf`` or ``lo = 0``
    when the step runs off the sample.
    """
    s = torch.sort(sample, descending=True).values  # (m,)
    m = s.numel()
    margin = sigmas * math.sqrt(m * q * (1.0 - q)) + 8.0
    j_hi = math.floor(q * m - margin)
    j_lo = math.ceil(q * m + margin)
    hi = float(s[j_hi]) if j_hi >= 0 else math.inf
    lo = float(s[j_lo]) if j_lo < m else 0.0
    return lo, hi


def count_and_collect(
    flat: Tensor, flat_base: Tensor | None, lo: float, hi: float
) -> tuple[int, Tensor]:
    """One chunked pass: the count of ``|x − base| > hi`` and the values in ``[lo, hi]``."""
    above = 0
    parts: list[Tensor] = []
    for start in range(0, flat.numel(), SELECT_CHUNK):
        end = start + SELECT_CHUNK
        a = _abs_delta(flat[start:end], None if flat_base is None else flat_base[start:end])
        above += int(torch.count_nonzero(a > hi))
        inside = a >= lo  # (chunk,) bool
        inside &= a <= hi
        parts.append(a[inside])
    return above, torch.cat(parts) if parts else flat.new_empty(0)


def select_in_bracket(above: int, candidates: Tensor, k: int) -> float | None:
    """The k-th largest overall given ``above`` entries beyond the bracket and its ``candidates``;
    ``None`` when the k-th largest is not among the candidates (the bracket missed)."""
    need = k - above
    if need <= 0 or need > candidates.numel():
        return None
    return float(torch.kthvalue(candidates, candidates.numel() - need + 1).values)


def model_magnitude_threshold(source: TaskVectors, numel: int, density: float) -> float:
    """The t with ``|δ| ≥ t`` keeping the top ``keep_count(numel, d)`` entries of a whole model's
    task vector ``δ`` (the concatenation of ``x − base`` over ``source()``; ``numel`` elements).

    Calls ``source()`` twice (more only if the sampled bracket misses). Memory: the sample and the
    candidates, never the concatenated vector.
    """
    k = keep_count(numel, density)
    if k == 0:
        return math.inf
    if k == numel:
        return 0.0
    m = int(min(max(numel ** (2.0 / 3.0), SAMPLE_MIN), MODEL_SAMPLE_MAX))
    samples = [
        sample_abs(x.reshape(-1), _flat(b), round(x.numel() * m / numel))
        for x, b in source()
        if round(x.numel() * m / numel) > 0
    ]
    lo, hi = bracket(torch.cat(samples), k / numel) if samples else (0.0, math.inf)
    above, candidates = _collect_many(source, lo, hi)
    t = select_in_bracket(above, candidates, k)
    if t is not None:
        return t
    if above >= k:  # the threshold is above hi
        return _bisect_threshold(source, k, hi, _max_abs(source))
    return _bisect_threshold(source, k, 0.0, lo)


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1)


def _collect_many(source: TaskVectors, lo: float, hi: float) -> tuple[int, Tensor]:
    above, parts = 0, []
    for x, b in source():
        n_above, inside = count_and_collect(x.reshape(-1), _flat(b), lo, hi)
        above += n_above
        parts.append(inside)
    return above, torch.cat(parts) if parts else torch.empty(0)


def _counts(source: TaskVectors, lo: float, mid: float, hi: float) -> tuple[int, int, int]:
    """One pass: ``(#|δ| ≥ lo, #|δ| ≥ mid, #|δ| > hi)``."""
    ge_lo = ge_mid = gt_hi = 0
    for x, b in source():
        flat, flat_b = x.reshape(-1), _flat(b)
        for start in range(0, flat.numel(), SELECT_CHUNK):
            sl = slice(start, start + SELECT_CHUNK)
            a = _abs_delta(flat[sl], None if flat_b is None else flat_b[sl])
            ge_lo += int(torch.count_nonzero(a >= lo))
            ge_mid += int(torch.count_nonzero(a >= mid))
            gt_hi += int(torch.count_nonzero(a > hi))
    return ge_lo, ge_mid, gt_hi


def _max_abs(source: TaskVectors) -> float:
    pairs = source()
    return max(
        (float(_abs_delta(x.reshape(-1), _flat(b)).max()) for x, b in pairs if x.numel()),
        default=0.0,
    )


def _bits(v: float) -> int:
    """The int32 bit pattern of a non-negative float32: monotonic in the value."""
    return struct.unpack("<i", struct.pack("<f", v))[0]


def _from_bits(i: int) -> float:
    return struct.unpack("<f", struct.pack("<i", i))[0]


def _bisect_threshold(source: TaskVectors, k: int, lo: float, hi: float) -> float:
    """Exact fallback. Invariant: ``#|δ| ≥ lo ≥ k > #|δ| > hi``. Halve ``[lo, hi]`` over float32
    bit patterns (≤ 32 count passes) until it holds few entries, then collect and select."""
    while True:
        mid = _from_bits((_bits(lo) + _bits(hi)) // 2)
        ge_lo, ge_mid, gt_hi = _counts(source, lo, mid, hi)
        if ge_lo - gt_hi <= COLLECT_LIMIT or mid in (lo, hi):
            break
        lo, hi = (mid, hi) if ge_mid >= k else (lo, mid)
    if ge_lo - gt_hi > COLLECT_LIMIT:  # lo and hi are adjacent floats: every entry is one of them
        return hi if _counts(source, hi, hi, hi)[0] >= k else lo
    above, candidates = _collect_many(source, lo, hi)
    t = select_in_bracket(above, candidates, k)
    assert t is not None, "bisection invariant broken"
    return t

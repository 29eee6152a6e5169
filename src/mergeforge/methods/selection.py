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
"""

from __future__ import annotations

import math

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
    return magnitude_cut(x, density, base=base)[0]


def magnitude_cut(x: Tensor, density: float, *, base: Tensor | None = None) -> tuple[float, int]:
    """``(t, m)``: the threshold of ``magnitude_threshold`` and how many entries have ``|δ| ≥ t``.

    ``m`` exceeds ``keep_count(numel, d)`` exactly when entries tied with ``t`` straddle the cut.
    """
    n = x.numel()
    k = keep_count(n, density)
    if k == 0:
        return math.inf, 0
    if k == n:
        return 0.0, n
    flat = x.reshape(-1)  # (n,)
    flat_base = None if base is None else base.reshape(-1)  # (n,)
    if n > DIRECT_MAX:
        lo, hi = bracket(sample_abs(flat, flat_base, sample_size(n)), k / n)
        above, candidates = count_and_collect(flat, flat_base, lo, hi)
        t = select_in_bracket(above, candidates, k)
        if t is not None:
            return t, above + int(torch.count_nonzero(candidates >= t))
    a = _abs_delta(flat, flat_base)  # (n,)
    t = float(torch.kthvalue(a, n - k + 1).values)
    return t, int(torch.count_nonzero(a >= t))


def first_k_mask(x: Tensor, k: int, t: float, *, base: Tensor | None = None) -> Tensor:
    """Bool mask (flat) of exactly the k largest ``|x − base|`` given their threshold ``t``: all
    entries above ``t``, then the tied entries equal to ``t`` with the lowest flat indices."""
    a = _abs_delta(x.reshape(-1), None if base is None else base.reshape(-1))  # (n,)
    mask = a > t  # (n,)
    need = k - int(torch.count_nonzero(mask))
    if need > 0:
        tied = torch.nonzero(a == t).squeeze(1)[:need]  # (need,) lowest indices first
        mask[tied] = True
    return mask


def top_k_mask(x: Tensor, k: int, *, base: Tensor | None = None) -> Tensor:
    """Bool mask (flat) of exactly the k largest ``|x − base|``, chosen as mergekit 0.1.5 chooses
    them: ``argsort(|δ|, descending=True)[:k]`` on fp32. Among entries tied at the cut that sort
    (not stable, but deterministic for the same values) decides; used only when ties straddle it.
    """
    flat = x.reshape(-1)
    a = _abs_delta(flat, None if base is None else base.reshape(-1)).float()  # (n,) our copy
    order = torch.empty(a.numel(), dtype=torch.int64, device=a.device)  # (n,)
    torch.sort(a, descending=True, out=(a, order))  # = argsort(|δ|), sorting a in place
    del a
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)  # (n,)
    mask[order[:k]] = True
    return mask


def sample_size(n: int) -> int:
    """Sample size for an n-element population: ``n^(2/3)`` within ``[SAMPLE_MIN, SAMPLE_MAX]``."""
    return int(min(max(n ** (2.0 / 3.0), SAMPLE_MIN), SAMPLE_MAX))


def _abs_delta(x: Tensor, base: Tensor | None) -> Tensor:
    return x.abs() if base is None else (x - base).abs_()


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

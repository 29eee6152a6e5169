"""The magnitude threshold: exact k-th largest |x| by sampling, against torch.kthvalue."""

from __future__ import annotations

import math

import pytest
import torch

import mergeforge.methods.selection as sel
from mergeforge.methods.selection import keep_count, magnitude_threshold


def _kth_largest(x: torch.Tensor, k: int) -> float:
    a = x.abs().reshape(-1)
    return float(torch.kthvalue(a, a.numel() - k + 1).values)


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [
        (10, 0.5, 5),
        (10, 0.0, 0),
        (10, -0.2, 0),
        (10, 1.0, 10),
        (10, 1.7, 10),  # mergekit accepts density > 1: keep all
        (10, 0.05, 1),  # int(0.5) = 0, but a positive density keeps at least one (mergekit 0.1.5)
        (6, 0.34, 2),  # int(2.04)
        (30, 0.1, 3),  # 0.1 * 30 = 3.0000000000000004 in floating point: still 3
        (0, 0.5, 0),
    ],
)
def test_keep_count_follows_mergekit(numel: int, density: float, expected: int) -> None:
    assert keep_count(numel, density) == expected


def test_threshold_small_tensor_by_hand() -> None:
    x = torch.tensor([0.5, -4.0, 3.0, -1.0, 2.0, 0.25])
    assert magnitude_threshold(x, 0.5) == 2.0  # top 3 of |x|: 4, 3, 2
    assert magnitude_threshold(x, 0.1) == 4.0  # k = max(1, int(0.6)) = 1
    assert magnitude_threshold(x, 1.0) == 0.0
    assert magnitude_threshold(x, 0.0) == math.inf
    assert magnitude_threshold(torch.empty(0), 0.5) == math.inf


@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.9, 0.99999])
def test_sampling_path_is_exact(density: float) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(200_003, generator=g) * torch.rand(200_003, generator=g)
    k = keep_count(x.numel(), density)
    assert x.numel() > sel.DIRECT_MAX
    assert magnitude_threshold(x, density) == _kth_largest(x, k)


def test_base_argument_thresholds_the_difference() -> None:
    g = torch.Generator().manual_seed(12)
    x, b = torch.randn(300, 400, generator=g), torch.randn(300, 400, generator=g)
    assert magnitude_threshold(x, 0.3, base=b) == magnitude_threshold(x - b, 0.3)
    assert magnitude_threshold(x, 0.3, base=b) == _kth_largest(x - b, keep_count(120_000, 0.3))


def test_ties_are_kept_and_threshold_is_still_the_kth_value() -> None:
    g = torch.Generator().manual_seed(13)
    x = torch.randint(-50, 50, (100_000,), generator=g).float()  # heavy ties
    k = keep_count(x.numel(), 0.37)
    t = magnitude_threshold(x, 0.37)
    assert t == _kth_largest(x, k)
    assert int((x.abs() > t).sum()) < k <= int((x.abs() >= t).sum())


def test_bracket_miss_falls_back_to_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(14)
    x = torch.randn(100_000, generator=g)
    k = keep_count(x.numel(), 0.5)
    exact = _kth_largest(x, k)
    monkeypatch.setattr(sel, "bracket", lambda sample, q: (exact * 2, exact * 3))  # too high
    assert magnitude_threshold(x, 0.5) == exact
    monkeypatch.setattr(sel, "bracket", lambda sample, q: (0.0, exact / 2))  # too low
    assert magnitude_threshold(x, 0.5) == exact


def test_select_in_bracket_by_hand() -> None:
    candidates = torch.tensor([1.0, 3.0, 2.0])
    assert sel.select_in_bracket(2, candidates, 3) == 3.0  # 2 above, need the largest candidate
    assert sel.select_in_bracket(2, candidates, 5) == 1.0
    assert sel.select_in_bracket(5, candidates, 3) is None  # threshold is above the bracket
    assert sel.select_in_bracket(0, candidates, 4) is None  # threshold is below the bracket


def test_sample_is_deterministic_and_independent_of_global_rng() -> None:
    x = torch.randn(50_000)
    torch.manual_seed(1)
    a = sel.sample_abs(x, None, 1000)
    torch.manual_seed(2)
    assert torch.equal(a, sel.sample_abs(x, None, 1000))


def test_first_k_mask_takes_ties_in_index_order() -> None:
    from mergeforge.methods.selection import first_k_mask

    x = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, 3.0])
    mask = first_k_mask(x, 3, 2.0)  # 3 above-or-at: |3| then the first two |2|s
    assert mask.tolist() == [False, True, True, False, False, True]
    b = torch.full_like(x, 0.5)
    # |x − b| = [0.5, 2.5, 1.5, 0, 1.5, 2.5]: k = 1 at t = 2.5 keeps index 1, not 5
    assert first_k_mask(x, 1, 2.5, base=b).tolist() == [False, True, False, False, False, False]

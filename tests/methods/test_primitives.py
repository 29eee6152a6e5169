"""Hand-computed cases for the shared primitives (trim, drop, rescale, elect, merge, seeds)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods import derive_seed, seeded_generator
from mergeforge.methods.primitives import (
    check_inputs,
    chunk_slices,
    disjoint_mean,
    disjoint_merge,
    elect_sign,
    random_drop,
    rescale_inverse,
    rescale_l1,
    trim_below,
    trim_magnitude,
    weighted_sum,
)

T = torch.tensor


def test_trim_magnitude_by_hand() -> None:
    d = T([4.0, -3.0, 2.0, -1.0, 0.5, 0.0])
    assert torch.equal(trim_magnitude(d, 0.5), T([4.0, -3.0, 2.0, 0, 0, 0]))
    assert torch.equal(trim_magnitude(d, 0.1), T([4.0, 0, 0, 0, 0, 0]))  # keeps at least one
    assert torch.equal(trim_magnitude(d, 1.0), d)
    assert torch.equal(trim_magnitude(d, 0.0), torch.zeros(6))


def test_trim_keeps_every_entry_tied_with_the_threshold() -> None:
    d = T([3.0, -3.0, 3.0, 1.0])
    assert torch.equal(trim_magnitude(d, 0.5), T([3.0, -3.0, 3.0, 0.0]))


def test_trim_below_by_hand_and_pure() -> None:
    d = T([0.5, -2.0, 2.0, -2.5])
    assert torch.equal(trim_below(d, 2.0), T([0.0, -2.0, 2.0, -2.5]))
    assert torch.equal(d, T([0.5, -2.0, 2.0, -2.5]))  # argument untouched


def test_random_drop_draws_like_mergekit_and_masks() -> None:
    d = torch.arange(1.0, 11.0)
    masked, mask = random_drop(d, 0.5, torch.Generator().manual_seed(3))
    expected = torch.bernoulli(torch.full((10,), 0.5), generator=torch.Generator().manual_seed(3))
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected.bool())
    assert torch.equal(masked, d * expected)


def test_random_drop_density_one_draws_nothing() -> None:
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    masked, mask = random_drop(T([1.0, -2.0]), 1.0, g)
    assert torch.equal(masked, T([1.0, -2.0])) and bool(mask.all())
    assert torch.equal(g.get_state(), state)


def test_random_drop_density_zero_drops_all() -> None:
    masked, mask = random_drop(T([1.0, -2.0, 3.0]), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(masked, torch.zeros(3)) and not bool(mask.any())


def test_rescale_l1_by_hand() -> None:
    original = T([4.0, -3.0, 2.0, -1.0])  # L1 = 10
    masked = T([4.0, 0.0, 0.0, -1.0])  # L1 = 5
    assert torch.equal(rescale_l1(original, masked), T([8.0, 0.0, 0.0, -2.0]))
    tiny = T([1e-8, 0.0])  # L1 below 1e-7: left as is (mergekit)
    assert torch.equal(rescale_l1(tiny, T([1e-8, 0.0]) * 0.5), T([5e-9, 0.0]))
    assert torch.equal(rescale_l1(original, torch.zeros(4)), torch.zeros(4))


def test_rescale_inverse_by_hand() -> None:
    assert torch.equal(rescale_inverse(T([2.0, 0.0, -1.0]), 0.25), T([8.0, 0.0, -4.0]))
    assert torch.equal(rescale_inverse(T([2.0, 0.0]), 1.0), T([2.0, 0.0]))
    assert torch.equal(rescale_inverse(T([0.0, 0.0]), 0.0), T([0.0, 0.0]))


DELTAS = T(
    [
        [4.0, -3.0, 2.0, 0.0, 0.5, 0.0],
        [-5.0, 0.0, 3.0, -2.0, -0.5, 0.0],
        [0.0, -2.0, -4.0, 0.0, 2.0, 0.0],
    ]
)


def test_elect_sign_sum_and_count_by_hand() -> None:
    # sums: -1, -5, 1, -2, 2, 0 (zero counts as +1)
    assert torch.equal(elect_sign(DELTAS, "sum"), T([-1, -1, 1, -1, 1, 1], dtype=torch.int8))
    # sign counts: 0, -2, 1, -1, 1, 0 (zero counts as +1)
    assert torch.equal(elect_sign(DELTAS, "count"), T([1, -1, 1, -1, 1, 1], dtype=torch.int8))
    with pytest.raises(ValueError, match="sum"):
        elect_sign(DELTAS, "median")  # type: ignore[arg-type]


def test_disjoint_merge_by_hand() -> None:
    sign = elect_sign(DELTAS, "sum")
    # agreeing entries per column: {-5}, {-3,-2}, {2,3}, {-2}, {0.5,2}, {} -> sums and counts
    expected_sum = T([-5.0, -5.0, 5.0, -2.0, 2.5, 0.0])
    assert torch.equal(disjoint_merge(DELTAS, [1, 1, 1], sign, normalize=False), expected_sum)
    expected_mean = T([-5.0, -2.5, 2.5, -2.0, 1.25, 0.0])
    assert torch.equal(disjoint_merge(DELTAS, [1, 1, 1], sign, normalize=True), expected_mean)
    assert torch.equal(disjoint_mean(DELTAS, sign), expected_mean)


def test_disjoint_merge_divides_by_agreeing_weights() -> None:
    w = [2.0, 0.5, 1.0]
    weighted = DELTAS * T(w)[:, None]  # rows: 2·δ1, 0.5·δ2, δ3
    sign = elect_sign(weighted, "sum")  # sums: 5.5, -8, 1.5, -1, 2.75, 0
    assert torch.equal(sign, T([1, -1, 1, -1, 1, 1], dtype=torch.int8))
    # column 0: only 2·4 = 8 agrees, divisor 2 -> 4; column 1: (-6 - 2) / (2 + 1) = -8/3
    # column 2: (4 + 1.5) / 2.5 = 2.2; column 3: -1 / 0.5 = -2; column 4: (1 + 2) / 3 = 1; col 5: 0
    out = disjoint_merge(weighted, w, sign, normalize=True)
    torch.testing.assert_close(out, T([4.0, -8.0 / 3.0, 2.2, -2.0, 1.0, 0.0]))


def test_weighted_sum_by_hand() -> None:
    rows = T([[1.0, 2.0], [3.0, -4.0]])
    assert torch.equal(weighted_sum(rows, [1.0, 3.0], normalize=False), T([4.0, -2.0]))
    assert torch.equal(weighted_sum(rows, [1.0, 3.0], normalize=True), T([1.0, -0.5]))
    # weights summing to ~0: divisor replaced by 1 (mergekit)
    assert torch.equal(weighted_sum(rows, [1.0, -1.0], normalize=True), T([4.0, -2.0]))


def test_chunk_slices_cover_range() -> None:
    assert list(chunk_slices(10, 4)) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert list(chunk_slices(0, 4)) == []


def test_check_inputs_names_the_problem() -> None:
    with pytest.raises(MethodError, match=r"input 1 has shape \(3,\)"):
        check_inputs("m", [torch.zeros(2), torch.zeros(3)], None)
    with pytest.raises(MethodError, match="'weight' has 1 values for 2"):
        check_inputs("m", [torch.zeros(2), torch.zeros(2)], torch.zeros(2), weight=(1.0,))


def test_seeded_generator_is_sha256_of_seed_and_name() -> None:
    digest = hashlib.sha256(b"42:model.layers.0.mlp.up_proj.weight").digest()
    expected = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
    assert derive_seed(42, "model.layers.0.mlp.up_proj.weight") == expected
    a = torch.rand(5, generator=seeded_generator(42, "w"))
    assert torch.equal(a, torch.rand(5, generator=seeded_generator(42, "w")))
    assert not torch.equal(a, torch.rand(5, generator=seeded_generator(43, "w")))
    assert not torch.equal(a, torch.rand(5, generator=seeded_generator(42, "v")))

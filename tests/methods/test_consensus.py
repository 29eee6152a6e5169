"""TALL masks and consensus merging: hand-computed masks, properties, packing and recovery."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_calls import call_method

from mergeforge.errors import MethodError
from mergeforge.methods import consensus as cm
from mergeforge.methods.consensus import (
    CONSENSUS,
    TALL_ARTIFACTS,
    TALL_MASKS,
    pack_bits,
    recover,
    unpack_bits,
)
from mergeforge.methods.spec import MethodSpec

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

# Two task vectors over a zero base (worked by hand below):
#   τ1 = [1, 0,  2, 0, -1]      τ2 = [1, 3, -2, 0, 0]      τ_MTL = [2, 3, 0, 0, -1]
#   λ = 0.6:  m1 = |τ1| > 0.6|τ2| = [1 > .6, 0 > 1.8, 2 > 1.2, 0 > 0, 1 > 0] = [T, F, T, F, T]
#             m2 = |τ2| > 0.6|τ1| = [1 > .6, 3 > 0, 2 > 1.2, 0 > 0, 0 > .6] = [T, T, T, F, F]
#   count = [2, 1, 2, 0, 1]
T1 = [1.0, 0.0, 2.0, 0.0, -1.0]
T2 = [1.0, 3.0, -2.0, 0.0, 0.0]
M1 = [True, False, True, False, True]
M2 = [True, True, True, False, False]


def run(spec: MethodSpec, tensors: list[torch.Tensor], base: torch.Tensor, **params: Any):
    """Call the method as the engine does (``call_method``); extras such as ``artifacts`` pass."""
    return call_method(spec.name, tensors, base, **params)


def hand_case(offset: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = torch.full((5,), offset)
    return base, [base + torch.tensor(T1), base + torch.tensor(T2)]


def family(seed: int, k: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(k)]


# ---------------------------------------------------------------- hand-computed


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, [2.0, 3.0, 0.0, 0.0, -1.0]),  # task arithmetic
        (1, [2.0, 3.0, 0.0, 0.0, -1.0]),  # count ≥ 1 everywhere τ_MTL ≠ 0
        (2, [2.0, 0.0, 0.0, 0.0, 0.0]),  # only entry 0 (and 2, where τ_MTL = 0) kept
        (3, [0.0, 0.0, 0.0, 0.0, 0.0]),  # k > K: the base
    ],
)
def test_consensus_hand_computed(k: int, expected: list[float]) -> None:
    base, xs = hand_case(offset=0.5)
    out = run(CONSENSUS, xs, base, k=k)
    torch.testing.assert_close(out, base + torch.tensor(expected), rtol=0, atol=0)


def test_consensus_lambda_scales_the_kept_sum() -> None:
    base, xs = hand_case()
    out = run(CONSENSUS, xs, base, k=2, **{"lambda": 0.5})
    assert torch.equal(out, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))


def test_tall_masks_hand_computed_and_recovered() -> None:
    base, xs = hand_case(offset=0.5)
    merged, arts = run(TALL_MASKS, xs, base, artifacts=True)
    assert torch.equal(merged, base + torch.tensor([2.0, 3.0, 0.0, 0.0, -1.0]))
    assert torch.equal(unpack_bits(arts["masks"], 5), torch.tensor([M1, M2]))
    # MSB first: m1 = 10101000₂ = 168, m2 = 11100000₂ = 224
    assert arts["masks"].tolist() == [[168], [224]]
    assert torch.equal(arts["task_sum"], torch.tensor([2.0, 3.0, 0.0, 0.0, -1.0]))
    assert torch.equal(recover(arts, base, 0, {}), base + torch.tensor([2.0, 0, 0, 0, -1]))
    assert torch.equal(recover(arts, base, 1, {}), base + torch.tensor([2.0, 3, 0, 0, 0]))


def test_per_model_tall_lambda() -> None:
    """λ2 = 2: m2 = |τ2| > 2|τ1| = [1 > 2, 3 > 0, 2 > 4, 0 > 0, 0 > 2] = [F, T, F, F, F]."""
    base, xs = hand_case()
    _, arts = run(TALL_MASKS, xs, base, tall_lambda=(0.6, 2.0), artifacts=True)
    assert unpack_bits(arts["masks"], 5).tolist() == [M1, [False, True, False, False, False]]
    # count = [1, 1, 1, 0, 1]: k = 2 keeps nothing
    assert torch.equal(run(CONSENSUS, xs, base, tall_lambda=(0.6, 2.0)), base)


def test_strict_comparison_at_ties() -> None:
    """|τ_t| = λ|τ_MTL − τ_t| is off (FusionBench's `>`): τ1 = 1, τ2 = 2, λ1 = 0.5."""
    base = torch.zeros(1)
    _, arts = run(
        TALL_MASKS,
        [torch.ones(1), torch.full((1,), 2.0)],
        base,
        artifacts=True,
        tall_lambda=(0.5, 0.5),
    )
    assert unpack_bits(arts["masks"], 1).tolist() == [[False], [True]]


# ---------------------------------------------------------------- properties


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), k=st.integers(1, 4))
def test_zero_task_vectors_give_the_base(seed: int, n: int, k: int) -> None:
    base = family(seed, 0, (n,))[0]
    copies = [base.clone() for _ in range(k)]
    for kk in (0, 1, 2):
        assert torch.equal(run(CONSENSUS, copies, base, k=kk), base)
    merged, arts = run(TALL_MASKS, copies, base, artifacts=True)
    assert torch.equal(merged, base)
    assert all(torch.equal(recover(arts, base, i, {}), base) for i in range(k))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), lam=st.floats(-2.0, 2.0))
def test_single_model_with_k1_is_task_arithmetic(seed: int, n: int, lam: float) -> None:
    """One model: m = |τ| > λ_t·0, on wherever τ ≠ 0, so k = 1 gives b + λ τ."""
    base, (x,) = family(seed, 1, (n,))
    out = run(CONSENSUS, [x], base, k=1, **{"lambda": lam})
    torch.testing.assert_close(out, base + lam * (x - base), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 40),
    lams=st.lists(st.floats(0.0, 1.5), min_size=2, max_size=4),
    perm_seed=st.integers(0, 2**31 - 1),
    k=st.integers(0, 4),
)
def test_reordering_models_with_their_lambdas_changes_nothing(
    seed: int, n: int, lams: list[float], perm_seed: int, k: int
) -> None:
    base, xs = family(seed, len(lams), (n,))
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    out = run(CONSENSUS, xs, base, tall_lambda=tuple(lams), k=k)
    out_p = run(
        CONSENSUS, [xs[i] for i in perm], base, tall_lambda=tuple(lams[i] for i in perm), k=k
    )
    torch.testing.assert_close(out_p, out, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30), k=st.integers(1, 4))
def test_consensus_keeps_a_subset_of_task_arithmetic(seed: int, n: int, k: int) -> None:
    """Every entry of the consensus merge is the task-arithmetic entry or the base entry, and
    a larger k keeps no more entries."""
    base, xs = family(seed, 3, (n,))
    ta = run(CONSENSUS, xs, base, k=0)
    kept_prev = torch.ones(n, dtype=torch.bool)
    for kk in range(1, k + 1):
        out = run(CONSENSUS, xs, base, k=kk)
        kept = out != base
        assert bool(torch.where(kept, out == ta, out == base).all())
        assert bool((kept <= kept_prev).all())
        kept_prev = kept


# ---------------------------------------------------------------- packing


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 70), k=st.integers(1, 5))
def test_pack_unpack_round_trip_matches_numpy_packbits(seed: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(k, n, generator=g) < 0.5  # (k, n)
    packed = pack_bits(mask)
    assert packed.shape == (k, (n + 7) // 8) and packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=1))
    assert torch.equal(unpack_bits(packed, n), mask)
    assert torch.equal(unpack_bits(packed[0], n), mask[0])


def test_chunked_masks_equal_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 16 entries over 5 × 7 = 35 entries (the last chunk is partial)."""
    base, xs = family(3, 3, (5, 7))
    whole = run(CONSENSUS, xs, base, k=2, artifacts=True)
    monkeypatch.setattr(cm, "_CHUNK", 16)
    chunked = run(CONSENSUS, xs, base, k=2, artifacts=True)
    assert torch.equal(chunked[0], whole[0])
    assert all(torch.equal(chunked[1][key], whole[1][key]) for key in whole[1])


# ---------------------------------------------------------------- artifacts and recovery


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 3, 4)])
def test_artifacts_match_the_declared_shapes(shape: tuple[int, ...]) -> None:
    base, xs = family(1, 3, shape)
    for spec in (CONSENSUS, TALL_MASKS):
        merged, arts = run(spec, xs, base, artifacts=True, save_masks=True)
        assert torch.equal(merged, run(spec, xs, base, save_masks=True))
        want = TALL_ARTIFACTS.shapes(shape, 3, {})
        assert {key: (tuple(t.shape), t.dtype) for key, t in arts.items()} == want


def test_save_masks_enables_artifacts() -> None:
    assert TALL_ARTIFACTS.enabled({"save_masks": True})
    assert not TALL_ARTIFACTS.enabled({"save_masks": False})
    assert CONSENSUS.param("save_masks").default is False
    assert TALL_MASKS.param("save_masks").default is True


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), k=st.integers(1, 4))
def test_recover_is_base_plus_masked_task_sum(seed: int, n: int, k: int) -> None:
    base, xs = family(seed, k, (n,))
    _, arts = run(TALL_MASKS, xs, base, artifacts=True)
    deltas = torch.stack([x - base for x in xs])  # (k, n)
    tsum = deltas.sum(0)  # (n,)
    for i, x in enumerate(xs):
        mask = (base - x).abs() > ((base + tsum) - x).abs() * 0.6  # (n,)
        expected = base + torch.where(mask, tsum, 0.0)
        torch.testing.assert_close(recover(arts, base, i, {}), expected, rtol=1e-6, atol=1e-6)


def test_recover_is_exact_for_disjoint_task_vectors() -> None:
    """Task vectors on disjoint entries: τ_MTL = τ_i on model i's support, where m_i is on, and
    m_i is off elsewhere (|0| > λ|τ_j| fails), so every model comes back exactly."""
    base = torch.arange(12, dtype=torch.float32).view(3, 4) / 4
    xs = []
    for i in range(3):
        delta = torch.zeros(3, 4)
        delta[i] = torch.tensor([1.0, -2.0, 0.5, 3.0]) * (i + 1)
        xs.append(base + delta)
    _, arts = run(TALL_MASKS, xs, base, artifacts=True)
    for i, x in enumerate(xs):
        assert torch.equal(recover(arts, base, i, {}), x)


def test_recover_equals_the_model_where_its_mask_is_on_and_it_alone_moved() -> None:
    base, xs = family(7, 3, (50,))
    xs[1][:10] = base[:10]  # on entries 0–9 only model 0 and 2 move …
    xs[2][:5] = base[:5]  # … and on 0–4 only model 0
    _, arts = run(TALL_MASKS, xs, base, artifacts=True)
    mask0 = unpack_bits(arts["masks"][0], 50)
    assert bool(mask0[:5].all())
    torch.testing.assert_close(recover(arts, base, 0, {})[:5], xs[0][:5], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem() -> None:
    base, xs = hand_case()
    with pytest.raises(MethodError, match="base model"):
        run(CONSENSUS, xs, None)
    with pytest.raises(MethodError, match="tall_lambda"):
        CONSENSUS.fn(xs, base, tall_lambda=(0.6,), k=2)
    with pytest.raises(MethodError, match="unknown parameter"):
        run(TALL_MASKS, xs, base, alpha=1.0)
    with pytest.raises(MethodError, match="recovery needs the base"):
        recover(
            {"masks": torch.zeros(1, 1, dtype=torch.uint8), "task_sum": torch.ones(1)}, None, 0, {}
        )

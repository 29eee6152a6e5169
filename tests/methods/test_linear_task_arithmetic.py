"""Hand-computed cases for linear and task_arithmetic."""

from __future__ import annotations

import pytest
import torch

from mergeforge.errors import MethodError

T = torch.tensor
X1 = T([1.0, 2.0, 3.0, 4.0])
X2 = T([3.0, 0.0, -1.0, 8.0])


def test_linear_weighted_mean(call) -> None:
    # (1·x1 + 3·x2) = [10, 2, 0, 28]; ÷ 4
    assert torch.equal(call("linear", [X1, X2], None, weight=(1.0, 3.0)), T([2.5, 0.5, 0.0, 7.0]))


def test_linear_without_normalize_is_the_weighted_sum(call) -> None:
    out = call("linear", [X1, X2], None, weight=(1.0, 3.0), normalize=False)
    assert torch.equal(out, T([10.0, 2.0, 0.0, 28.0]))


def test_linear_negative_weight(call) -> None:
    # 2·x1 − x2 = [-1, 4, 7, 0]; the weights sum to 1
    assert torch.equal(call("linear", [X1, X2], None, weight=(2.0, -1.0)), T([-1.0, 4.0, 7.0, 0.0]))


def test_linear_ignores_base(call) -> None:
    out = call("linear", [X1, X2], T([9.0, 9.0, 9.0, 9.0]), weight=(1.0, 1.0))
    assert torch.equal(out, T([2.0, 1.0, 1.0, 6.0]))


def test_linear_zero_weight_sum_with_normalize_is_an_error(call) -> None:
    with pytest.raises(MethodError, match="sum to 0"):
        call("linear", [X1, X2], None, weight=(1.0, -1.0))
    out = call("linear", [X1, X2], None, weight=(1.0, -1.0), normalize=False)
    assert torch.equal(out, T([-2.0, 2.0, 4.0, -4.0]))


def test_linear_shape_mismatch_and_no_inputs_are_errors(call) -> None:
    with pytest.raises(MethodError, match="shape"):
        call("linear", [X1, torch.zeros(3)], None, weight=(1.0, 1.0))
    with pytest.raises(MethodError, match="at least one"):
        call("linear", [], None, weight=())


B = T([1.0, 1.0, 1.0, 1.0])
Y1 = T([2.0, 0.0, 1.0, 3.0])  # δ1 = [1, -1, 0, 2]
Y2 = T([1.0, 3.0, -1.0, 1.0])  # δ2 = [0, 2, -2, 0]


def test_task_arithmetic_by_hand(call) -> None:
    # τ = δ1 + 0.5·δ2 = [1, 0, -1, 2]
    assert torch.equal(call("task_arithmetic", [Y1, Y2], B, weight=(1.0, 0.5)), T([2.0, 1, 0, 3]))


def test_task_arithmetic_lambda(call) -> None:
    out = call("task_arithmetic", [Y1, Y2], B, weight=(1.0, 0.5), **{"lambda": 2.0})
    assert torch.equal(out, T([3.0, 1.0, -1.0, 5.0]))


def test_task_arithmetic_normalize(call) -> None:
    out = call("task_arithmetic", [Y1, Y2], B, weight=(1.0, 0.5), normalize=True)  # τ / 1.5
    torch.testing.assert_close(out, T([5 / 3, 1.0, 1 / 3, 7 / 3]))


def test_task_arithmetic_zero_weight_sum_divides_by_one(call) -> None:
    # |Σw| < 1e-8: mergekit replaces the divisor by 1; τ = δ1 − δ2 = [1, -3, 2, 2]
    out = call("task_arithmetic", [Y1, Y2], B, weight=(1.0, -1.0), normalize=True)
    assert torch.equal(out, T([2.0, -2.0, 3.0, 3.0]))


def test_task_arithmetic_ignores_density_and_rescale(call) -> None:
    plain = call("task_arithmetic", [Y1, Y2], B, weight=(1.0, 0.5))
    other = call(
        "task_arithmetic", [Y1, Y2], B, weight=(1.0, 0.5), density=(0.1, 0.2), rescale=True
    )
    assert torch.equal(plain, other)


def test_task_arithmetic_needs_a_base(call) -> None:
    with pytest.raises(MethodError, match="base"):
        call("task_arithmetic", [Y1, Y2], None, weight=(1.0, 1.0))


def test_task_arithmetic_without_models_returns_the_base(call) -> None:
    assert torch.equal(call("task_arithmetic", [], B, weight=()), B)


def test_unknown_keyword_is_an_error(call) -> None:
    with pytest.raises(MethodError, match="lamda"):
        call("task_arithmetic", [Y1], B, weight=(1.0,), lamda=2.0)

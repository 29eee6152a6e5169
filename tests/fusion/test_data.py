"""The fusion problem contract, seeded batch streams and the entropy loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mergeforge.errors import FusionError
from mergeforge.fusion.data import FusionProblem, FusionTask, cycle, mean_hidden, task_vectors
from mergeforge.fusion.losses import check_finite, entropy


def _head(out, batch):
    return out


def _problem(shapes_ok: bool = True) -> FusionProblem:
    body = nn.Linear(3, 2)
    base = {k: v.detach().clone() for k, v in body.state_dict().items()}
    e1 = {k: v + 1.0 for k, v in base.items()}
    e2 = {k: v - 2.0 for k, v in base.items()}
    if not shapes_ok:
        e2["weight"] = torch.zeros(3, 3)
    tasks = (FusionTask("a", _head, 2), FusionTask("b", _head, 2))
    return FusionProblem(body, base, (e1, e2), tasks)


def test_task_vectors_are_stacked_differences() -> None:
    p = _problem()
    tv = task_vectors(p)
    assert p.names == ("weight", "bias")
    assert tv["weight"].shape == (2, 2, 3)
    torch.testing.assert_close(tv["weight"][0], torch.ones(2, 3))
    torch.testing.assert_close(tv["bias"][1], torch.full((2,), -2.0))


def test_shape_mismatch_names_task_and_tensor() -> None:
    with pytest.raises(FusionError, match=r"task 'b' has shape \(3, 3\) for 'weight'"):
        _problem(shapes_ok=False)


def test_task_without_data_is_an_error() -> None:
    with pytest.raises(FusionError, match="task 'a' has no unlabeled batches"):
        FusionTask("a", _head, 2).require("unlabeled", "adamerging")


def test_cycle_is_seeded_and_visits_every_batch_each_pass() -> None:
    batches = [{"x": torch.tensor([i])} for i in range(5)]
    a = [int(b["x"]) for _, b in zip(range(10), cycle(batches, 3), strict=False)]
    b = [int(b["x"]) for _, b in zip(range(10), cycle(batches, 3), strict=False)]
    assert a == b
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:]) == list(range(5))
    with pytest.raises(FusionError):
        next(cycle([], 0))


def test_entropy_hand_computed() -> None:
    # uniform over 4 classes: log 4; a certain prediction: 0
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert math.isclose(float(entropy(logits)), math.log(4) / 2, rel_tol=1e-6)
    # p = (0.25, 0.75): H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(float(entropy(torch.tensor([[0.0, math.log(3.0)]]))), h, rel_tol=1e-6)


def test_check_finite_names_step_and_knob() -> None:
    assert check_finite(torch.tensor(1.5), 3, "x", "lr") == 1.5
    with pytest.raises(FusionError, match="at step 7; lower the learning rate"):
        check_finite(torch.tensor(float("nan")), 7, "adamerging", "the learning rate")


def test_mean_hidden_ignores_padding() -> None:
    class Out:
        last_hidden_state = torch.tensor([[[1.0], [3.0], [100.0]]])  # (1, 3, 1)

    batch = {"attention_mask": torch.tensor([[1, 1, 0]])}
    assert torch.equal(mean_hidden(Out(), batch), torch.tensor([[2.0]]))


def test_tiny_problem_runs_every_head() -> None:
    from fusion_problems import tiny_problem

    p = tiny_problem(2)
    out = p.body(**p.tasks[0].unlabeled[0])
    assert p.tasks[1].head(out, p.tasks[0].unlabeled[0]).shape == (4, 3)
    assert len(p.names) == len(list(p.body.parameters()))

"""Fisher merging: hand-computed estimate and weighted average (with normalisation), equal
Fishers give the plain average, the run on a tiny BERT, config and data errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusion_problems import tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion import fisher
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.fisher import FisherConfig, fisher_merge, task_fisher
from mergeforge.fusion.hooks import body_tensors


@pytest.fixture(scope="module")
def problem() -> FusionProblem:
    return tiny_problem(tasks=3, batches=2, n=4)


def _mean(problem: FusionProblem) -> dict[str, torch.Tensor]:
    return {n: torch.stack([e[n] for e in problem.experts]).mean(0) for n in problem.names}


@pytest.mark.parametrize("normalize", [False, True])
def test_weighted_formula_on_two_scalars(normalize: bool) -> None:
    eps = 1e-6
    params = [{"a": torch.tensor(1.0), "b": torch.tensor(2.0)},
              {"a": torch.tensor(3.0), "b": torch.tensor(6.0)}]  # fmt: skip
    fishers = [{"a": torch.tensor(3.0), "b": torch.tensor(4.0)},  # ‖F_1‖ = 5
               {"a": torch.tensor(6.0), "b": torch.tensor(8.0)}]  # ‖F_2‖ = 10  # fmt: skip
    c1, c2 = (1 / (5 + eps), 1 / (10 + eps)) if normalize else (1.0, 1.0)
    a = (c1 * (3 + eps) * 1 + c2 * (6 + eps) * 3) / (c1 * (3 + eps) + c2 * (6 + eps))
    b = (c1 * (4 + eps) * 2 + c2 * (8 + eps) * 6) / (c1 * (4 + eps) + c2 * (8 + eps))
    # rounded: without normalisation a = 21/9, b = 56/12; with it both models weigh equally
    assert (round(a, 4), round(b, 4)) == ((2.0, 4.0) if normalize else (2.3333, 4.6667))
    out = fisher_merge(params, fishers, epsilon=eps, normalize=normalize)
    assert math.isclose(float(out["a"]), a, rel_tol=1e-6)
    assert math.isclose(float(out["b"]), b, rel_tol=1e-6)


def test_zero_fisher_falls_back_to_the_weighted_average() -> None:
    params = [{"w": torch.tensor([2.0])}, {"w": torch.tensor([4.0])}]
    zeros = [{"w": torch.zeros(1)}, {"w": torch.zeros(1)}]
    torch.testing.assert_close(fisher_merge(params, zeros)["w"], torch.tensor([3.0]))


@pytest.mark.parametrize("normalize", [False, True])
def test_equal_fishers_give_the_plain_average(problem, monkeypatch, normalize: bool) -> None:
    def same(problem, expert, task, batches, defaults, device, after_batch=None):
        return {n: torch.full(expert[n].shape, 0.5) for n in problem.names}

    monkeypatch.setattr(fisher, "task_fisher", same)
    result = fisher.run(problem, FisherConfig(normalize=normalize))
    for n, avg in _mean(problem).items():
        torch.testing.assert_close(result.state[n], avg, rtol=1e-6, atol=1e-7)


def _linear_problem(x: torch.Tensor) -> FusionProblem:
    torch.manual_seed(0)
    body = nn.Linear(2, 3)
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    task = FusionTask("t", lambda out, batch: out, 3, ({"input": x},))
    return FusionProblem(body, base, (base,), (task,))


@pytest.mark.parametrize("chunk", [None, 1])
def test_estimate_by_hand_on_a_linear_classifier(chunk: int | None) -> None:
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]])  # (N, in)
    p = _linear_problem(x)
    w, b = p.base["weight"], p.base["bias"]
    groups = [x] if chunk is None else [row[None] for row in x]
    want_w, want_b = torch.zeros(3, 2), torch.zeros(3)
    for xb in groups:
        z = xb @ w.T + b  # (n, C) logits
        prob = torch.softmax(z, dim=-1)  # (n, C)
        s = prob.sqrt()
        dz = s - prob * s.sum(dim=-1, keepdim=True)  # ∂/∂z_k Σ_c s_c log p_c = s_k − p_k Σ_c s_c
        want_w += (dz.T @ xb) ** 2
        want_b += dz.sum(0) ** 2
    batches = [{"input": g} for g in groups]
    got = task_fisher(p, p.base, p.tasks[0], batches, body_tensors(p.body, "cpu"), "cpu")
    torch.testing.assert_close(got["weight"], want_w)
    torch.testing.assert_close(got["bias"], want_b)


def test_run_on_a_tiny_bert(problem) -> None:
    calls: list[tuple[int, int]] = []
    result = fisher.run(problem, FisherConfig(), progress=lambda s, t, loss: calls.append((s, t)))
    assert result.algorithm == "fisher" and result.coefficients is None
    assert calls == [(i, 6) for i in range(1, 7)]  # 3 tasks × 2 batches
    assert result.info["examples"] == {"task0": 8, "task1": 8, "task2": 8}
    norms = result.info["fisher_norms"]
    weights = result.info["model_weights"]
    assert all(math.isclose(weights[t], 1 / (norms[t] + 1e-6)) for t in norms)
    mean = _mean(problem)
    assert set(result.state) == set(problem.names)
    assert any(not torch.allclose(result.state[n], mean[n], atol=1e-4) for n in problem.names)
    for n, v in result.state.items():
        assert v.dtype == problem.base[n].dtype and torch.isfinite(v).all()
        lo = torch.stack([e[n] for e in problem.experts]).amin(0)
        hi = torch.stack([e[n] for e in problem.experts]).amax(0)
        assert bool(((v >= lo - 1e-5) & (v <= hi + 1e-5)).all())  # a convex combination
    again = fisher.run(problem, FisherConfig())
    assert all(torch.equal(again.state[n], result.state[n]) for n in problem.names)
    fewer = fisher.run(problem, FisherConfig(examples=3, batch_size=2))
    assert fewer.info["examples"] == {"task0": 3, "task1": 3, "task2": 3}


@pytest.mark.parametrize(
    ("field", "value"),
    [("examples", 0), ("batch_size", 0), ("epsilon", 0.0), ("epsilon", float("nan"))],
)
def test_config_errors_name_the_field(field: str, value: float) -> None:
    with pytest.raises(FusionError, match=f"{field}={value}"):
        FisherConfig(**{field: value})


def test_data_errors(problem) -> None:
    no_data = FusionTask("empty", problem.tasks[0].head, 3)
    bad = FusionProblem(problem.body, problem.base, problem.experts[:1], (no_data,))
    with pytest.raises(FusionError, match="task 'empty' has no unlabeled batches"):
        fisher.run(bad, FisherConfig())
    t = problem.tasks[0]
    single = FusionTask("reg", t.head, 1, t.unlabeled)
    reg = FusionProblem(problem.body, problem.base, problem.experts[:1], (single,))
    with pytest.raises(FusionError, match="'reg' has 1 output"):
        fisher.run(reg, FisherConfig())
    broken = {k: v.clone() for k, v in problem.experts[0].items()}
    broken["encoder.layer.0.output.dense.weight"].fill_(float("nan"))
    nan = FusionProblem(problem.body, problem.base, (broken,), problem.tasks[:1])
    with pytest.raises(FusionError, match="task 'task0' gives non-finite logits"):
        fisher.run(nan, FisherConfig())

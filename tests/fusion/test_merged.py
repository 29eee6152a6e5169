"""The differentiable merged model: merged weights, functional forward, gradients, helpers."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fusion_problems import make_head, tiny_body, tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.losses import entropy
from mergeforge.fusion.merged import MergedModel, Streams, check_fields, is_int, train


@pytest.fixture(scope="module")
def problem() -> FusionProblem:
    return tiny_problem(3, batches=2, n=3)


def independent_merge(problem: FusionProblem, lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t λ_{t,k} (θ_t − θ0), tensor by tensor from the problem's raw dicts; ``lam`` is
    (T,) or (K, T)."""
    out = {}
    for k, name in enumerate(problem.names):
        row = lam if lam.dim() == 1 else lam[k]
        acc = problem.base[name].double().clone()
        for t, expert in enumerate(problem.experts):
            acc += float(row[t]) * (expert[name].double() - problem.base[name].double())
        out[name] = acc
    return out


def assert_state_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=0, atol=atol)


@pytest.mark.parametrize("layout", ["task", "layer"])
def test_constant_coefficients_give_task_arithmetic(problem: FusionProblem, layout: str) -> None:
    model = MergedModel(problem)
    lam = model.coefficients(layout, 0.3)
    assert lam.shape == ((3,) if layout == "task" else (len(problem.names), 3))
    assert lam.requires_grad
    want = independent_merge(problem, torch.full((3,), 0.3))
    assert_state_close(model.state(lam), want)


def test_layer_coefficients_are_used_row_by_row(problem: FusionProblem) -> None:
    model = MergedModel(problem)
    lam = torch.randn(len(problem.names), 3, generator=torch.Generator().manual_seed(0))
    assert_state_close(model.state(lam), independent_merge(problem, lam))
    table = model.table(lam)
    assert table["task2"][problem.names[5]] == pytest.approx(float(lam[5, 2]))


def test_clamp_limits_the_coefficients_to_the_unit_interval(problem: FusionProblem) -> None:
    model = MergedModel(problem)
    lam = torch.tensor([-0.5, 0.4, 1.7])
    want = independent_merge(problem, torch.tensor([0.0, 0.4, 1.0]))
    assert_state_close(model.state(lam, clamp=True), want)
    assert model.table(lam, clamp=True)["task2"][problem.names[0]] == 1.0


def test_mask_multiplies_every_task_vector(problem: FusionProblem) -> None:
    model = MergedModel(problem)
    gen = torch.Generator().manual_seed(1)
    mask = {n: torch.rand(problem.base[n].numel(), generator=gen) for n in problem.names}
    lam = torch.tensor([0.2, 0.5, -0.1])
    got = model.state(lam, mask=mask)
    for name in problem.names:
        m = mask[name].view(problem.base[name].shape).double()
        want = problem.base[name].double().clone()
        for t, e in enumerate(problem.experts):
            want += float(lam[t]) * m * (e[name].double() - problem.base[name].double())
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6)


def test_merged_forward_equals_a_body_loaded_with_the_weights(problem: FusionProblem) -> None:
    model = MergedModel(problem)
    lam = model.coefficients("layer", 0.3)
    params = model.params(lam)
    loaded = copy.deepcopy(problem.body)
    loaded.load_state_dict(model.state(lam), strict=False)
    for task in problem.tasks:
        batch = task.unlabeled[0]
        got = task.head(model.forward(params, batch), batch)
        want = task.head(loaded(**batch), batch)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_body_is_never_modified(problem: FusionProblem) -> None:
    before = {k: v.detach().clone() for k, v in problem.body.state_dict().items()}
    model = MergedModel(problem)
    lam = model.coefficients("layer", 0.7)
    model.entropy(model.params(lam), [[t.unlabeled[0]] for t in problem.tasks]).backward()
    assert lam.grad is not None and float(lam.grad.abs().sum()) > 0
    for k, v in problem.body.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in problem.body.parameters())


def test_unfused_parameters_come_from_the_base() -> None:
    full = tiny_problem(2, batches=1)
    fused = tuple(n for n in full.names if "encoder" in n)
    base = dict(full.base)
    base["pooler.dense.bias"] = base["pooler.dense.bias"] + 1.0  # differs from the body's value
    problem = FusionProblem(full.body, base, full.experts, full.tasks, fused)
    model = MergedModel(problem)
    params = model.params(model.coefficients("task", 0.3))
    assert torch.equal(params["pooler.dense.bias"], base["pooler.dense.bias"])
    assert set(model.state(model.coefficients("task", 0.3))) == set(fused)


def test_entropy_sums_the_tasks_and_averages_their_batches(problem: FusionProblem) -> None:
    model = MergedModel(problem)
    params = model.params(model.coefficients("task", 0.3).detach())
    batches = [list(t.unlabeled) for t in problem.tasks]
    want = 0.0
    with torch.no_grad():
        for task, bs in zip(problem.tasks, batches, strict=True):
            hs = [float(entropy(task.head(model.forward(params, b), b))) for b in bs]
            want += sum(hs) / len(hs)
        got = float(model.entropy(params, batches))
    assert got == pytest.approx(want, rel=1e-6)


def double_problem(tasks: int = 2) -> FusionProblem:
    """A float64 tiny problem (body, weights and heads), for finite differences."""
    body = tiny_body(3).double()
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    experts, task_list = [], []
    for t in range(tasks):
        gen = torch.Generator().manual_seed(40 + t)
        experts.append(
            {k: v + 0.3 * torch.randn(v.shape, generator=gen).double() for k, v in base.items()}
        )
        lin, head = make_head(3, 60 + t)
        lin.double()
        src = tiny_problem(1, batches=1, n=3, seed=t + 5).tasks[0].unlabeled
        task_list.append(FusionTask(f"t{t}", head, 3, src))
    return FusionProblem(body, base, tuple(experts), tuple(task_list))


def _entropy64(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@pytest.mark.parametrize("layout", ["task", "layer"])
def test_coefficient_gradients_match_finite_differences(layout: str) -> None:
    problem = double_problem()
    model = MergedModel(problem, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    shape = (2,) if layout == "task" else (len(problem.names), 2)
    lam0 = (0.3 + 0.2 * torch.rand(shape, generator=gen)).double()

    def loss(lam: torch.Tensor) -> torch.Tensor:
        params = model.params(lam)
        return sum(
            _entropy64(t.head(model.forward(params, t.unlabeled[0]), t.unlabeled[0]))
            for t in problem.tasks
        )

    lam = lam0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(lam), lam)
    flat = grad.reshape(-1)
    h = 1e-6
    for i in range(flat.numel()):
        e = torch.zeros_like(lam0).reshape(-1)
        e[i] = h
        e = e.view(shape)
        with torch.no_grad():
            fd = (loss(lam0 + e) - loss(lam0 - e)) / (2 * h)
        assert float(flat[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8), i
    assert float(grad.abs().max()) > 1e-4  # the check is not vacuous


def test_wrong_task_vectors_are_rejected(problem: FusionProblem) -> None:
    name = problem.names[0]
    with pytest.raises(FusionError, match=f"no tensor for '{name}'"):
        MergedModel(problem, vectors={})
    bad = {n: torch.zeros(2, *problem.base[n].shape) for n in problem.names}
    with pytest.raises(FusionError, match=r"shape \(2, "):
        MergedModel(problem, vectors=bad)


def test_streams_are_seeded_and_need_unlabeled_data(problem: FusionProblem) -> None:
    def ids(seed: int) -> list[int]:
        s = Streams(problem, seed, "cpu", "x")
        return [int(b[0]["input_ids"].sum()) for _ in range(6) for b in s.draw()]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    empty = dataclasses.replace(problem.tasks[1], unlabeled=())
    bare = dataclasses.replace(problem, tasks=(problem.tasks[0], empty, problem.tasks[2]))
    with pytest.raises(FusionError, match="task 'task1' has no unlabeled batches, and algo"):
        Streams(bare, 0, "cpu", "algo")


def test_train_stops_at_a_non_finite_loss() -> None:
    x = torch.ones(2, requires_grad=True)
    calls = iter([x.sum(), x.sum() * float("nan")])
    seen: list[tuple[int, int, float]] = []
    with pytest.raises(FusionError, match=r"algo: the loss became nan at step 2; lower the lr"):
        train(
            [x], lambda: next(calls), lr=0.1, steps=5, algorithm="algo", lower="the lr",
            progress=lambda *a: seen.append(a),
        )  # fmt: skip
    assert seen == [(1, 5, 2.0)]


def test_check_fields_lists_every_bad_field() -> None:
    @dataclasses.dataclass
    class C:
        a: object = -1
        b: object = True

    with pytest.raises(FusionError, match=r"x: .*`a` = -1 \(allowed: ≥ 0\); `b` = True"):
        check_fields("x", C(), [("a", is_int(C.a, 0), "≥ 0"), ("b", is_int(C.b, 0), "int")])

"""AdaMerging (task-wise, layer-wise) and AdaMerging++ on tiny problems."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fusion_problems import tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion.adamerging import (
    SPECS,
    AdaMergingConfig,
    AdaMergingPPConfig,
    model_thresholds,
    run,
    ties_vectors,
)
from mergeforge.fusion.data import FusionProblem, task_vectors
from mergeforge.fusion.losses import entropy
from mergeforge.methods.ties import ties


@pytest.fixture(scope="module")
def problem() -> FusionProblem:
    return tiny_problem(3, batches=3, n=4, spread=0.2)


def task_arithmetic(problem: FusionProblem, lam: float, vectors: dict | None = None) -> dict:
    """θ0 + λ Σ_t τ_t, from the raw dicts (or from given stacked ``vectors``)."""
    out = {}
    for name in problem.names:
        b = problem.base[name].double()
        tv = (
            sum(e[name].double() - b for e in problem.experts)
            if vectors is None
            else vectors[name].double().sum(0)
        )
        out[name] = b + lam * tv
    return out


def assert_state_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=atol)


def full_entropy(problem: FusionProblem, state: dict) -> float:
    """Σ_t mean over all of task t's unlabeled batches of the entropy, with ``state`` loaded."""
    from torch.func import functional_call

    total = 0.0
    with torch.no_grad():
        for task in problem.tasks:
            hs = [
                float(entropy(task.head(functional_call(problem.body, state, (), dict(b)), b)))
                for b in task.unlabeled
            ]
            total += sum(hs) / len(hs)
    return total


@pytest.mark.parametrize("granularity", ["task", "layer"])
@pytest.mark.parametrize("frozen", [{"lr": 0.0, "steps": 3}, {"steps": 0}])
def test_frozen_coefficients_equal_task_arithmetic(problem, granularity, frozen) -> None:
    result = run(problem, AdaMergingConfig(granularity=granularity, **frozen))
    assert_state_close(result.state, task_arithmetic(problem, 0.3))
    assert result.algorithm == "adamerging"
    assert len(result.history) == frozen["steps"]
    assert result.coefficients is not None
    assert set(result.coefficients) == {"task0", "task1", "task2"}
    assert all(
        v == pytest.approx(0.3) and set(c) == set(problem.names)
        for c in result.coefficients.values()
        for v in c.values()
    )
    assert result.state[problem.names[0]].dtype == problem.base[problem.names[0]].dtype


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_a_few_steps_lower_the_entropy(problem, granularity) -> None:
    start = full_entropy(problem, task_arithmetic_float(problem))
    result = run(problem, AdaMergingConfig(granularity=granularity, lr=0.05, steps=8))
    assert full_entropy(problem, result.state) < start - 1e-3
    lams = [v for c in result.coefficients.values() for v in c.values()]
    assert max(abs(v - 0.3) for v in lams) > 0.05  # the coefficients moved
    if granularity == "layer":
        assert len({round(v, 6) for v in lams}) > 3  # ... differently per tensor


def task_arithmetic_float(problem: FusionProblem) -> dict:
    return {k: v.float() for k, v in task_arithmetic(problem, 0.3).items()}


def test_same_seed_same_result_and_another_seed_differs(problem) -> None:
    def coeffs(seed: int) -> list[float]:
        result = run(problem, AdaMergingConfig(lr=0.05, steps=4, seed=seed))
        return [v for c in result.coefficients.values() for v in c.values()]

    first = coeffs(1)
    assert coeffs(1) == first
    assert coeffs(2) != first


def test_progress_reports_every_step(problem) -> None:
    seen: list[tuple[int, int, float]] = []
    result = run(problem, AdaMergingConfig(steps=3), progress=lambda *a: seen.append(a))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [s[2] for s in seen] == list(result.history)


def test_clamp_keeps_the_coefficients_in_the_unit_interval(problem) -> None:
    result = run(problem, AdaMergingConfig(init=1.5, clamp=True, steps=0, granularity="task"))
    assert_state_close(result.state, task_arithmetic(problem, 1.0))


def test_ties_vectors_hand_computed() -> None:
    """Two tasks, density 0.5 over 4 entries each (r = 4 − 2 = 2: keep |τ| ≥ 2nd smallest)."""
    vectors = {"w": torch.tensor([[3.0, -1.0, 0.5, -4.0], [-2.0, 2.0, 0.1, 1.0]])}
    assert model_thresholds(vectors, 0.5) == [1.0, 1.0]
    # trimmed: [3, -1, 0, -4] and [-2, 2, 0, 1]; sums [1, 1, 0, -3] → γ = [+, +, +, −]
    want = torch.tensor([[3.0, 0.0, 0.0, -4.0], [0.0, 2.0, 0.0, 0.0]])
    assert torch.equal(ties_vectors(vectors, 0.5)["w"], want)
    assert torch.equal(
        ties_vectors(vectors, 1.0)["w"], torch.tensor([[3, 0, 0.5, -4], [0, 2, 0.1, 0]])
    )


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_ties_vectors_sum_to_the_ties_method_disjoint_sum(problem, scope) -> None:
    """Σ_t τ̃_t equals ``methods.ties`` with weights 1, no normalisation, λ 1 (dis-sum), whose
    whole-model thresholds are computed here by sorting."""
    density = 0.3
    vectors = task_vectors(problem)
    got = ties_vectors(vectors, density, scope)
    thresholds = []
    for t in range(problem.num_tasks):
        flat = torch.cat([v[t].reshape(-1).abs() for v in vectors.values()]).sort().values
        thresholds.append(float(flat[flat.numel() - int(flat.numel() * density) - 1]))
    for name in problem.names:
        base = problem.base[name]
        merged = ties(
            [e[name] for e in problem.experts], base, weight=[1.0] * 3, density=[density] * 3,
            normalize=False, trim_scope=scope, threshold=thresholds,
        )  # fmt: skip
        torch.testing.assert_close(got[name].sum(0), merged - base, rtol=0, atol=1e-6)
        # each kept entry is the task's own value, and all kept entries of a coordinate agree
        kept = got[name] != 0
        assert torch.equal(got[name][kept], vectors[name][kept])
        signs = got[name].sign()
        assert not bool(((signs > 0).any(0) & (signs < 0).any(0)).any())
    kept = sum(int((got[n] != 0).sum()) for n in problem.names)
    total = sum(problem.base[n].numel() for n in problem.names) * problem.num_tasks
    assert kept < density * total


def test_adamerging_pp_merges_the_preprocessed_vectors(problem) -> None:
    config = AdaMergingPPConfig(lr=0.0, steps=2, density=0.4)
    result = run(problem, config)
    vectors = ties_vectors(task_vectors(problem), 0.4)
    assert_state_close(result.state, task_arithmetic(problem, 0.3, vectors))
    assert result.algorithm == "adamerging_pp"
    assert result.coefficients is None  # not a recipe over the raw task vectors
    assert result.info["coefficients"]["task1"][problem.names[0]] == pytest.approx(0.3)
    assert result.info["config"]["density"] == 0.4


def _nan_head(outputs, batch):
    return outputs.pooler_output[:, :3] * float("nan")


def test_a_nan_loss_names_the_step(problem) -> None:
    bad = dataclasses.replace(problem.tasks[1], head=_nan_head)
    nan_problem = dataclasses.replace(problem, tasks=(problem.tasks[0], bad, problem.tasks[2]))
    with pytest.raises(FusionError, match=r"adamerging: the loss became nan at step 1; lower"):
        run(nan_problem, AdaMergingConfig(steps=3))


def test_a_huge_learning_rate_stops_with_a_message(problem) -> None:
    with pytest.raises(FusionError, match=r"at step \d+; lower the learning rate `lr`"):
        run(problem, AdaMergingConfig(lr=1e30, steps=5, granularity="task"))


def test_a_task_without_unlabeled_data_is_an_error(problem) -> None:
    empty = dataclasses.replace(problem.tasks[2], unlabeled=())
    bare = dataclasses.replace(problem, tasks=(*problem.tasks[:2], empty))
    with pytest.raises(FusionError, match="task 'task2' has no unlabeled batches, and adamerging"):
        run(bare, AdaMergingConfig(steps=1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("granularity", "block"),
        ("init", float("nan")),
        ("lr", -1e-3),
        ("lr", "fast"),
        ("steps", -1),
        ("steps", 2.5),
        ("clamp", "yes"),
        ("seed", -3),
        ("batches_per_step", 0),
    ],
)
def test_bad_config_values_name_the_field(field, value) -> None:
    with pytest.raises(FusionError, match=rf"adamerging: invalid parameter\(s\): `{field}` = "):
        AdaMergingConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"), [("density", 0.0), ("density", 1.5), ("trim_scope", "row")]
)
def test_bad_pp_config_values_name_the_field(field, value) -> None:
    with pytest.raises(FusionError, match=rf"adamerging_pp: invalid parameter\(s\): `{field}`"):
        AdaMergingPPConfig(**{field: value})


def test_specs() -> None:
    by_name = {s.name: s for s in SPECS}
    assert set(by_name) == {"adamerging", "adamerging_pp"}
    assert all(s.category == "needs-data" and "unlabeled" in s.data for s in SPECS)
    assert by_name["adamerging"].make_config({"granularity": "task"}).granularity == "task"
    with pytest.raises(FusionError, match="unknown parameter"):
        by_name["adamerging"].make_config({"density": 0.2})
    assert by_name["adamerging_pp"].make_config({"density": 0.1}).density == 0.1

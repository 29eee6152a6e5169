"""Concrete subspace learning (Concrete TA, Concrete AdaMerging) on tiny problems."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fusion_problems import tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion import adamerging
from mergeforge.fusion.concrete import (
    SPECS,
    ConcreteAdaMergingConfig,
    ConcreteMask,
    ConcreteTAConfig,
    relaxed_bernoulli,
    rescale,
    run_adamerging,
    run_ta,
)
from mergeforge.fusion.data import FusionProblem
from mergeforge.fusion.merged import MergedModel

ONES = {"steps": 0, "init_logits": 40.0, "eval_mask": "discrete"}
"""σ(40) rounds to 1 in float32, so the discrete mask is all ones: the base method."""


@pytest.fixture(scope="module")
def problem() -> FusionProblem:
    return tiny_problem(3, batches=3, n=4, spread=0.2)


def task_arithmetic(problem: FusionProblem, lam: float) -> dict:
    return {
        n: problem.base[n].double()
        + lam * sum(e[n].double() - problem.base[n].double() for e in problem.experts)
        for n in problem.names
    }


def assert_state_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=0, atol=atol)


def test_relaxed_bernoulli_is_torchs_rsample() -> None:
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 3
    torch.manual_seed(11)
    want = torch.distributions.RelaxedBernoulli(torch.tensor(0.5), logits=logits).rsample()
    u = torch.rand(7, 5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(relaxed_bernoulli(logits, u, 0.5), want)


def test_mask_samples_are_rescaled_seeded_and_differentiable(problem) -> None:
    model = MergedModel(problem)
    a, b, c = (ConcreteMask(model, 0.0, seed) for seed in (3, 3, 4))
    sa, sb, sc = (m.sample(0.5) for m in (a, b, c))
    name = problem.names[0]
    assert torch.equal(sa[name], sb[name]) and not torch.equal(sa[name], sc[name])
    for m in sa.values():
        assert float(m.detach().mean()) == pytest.approx(1.0, rel=1e-5)
    sa[name].sum().backward()
    assert a.logits[name].grad is not None
    discrete = ConcreteMask(model, 0.0, 5).final("discrete", 0.5)[name]
    values = set(discrete.unique().tolist())
    assert len(values) == 2 and 0.0 in values  # 0 and 1/mean


def test_rescale_keeps_an_all_zero_mask() -> None:
    assert torch.equal(rescale(torch.zeros(4)), torch.zeros(4))
    torch.testing.assert_close(rescale(torch.tensor([1.0, 3.0])), torch.tensor([0.5, 1.5]))


def test_concrete_ta_with_a_mask_of_ones_is_task_arithmetic(problem) -> None:
    result = run_ta(problem, ConcreteTAConfig(**ONES))
    assert_state_close(result.state, task_arithmetic(problem, 0.3))
    assert result.coefficients is None and result.algorithm == "concrete_ta"
    assert result.info["mask"]["final_min"] == 1.0 == result.info["mask"]["final_max"]


def test_concrete_adamerging_with_a_mask_of_ones_is_adamerging(problem) -> None:
    steps = {"adamerging_steps": 4, "adamerging_lr": 0.05, "seed": 2}
    got = run_adamerging(problem, ConcreteAdaMergingConfig(**ONES, **steps))
    want = adamerging.run(problem, adamerging.AdaMergingConfig(lr=0.05, steps=4, seed=2))
    assert_state_close(got.state, want.state)
    torch.testing.assert_close(torch.tensor(got.history), torch.tensor(want.history))


def test_concrete_ta_learns_the_mask_and_lowers_the_entropy(problem) -> None:
    config = ConcreteTAConfig(steps=6, lr=0.5, eval_mask="discrete", seed=1)
    result = run_ta(problem, config)
    assert len(result.history) == 6
    assert result.history[-1] < result.history[0]
    again = run_ta(problem, config)
    assert all(torch.equal(again.state[n], result.state[n]) for n in problem.names)
    other = run_ta(problem, dataclasses.replace(config, seed=2))
    assert any(not torch.equal(other.state[n], result.state[n]) for n in problem.names)
    assert result.info["mask"]["keep_probability"] != pytest.approx(0.5)


def test_concrete_adamerging_runs_both_phases(problem) -> None:
    seen: list[tuple[int, int]] = []
    config = ConcreteAdaMergingConfig(steps=2, adamerging_steps=2, granularity="task", seed=0)
    result = run_adamerging(problem, config, progress=lambda s, t, _: seen.append((s, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(result.history) == 4
    again = run_adamerging(problem, config)
    assert all(torch.equal(again.state[n], result.state[n]) for n in problem.names)
    assert set(result.info["coefficients"]) == {"task0", "task1", "task2"}


def test_a_nan_loss_names_the_step(problem) -> None:
    def nan_head(outputs, batch):
        return outputs.pooler_output[:, :3] * float("nan")

    bad = dataclasses.replace(problem.tasks[0], head=nan_head)
    nan_problem = dataclasses.replace(problem, tasks=(bad, *problem.tasks[1:]))
    with pytest.raises(FusionError, match=r"concrete_ta: the loss became nan at step 1"):
        run_ta(nan_problem, ConcreteTAConfig(steps=2))
    with pytest.raises(FusionError, match=r"concrete_adamerging: .* at step 1; lower"):
        run_adamerging(nan_problem, ConcreteAdaMergingConfig(steps=2))


def test_a_task_without_unlabeled_data_is_an_error(problem) -> None:
    empty = dataclasses.replace(problem.tasks[0], unlabeled=())
    bare = dataclasses.replace(problem, tasks=(empty, *problem.tasks[1:]))
    with pytest.raises(FusionError, match="task 'task0' has no unlabeled batches, and concrete_ta"):
        run_ta(bare, ConcreteTAConfig(steps=1))


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [
        (ConcreteTAConfig, "temperature", 0.0),
        (ConcreteTAConfig, "scaling", float("inf")),
        (ConcreteTAConfig, "eval_mask", "hard"),
        (ConcreteTAConfig, "steps", -2),
        (ConcreteAdaMergingConfig, "base_lr", -1.0),
        (ConcreteAdaMergingConfig, "adamerging_steps", 1.5),
        (ConcreteAdaMergingConfig, "granularity", "row"),
        (ConcreteAdaMergingConfig, "init_logits", "zero"),
    ],
)
def test_bad_config_values_name_the_field(config, field, value) -> None:
    with pytest.raises(FusionError, match=rf"invalid parameter\(s\): `{field}` = "):
        config(**{field: value})


def test_specs() -> None:
    assert {s.name for s in SPECS} == {"concrete_ta", "concrete_adamerging"}
    assert all(s.category == "needs-data" and "2312.06173" in s.paper for s in SPECS)

"""Twin-Merging: exact reproduction under a forced one-hot router, per-sample mixing, the
shared expert, SVD compression ranks, router training, determinism, rebuild, and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fusion_problems import LENGTH, tiny_body, tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion import twin
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.twin import TwinConfig, compress

TOL = 1e-5
FAST = {"epochs": 5}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).detach().abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max error {err:g}"


class _OneHot(nn.Module):
    """A router that sends every sample to task ``t`` (softmax of ±1e4: exactly one-hot)."""

    def __init__(self, t: int, tasks: int) -> None:
        super().__init__()
        self.t, self.tasks = t, tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], self.tasks), -1e4, device=x.device)
        logits[:, self.t] = 1e4
        return logits


def _token_batches(t: int, seed: int, batches: int, n: int) -> tuple[dict, ...]:
    """Inputs of task ``t`` draw tokens from its own third of the vocabulary: separable."""
    g = torch.Generator().manual_seed(seed)
    lo = 1 + 13 * t
    return tuple(
        {
            "input_ids": torch.randint(lo, lo + 13, (n, LENGTH), generator=g),
            "attention_mask": torch.ones(n, LENGTH, dtype=torch.long),
        }
        for _ in range(batches)
    )


def _separable_problem() -> FusionProblem:
    p = tiny_problem(3)
    tasks = tuple(
        dataclasses.replace(task, unlabeled=_token_batches(t, t, 4, 8), labelled=())
        for t, task in enumerate(p.tasks)
    )
    return dataclasses.replace(p, tasks=tasks)


def test_one_hot_routing_without_compression_is_each_fine_tuned_model() -> None:
    p = tiny_problem(3)
    res = twin.run(p, TwinConfig(mask_rate=0.0, **FAST))
    assert set(res.description["layout"].values()) == {-1}
    batch = p.tasks[0].unlabeled[0]
    for t in range(3):
        res.module.router = _OneHot(t, 3)
        got = res.module(**batch)
        want = functional_call(p.body, p.experts[t], (), batch)
        _close(got.last_hidden_state, want.last_hidden_state)
        _close(got.pooler_output, want.pooler_output)


def test_each_sample_runs_with_its_own_mixture() -> None:
    p = tiny_problem(3)
    module = twin.run(p, TwinConfig(mask_rate=0.0, **FAST)).module
    batch = p.tasks[1].unlabeled[0]
    w = module.route(batch)  # (N, T)
    assert torch.unique(w, dim=0).shape[0] == w.shape[0]  # every sample its own group
    got = module(**batch)
    shared = {n: module.body.get_parameter(n).detach() for n in p.names}
    for i in range(w.shape[0]):
        theta = {
            n: shared[n] + sum(w[i, t] * (p.experts[t][n] - shared[n]) for t in range(3))
            for n in p.names
        }
        one = {k: v[i : i + 1] for k, v in batch.items()}
        want = functional_call(p.body, theta, (), one)
        _close(got.last_hidden_state[i : i + 1], want.last_hidden_state)
        _close(got.pooler_output[i : i + 1], want.pooler_output)


def test_shared_expert_is_task_arithmetic_at_lambda() -> None:
    p = tiny_problem(2)
    shared = twin.shared_expert(p, TwinConfig(shared_lambda=0.4))
    for n in p.names:
        want = p.base[n] + 0.4 * ((p.experts[0][n] - p.base[n]) + (p.experts[1][n] - p.base[n]))
        _close(shared[n], want)
    ties = twin.shared_expert(p, TwinConfig(shared="ties", ties_density=0.2, shared_lambda=1.0))
    n = "encoder.layer.0.intermediate.dense.weight"
    changed = (ties[n] != p.base[n]).float().mean()
    assert 0.2 <= float(changed) <= 0.4  # trimmed to 20 % per task, union of two supports


def test_compression_keeps_the_requested_rank() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 20, 12, generator=g)  # (T, m, n)
    rank, (a, b) = compress(v, 0.75)  # ⌊0.25 · 12⌋ = 3
    assert rank == 3 and a.shape == (2, 20, 3) and b.shape == (2, 3, 12)
    for t in range(2):
        approx = a[t] @ b[t]
        assert int(torch.linalg.matrix_rank(approx)) == 3
        s = torch.linalg.svdvals(v[t])
        err = torch.linalg.matrix_norm(v[t] - approx)
        _close(err, s[3:].norm())  # the best rank-3 approximation (Eckart–Young)
    assert compress(torch.randn(2, 10, 10, generator=g), 0.9)[0] == 1  # not 0 by float rounding
    assert compress(v, 0.99)[0] == 0
    dense_rank, (dense,) = compress(torch.randn(2, 8, 8, generator=g), 0.5)  # 4·16 ≥ 64: dense
    assert dense_rank == -1 and int(torch.linalg.matrix_rank(dense[0])) == 4
    for x in (v, torch.randn(2, 7, generator=g)):
        assert compress(x, 0.0) == (-1, [x])


def test_router_learns_task_identity_on_separable_inputs() -> None:
    p = _separable_problem()
    res = twin.run(p, TwinConfig(lr=5e-3, epochs=40, batch_size=16))
    assert res.info["router_accuracy"] >= 0.95
    assert res.history[-1] < res.history[0]
    for t in range(3):
        (held_out,) = _token_batches(t, 100 + t, 1, 16)
        picked = res.module.route(held_out).argmax(dim=1)
        assert float((picked == t).float().mean()) >= 0.9


def test_runs_are_seeded() -> None:
    p = tiny_problem(2)
    a, b = (twin.run(p, TwinConfig(seed=3, **FAST)) for _ in range(2))
    c = twin.run(p, TwinConfig(seed=4, **FAST))
    assert a.history == b.history
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    key = "router.0.weight"
    assert not torch.equal(a.tensors[key], c.tensors[key])


def test_rebuild_round_trip_is_bit_identical(tmp_path: Path) -> None:
    p = tiny_problem(3)
    res = twin.run(p, TwinConfig(mask_rate=0.5, **FAST))
    assert res.loader == "mergeforge.fusion.twin.rebuild"
    torch.save(res.tensors, tmp_path / "t.pt")
    (tmp_path / "d.json").write_text(json.dumps(res.description))
    body = tiny_body(seed=9)
    body.load_state_dict(p.base, strict=False)
    loaded = twin.rebuild(
        body, json.loads((tmp_path / "d.json").read_text()), torch.load(tmp_path / "t.pt")
    )
    batch = p.tasks[2].unlabeled[1]
    x, y = res.module(**batch), loaded(**batch)
    assert torch.equal(x.last_hidden_state, y.last_hidden_state)
    assert torch.equal(x.pooler_output, y.pooler_output)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_one_hot_expert() -> None:
    p = tiny_problem(2)
    res = twin.run(p, TwinConfig(mask_rate=0.0, **FAST), device="cuda")
    batch = p.tasks[0].unlabeled[0]
    res.module.router = _OneHot(1, 2)
    got = res.module(**{k: v.cuda() for k, v in batch.items()}).last_hidden_state.cpu()
    _close(got, functional_call(p.body, p.experts[1], (), batch).last_hidden_state, 1e-4)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"shared": "mean"}, "shared 'mean' is out of range"),
        ({"mask_rate": 1.5}, "mask_rate 1.5 is out of range"),
        ({"ties_density": 0.0}, "ties_density 0.0 is out of range"),
        ({"batch_size": 1}, "batch_size 1 is out of range.*batch norm"),
        ({"epochs": 0}, "epochs 0 is out of range"),
        ({"lr": -1.0}, "lr -1.0 is out of range"),
        ({"dropout": 1.0}, "dropout 1.0 is out of range"),
        ({"shared_lambda": float("nan")}, "shared_lambda nan is out of range"),
    ],
)
def test_bad_config_values(params: dict, match: str) -> None:
    with pytest.raises(FusionError, match=match):
        TwinConfig(**params)


def test_task_without_data_is_an_error() -> None:
    p = tiny_problem(2)
    bare = FusionTask("bare", p.tasks[1].head, 3)
    p = dataclasses.replace(p, tasks=(p.tasks[0], bare))
    with pytest.raises(FusionError, match="task 'bare' has no labelled batches"):
        twin.run(p, TwinConfig(**FAST))

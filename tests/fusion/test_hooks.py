"""Gram hooks: XᵀX of captured inputs, padding rows, early stop, call order, hook removal, and
the example budget of a statistics pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusion_problems import tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion.hooks import (
    body_tensors,
    call_order,
    collect_grams,
    example_batches,
    linear_modules,
    weight_name,
)

QUERY = "encoder.layer.0.attention.self.query"
OUTPUT = "encoder.layer.1.output.dense"
POOLER = "pooler.dense"


@pytest.fixture(scope="module")
def problem():
    return tiny_problem(tasks=2, batches=2, n=4)


def _captured(body: nn.Module, params: dict, batches, modules) -> dict[str, list[torch.Tensor]]:
    """Inputs of ``modules`` captured by plain pre-hooks on a deep copy holding ``params``."""
    body = copy.deepcopy(body)
    body.load_state_dict({k: v for k, v in params.items()}, strict=False)
    table = dict(body.named_modules())
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for m in modules:
        table[m].register_forward_pre_hook(lambda _mod, args, _m=m: seen[_m].append(args[0]))
    with torch.no_grad():
        for batch in batches:
            body(**batch)
    return seen


def _by_hand(inputs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Σ x xᵀ over the rows kept, one row at a time."""
    d = inputs.shape[-1]
    total, rows = torch.zeros(d, d), 0
    for i in range(inputs.shape[0]):
        for j in range(inputs.shape[1] if inputs.dim() == 3 else 1):
            if inputs.dim() == 3 and mask is not None and mask[i, j] == 0:
                continue
            x = inputs[i, j] if inputs.dim() == 3 else inputs[i]
            total += torch.outer(x, x)
            rows += 1
    return total, rows


@pytest.mark.parametrize("include_padding", [False, True])
def test_gram_equals_xtx_of_captured_inputs(problem, include_padding: bool) -> None:
    expert = problem.experts[1]
    params = {**body_tensors(problem.body, "cpu"), **expert}
    batches = problem.tasks[1].unlabeled
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)
    modules = [QUERY, OUTPUT, POOLER]
    grams = collect_grams(problem.body, params, batches, modules, include_padding=include_padding)
    seen = _captured(problem.body, expert, batches, modules)
    for m in modules:
        total, rows = torch.zeros_like(grams[m].total), 0
        for x, batch in zip(seen[m], batches, strict=True):
            t, r = _by_hand(x, None if include_padding else batch["attention_mask"])
            total, rows = total + t, rows + r
        assert grams[m].rows == rows
        torch.testing.assert_close(grams[m].total, total, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grams[m].mean(), total / rows, rtol=1e-5, atol=1e-6)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    every = sum(b["attention_mask"].numel() for b in batches)
    assert grams[QUERY].rows == (every if include_padding else tokens)
    assert grams[POOLER].rows == 8  # (N, d) first-token input: one row per example, no mask


def test_grams_use_the_given_weights_not_the_bodys(problem) -> None:
    before = {k: v.clone() for k, v in problem.body.state_dict().items()}
    base = body_tensors(problem.body, "cpu")
    batches = problem.tasks[0].unlabeled
    own = collect_grams(problem.body, base, batches, [OUTPUT])
    other = collect_grams(problem.body, {**base, **problem.experts[0]}, batches, [OUTPUT])
    assert not torch.allclose(own[OUTPUT].total, other[OUTPUT].total)
    for k, v in problem.body.state_dict().items():
        assert torch.equal(v, before[k])


def test_stop_after_calls_skips_the_rest_and_keeps_the_grams(problem) -> None:
    params = body_tensors(problem.body, "cpu")
    batches = problem.tasks[0].unlabeled
    layer0 = [m for m in linear_modules(problem.body) if m.startswith("encoder.layer.0.")]
    full = collect_grams(problem.body, params, batches, layer0)
    later: list[int] = []
    handle = problem.body.encoder.layer[1].register_forward_pre_hook(lambda *_: later.append(1))
    try:
        early = collect_grams(problem.body, params, batches, layer0, stop_after_calls=len(layer0))
    finally:
        handle.remove()
    assert later == []  # layer 1 never ran
    assert set(early) == set(layer0)
    for m in layer0:
        assert early[m].rows == full[m].rows
        torch.testing.assert_close(early[m].total, full[m].total)


def _hook_count(body: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in body.modules())


def test_hooks_are_removed_after_success_and_after_an_error(problem) -> None:
    params = body_tensors(problem.body, "cpu")
    modules = list(linear_modules(problem.body))
    collect_grams(problem.body, params, problem.tasks[0].unlabeled, modules)
    assert _hook_count(problem.body) == 0
    bad = [{"input_ids": torch.full((2, 3), 10_000)}]  # outside the vocabulary: the body raises
    with pytest.raises(IndexError):
        collect_grams(problem.body, params, bad, modules)
    assert _hook_count(problem.body) == 0
    with pytest.raises(FusionError, match="no module 'nope'"):
        collect_grams(problem.body, params, bad, [QUERY, "nope"])
    assert _hook_count(problem.body) == 0


def test_non_finite_inputs_are_an_error(problem) -> None:
    params = body_tensors(problem.body, "cpu")
    params["embeddings.word_embeddings.weight"] = torch.full_like(
        params["embeddings.word_embeddings.weight"], float("nan")
    )
    with pytest.raises(FusionError, match="NaN/Inf"):
        collect_grams(problem.body, params, problem.tasks[0].unlabeled, [QUERY])


def test_call_order_and_linear_modules(problem) -> None:
    modules = linear_modules(problem.body)
    assert len(modules) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    order = call_order(
        problem.body, body_tensors(problem.body, "cpu"), problem.tasks[0].unlabeled[0],
        list(modules),
    )  # fmt: skip
    assert order[0] == QUERY and order[-1] == POOLER and len(order) == len(modules)
    assert order.index("encoder.layer.0.output.dense") < order.index(
        "encoder.layer.1.attention.self.query"
    )
    only = linear_modules(problem.body, {weight_name(QUERY), "pooler.dense.bias"})
    assert list(only) == [QUERY]
    lin = nn.Linear(3, 2)
    assert list(linear_modules(lin)) == [""] and weight_name("") == "weight"


def test_example_batches_budget_chunks_and_seed() -> None:
    batches = [{"x": torch.arange(4 * i, 4 * i + 4)} for i in range(3)]  # 12 examples
    chunks, n = example_batches(batches, 5, seed=0)
    assert n == 5 and [len(c["x"]) for c in chunks] == [4, 1]
    again, _ = example_batches(batches, 5, seed=0)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(chunks, again, strict=True))
    small, n = example_batches(batches, 7, seed=1, size=3)
    assert n == 7 and [len(c["x"]) for c in small] == [3, 1, 3]
    everything, n = example_batches(batches, 100, seed=2)
    assert n == 12
    assert sorted(torch.cat([c["x"] for c in everything]).tolist()) == list(range(12))
    orders = {tuple(int(c["x"][0]) for c in example_batches(batches, 12, s)[0]) for s in range(8)}
    assert len(orders) > 1  # the seed shuffles the batches

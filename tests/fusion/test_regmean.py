"""RegMean and RegMean++: least-squares parity on one linear layer, the α = 0 hand case, plain
averages elsewhere, layer-by-layer inputs of RegMean++, grouping, singular systems, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_problems import tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion import regmean
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.regmean import (
    RegMeanConfig,
    block_of,
    layer_groups,
    regmean_merge,
    shrink,
)

EXACT = RegMeanConfig(alpha=1.0)


@pytest.fixture(scope="module")
def bert() -> FusionProblem:
    return tiny_problem(tasks=3, batches=2, n=4)


def _identity(out, batch):
    return out


def _problem(body: nn.Module, inputs: list[torch.Tensor], seed: int = 0) -> FusionProblem:
    """Experts = seeded random weights of ``body``; task i reads ``inputs[i]`` (one batch)."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    experts = tuple(
        {k: torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in inputs
    )
    tasks = tuple(FusionTask(f"t{i}", _identity, 2, ({"input": x},)) for i, x in enumerate(inputs))
    return FusionProblem(body, base, experts, tasks)


def _inputs(rows: list[int], d: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) for n in rows]


def test_single_linear_equals_least_squares() -> None:
    xs = _inputs([5, 9, 7], 4)
    p = _problem(nn.Linear(4, 3), xs)
    # independent: min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² / n_i (FusionBench's Grams are means over rows)
    a = torch.cat([x / len(x) ** 0.5 for x in xs]).double()  # (Σ n_i, in)
    y = torch.cat(
        [x @ e["weight"].T / len(x) ** 0.5 for x, e in zip(xs, p.experts, strict=True)]
    ).double()
    want = torch.linalg.lstsq(a, y).solution.T.float()  # (out, in)
    result = regmean.run(p, EXACT)
    torch.testing.assert_close(result.state["weight"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        result.state["bias"], torch.stack([e["bias"] for e in p.experts]).mean(0)
    )
    assert result.info["examples"] == {"t0": 5, "t1": 9, "t2": 7}
    # one layer: nothing is merged before it, so RegMean++ gives the same weights
    pp = regmean.run_pp(p, EXACT)
    assert pp.info["groups"] == [""]
    torch.testing.assert_close(pp.state["weight"], result.state["weight"])


def test_alpha_zero_is_a_per_input_column_weighted_average() -> None:
    # G_1 = diag(4, 1) / 2 (two rows), G_2 = [[1, 1], [1, 1]] (one row); α = 0 keeps diagonals:
    # column 0: (2·3 + 1·0) / 3 = 2, column 1: (0.5·6 + 1·3) / 1.5 = 4
    xs = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    p = _problem(nn.Linear(2, 1), xs)
    p.experts[0]["weight"].copy_(torch.tensor([[3.0, 6.0]]))
    p.experts[1]["weight"].copy_(torch.tensor([[0.0, 3.0]]))
    out = regmean.run(p, RegMeanConfig(alpha=0.0))
    torch.testing.assert_close(out.state["weight"], torch.tensor([[2.0, 4.0]]))


def test_shrink_and_merge_function() -> None:
    g = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
    torch.testing.assert_close(shrink(g, 0.25), torch.tensor([[4.0, 0.5], [0.5, 3.0]]))
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # one expert, any full-rank Gram: the solution is the expert itself
    torch.testing.assert_close(regmean_merge([w], [g], alpha=0.7), w)
    # identity Grams: the plain average
    merged = regmean_merge([w, -w + 1], [torch.eye(2), torch.eye(2)], alpha=1.0)
    torch.testing.assert_close(merged, torch.full((2, 2), 0.5))


def test_tiny_bert_averages_all_but_linear_weights(bert) -> None:
    result = regmean.run(bert, RegMeanConfig())
    linear = {f"{m}.weight" for m in regmean.linear_modules(bert.body)}
    assert len(linear) == 13 and result.info["averaged_linear"] == []
    for n in bert.names:
        avg = torch.stack([e[n] for e in bert.experts]).mean(0)
        if n in linear:
            assert not torch.allclose(result.state[n], avg, atol=1e-4), n
        else:  # embeddings, LayerNorms, biases
            torch.testing.assert_close(result.state[n], avg, rtol=1e-6, atol=1e-7)
        assert result.state[n].dtype == bert.base[n].dtype


def test_padding_rows_change_the_grams(bert) -> None:
    left_out = regmean.run(bert, RegMeanConfig())
    counted = regmean.run(bert, RegMeanConfig(include_padding=True))
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(left_out.state[q], counted.state[q], atol=1e-5)
    pooler = "pooler.dense.weight"  # its (N, d) input has no padding rows; its input changed
    assert torch.isfinite(counted.state[pooler]).all()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_regmean_pp_feeds_layer_2_through_the_merged_layer_1() -> None:
    xs = _inputs([6, 8], 3, seed=2)
    p = _problem(_mlp(), xs, seed=3)
    plain = regmean.run(p, EXACT)
    pp = regmean.run_pp(p, EXACT)
    assert pp.info["groups"] == ["0", "2"]
    torch.testing.assert_close(pp.state["0.weight"], plain.state["0.weight"])
    assert not torch.allclose(pp.state["2.weight"], plain.state["2.weight"], atol=1e-3)
    # by hand: layer 2's inputs are tanh(merged layer 1) on each task's own inputs
    w1, b1 = pp.state["0.weight"], pp.state["0.bias"]
    hs = [torch.tanh(x @ w1.T + b1) for x in xs]
    grams = [h.T @ h / len(h) for h in hs]
    want = regmean_merge([e["2.weight"] for e in p.experts], grams, alpha=1.0)
    torch.testing.assert_close(pp.state["2.weight"], want, rtol=1e-5, atol=1e-5)
    # plain RegMean: each expert's own layer 1
    hs = [torch.tanh(x @ e["0.weight"].T + e["0.bias"]) for x, e in zip(xs, p.experts, strict=True)]
    grams = [h.T @ h / len(h) for h in hs]
    want = regmean_merge([e["2.weight"] for e in p.experts], grams, alpha=1.0)
    torch.testing.assert_close(plain.state["2.weight"], want, rtol=1e-5, atol=1e-5)


def test_regmean_pp_on_tiny_bert(bert) -> None:
    steps: list[int] = []
    pp = regmean.run_pp(bert, RegMeanConfig(), progress=lambda s, t, loss: steps.append(t))
    plain = regmean.run(bert, RegMeanConfig())
    assert pp.info["groups"] == ["encoder.layer.0", "encoder.layer.1", "pooler.dense"]
    assert steps == [3 * 3 * 2] * 18  # groups × tasks × batches
    q1 = "encoder.layer.1.attention.self.query.weight"
    assert not torch.allclose(pp.state[q1], plain.state[q1], atol=1e-4)
    emb = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(pp.state[emb], plain.state[emb])  # averaged by both
    assert all(torch.isfinite(v).all() for v in pp.state.values())


def test_blocks_and_groups() -> None:
    assert block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert block_of("pooler.dense") == "pooler.dense" and block_of("") == ""
    order = ["enc.1.q", "enc.1.k", "enc.10.q", "pool", "enc.1.q"]
    names = ["emb", "enc.1.q.weight", "enc.1.norm.weight", "enc.10.q.weight", "pool.weight"]
    groups = layer_groups(order, names)
    assert [(g.block, g.modules, g.calls) for g in groups] == [
        ("enc.1", ("enc.1.q", "enc.1.k"), 3),
        ("enc.10", ("enc.10.q",), 1),
        ("pool", ("pool",), 1),
    ]
    assert groups[0].params == ("enc.1.q.weight", "enc.1.norm.weight")
    assert groups[1].params == ("enc.10.q.weight",)


def test_a_feature_that_is_always_zero_keeps_the_average_column() -> None:
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(5, 3, generator=gen) for _ in range(2)]
    for x in xs:
        x[:, 1] = 0.0  # e.g. a LayerNorm gain of 0 before the layer
    p = _problem(nn.Linear(3, 2), xs)
    out = regmean.run(p, EXACT).state["weight"]
    avg = torch.stack([e["weight"] for e in p.experts]).mean(0)
    torch.testing.assert_close(out[:, 1], avg[:, 1])
    live = [0, 2]  # the other columns: least squares on the live features alone
    a = torch.cat([x[:, live] / len(x) ** 0.5 for x in xs]).double()
    y = torch.cat(
        [x @ e["weight"].T / len(x) ** 0.5 for x, e in zip(xs, p.experts, strict=True)]
    ).double()
    want = torch.linalg.lstsq(a, y).solution.T.float()  # (out, live)
    torch.testing.assert_close(out[:, live], want, rtol=1e-5, atol=1e-5)


def test_singular_gram_is_an_error_unless_ridge() -> None:
    x = torch.tensor([[1.0, 2.0, 2.0], [3.0, -1.0, -1.0], [0.5, 1.0, 1.0], [2.0, 0.0, 0.0]])
    xs = [x, x * 2]  # input 2 repeats input 1: collinear features
    p = _problem(nn.Linear(3, 2), xs)
    with pytest.raises(FusionError, match=r"layer '' is singular.*set ridge"):
        regmean.run(p, EXACT)
    ridge = 1e-3
    out = regmean.run(p, RegMeanConfig(alpha=1.0, ridge=ridge))
    lhs = sum(xi.T @ xi / 4 for xi in xs)
    rhs = sum(xi.T @ xi / 4 @ e["weight"].T for xi, e in zip(xs, p.experts, strict=True))
    lhs = lhs + ridge * lhs.diagonal().mean() * torch.eye(3)
    want = torch.linalg.solve(lhs.double(), rhs.double()).T.float()
    torch.testing.assert_close(out.state["weight"], want, rtol=1e-5, atol=1e-5)
    # α < 1 keeps every live feature's own share: no longer singular
    assert torch.isfinite(regmean.run(p, RegMeanConfig(alpha=0.9)).state["weight"]).all()
    # fewer rows than inputs (α = 1): rank-deficient up to float32 rounding
    few = _problem(nn.Linear(6, 2), _inputs([2, 3], 6))
    with pytest.raises(FusionError, match="singular"):
        regmean.run(few, EXACT)
    assert torch.isfinite(regmean.run(few, RegMeanConfig(alpha=0.5)).state["weight"]).all()


def test_errors(bert) -> None:
    no_data = FusionTask("empty", bert.tasks[0].head, 3)
    bad = FusionProblem(bert.body, bert.base, bert.experts[:1], (no_data,))
    for fn, name in ((regmean.run, "regmean"), (regmean.run_pp, "regmean_pp")):
        with pytest.raises(FusionError, match=f"no unlabeled batches, and {name} needs"):
            fn(bad, RegMeanConfig())
    body = nn.Sequential(nn.LayerNorm(3))
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    task = FusionTask("t", _identity, 2, ({"input": torch.ones(2, 3)},))
    norm_only = FusionProblem(body, base, (base,), (task,))
    with pytest.raises(FusionError, match=r"no nn\.Linear"):
        regmean.run(norm_only, RegMeanConfig())
    for field, value in (("alpha", 1.5), ("examples", 0), ("batch_size", 0), ("ridge", -1.0)):
        with pytest.raises(FusionError, match=f"{field}={value}"):
            RegMeanConfig(**{field: value})


def test_specs() -> None:
    assert [s.name for s in regmean.SPECS] == ["regmean", "regmean_pp"]
    assert all(s.category == "needs-data" and s.config is RegMeanConfig for s in regmean.SPECS)
    assert regmean.SPECS[1].make_config({"alpha": 0.95}).alpha == 0.95

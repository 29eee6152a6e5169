"""MagMax, WIDEN and PCB-Merging: hand-computed cases and properties."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods.magmax import MAGMAX
from mergeforge.methods.pcb import PCB
from mergeforge.methods.spec import MethodSpec
from mergeforge.methods.widen import WIDEN

SPECS = (MAGMAX, WIDEN, PCB)


def run(spec: MethodSpec, tensors: list[torch.Tensor], base: torch.Tensor, **params: Any):
    """Call ``spec.fn`` as the engine does: every parameter, given or default."""
    kwargs = {p.name: params.pop(p.name, p.default) for p in spec.params}
    assert not params, f"unknown parameters {params}"
    return spec.fn(tensors, base, **kwargs)


def models(
    shape: tuple[int, ...], k: int, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(k)]


# ---------------------------------------------------------------- MagMax


def test_magmax_hand_computed_keeps_largest_magnitude_later_model_wins_ties():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    x1 = base + torch.tensor([1.0, -3.0, 2.0, -2.0])
    x2 = base + torch.tensor([-2.0, 1.0, 2.0, 2.0])
    # τ_max = [-2 (x2), -3 (x1), 2 (tie, x2), 2 (|−2| = |2|: the later x2 wins, +2)]
    out = run(MAGMAX, [x1, x2], base, **{"lambda": 0.5})
    assert torch.equal(out, torch.tensor([0.0, -0.5, 2.0, 2.0]))
    swapped = run(MAGMAX, [x2, x1], base, **{"lambda": 0.5})
    assert torch.equal(swapped, torch.tensor([0.0, -0.5, 2.0, 0.0]))  # now x1's −2 wins the tie


def test_magmax_single_model_is_that_model_and_lambda_scales_the_task_vector():
    base, (x,) = models((3, 4), 1)
    torch.testing.assert_close(run(MAGMAX, [x], base), x, rtol=0, atol=1e-6)
    out = run(MAGMAX, [x], base, **{"lambda": 0.3})
    torch.testing.assert_close(out, base + 0.3 * (x - base), rtol=0, atol=1e-6)


def test_magmax_result_is_one_of_the_task_vectors_per_entry():
    base, xs = models((6, 5), 4)
    delta = run(MAGMAX, xs, base) - base
    taus = torch.stack([x - base for x in xs])  # (K, 6, 5)
    picked = taus.gather(0, taus.abs().argmax(dim=0, keepdim=True))[0]
    torch.testing.assert_close(delta, picked, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- WIDEN


def test_widen_hand_computed_matrix():
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # column 0 doubled: Δm = [1, 0], Δd = [0, 0]
    x2 = torch.tensor(
        [[1.0, 1.0], [0.0, 0.0]]
    )  # column 1 rotated e2 → e1: Δm = [0, 0], Δd = [0, 1]
    # ranks / n: S^m_1 = [1/2, 0], S^d_1 = [0, 1/2] (tie: column order), S^m_2 = [0, 1/2],
    # S^d_2 = [0, 1/2]. Every mean is 1/4, so the entries 1/2 get s = 1; the rest keep the
    # softmax over models: softmax(0, 1/2)[0] = 1 / (1 + e^½), softmax(0, 0) = ½.
    low = 1 / (1 + math.exp(0.5))
    w1 = [0.5 * (1 + 0.5), 0.5 * (low + 1)]
    w2 = [0.5 * (low + 0.5), 0.5 * (1 + 1)]
    # τ1 = [[1, 0], [0, 0]], τ2 = [[0, 1], [0, −1]]: out[:, j] = b[:, j] + w1[j] τ1[:, j] + w2[j] τ2[:, j]
    expected = torch.tensor([[1 + w1[0], w2[1]], [0.0, 1 - w2[1]]])
    out = run(WIDEN, [x1, x2], base)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert w1[0] == 0.75 and w2[1] == 1.0  # the numbers: [[1.75, 1], [0, 0]]


def test_widen_hand_computed_vector_with_calibration_and_ratio():
    base = torch.zeros(2)
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # S = |τ|: S1 = [1, 0] (mean ½), S2 = [0, 2] (mean 1). κ = 1: S1[0], S2[1] are above → s.
    out = run(WIDEN, [x1, x2], base, score_calibration_value=2.0)
    torch.testing.assert_close(out, torch.tensor([2.0 * 1, 2.0 * 2]), rtol=0, atol=1e-6)
    # κ = 3: nothing is above; softmax over models: col 0 (1, 0), col 1 (0, 2)
    out = run(WIDEN, [x1, x2], base, above_average_value_ratio=3.0)
    expected = torch.tensor([math.e / (math.e + 1), 2 * math.exp(2) / (1 + math.exp(2))])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_widen_columns_out_is_the_transposed_merge():
    base, xs = models((5, 3), 3)
    out = run(WIDEN, xs, base, columns="out")
    transposed = run(WIDEN, [x.T.contiguous() for x in xs], base.T.contiguous())
    torch.testing.assert_close(out, transposed.T, rtol=0, atol=1e-6)
    assert not torch.allclose(out, run(WIDEN, xs, base), atol=1e-4)


def test_widen_single_model_with_unit_calibration_is_that_model():
    for shape in ((4, 6), (7,), (2, 3, 2)):
        base, (x,) = models(shape, 1)
        torch.testing.assert_close(run(WIDEN, [x], base), x, rtol=0, atol=1e-6)


def test_widen_identical_models_without_calibration_average_to_that_model():
    base, (x,) = models((4, 5), 1)
    out = run(WIDEN, [x, x.clone()], base, above_average_value_ratio=1e9)  # softmax: ½ each
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_widen_zero_columns_give_finite_results():
    base = torch.zeros(3, 4)
    x1 = base.clone()
    x1[:, 1] = 1.0
    out = run(WIDEN, [x1, base.clone()], base)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, [0, 2, 3]], torch.zeros(3, 3))


# ---------------------------------------------------------------- PCB


def test_pcb_hand_computed_drop_and_clip():
    base = torch.ones(4)
    t1, t2 = torch.tensor([4.0, 1.0, -2.0, 0.0]), torch.tensor([1.0, 3.0, 2.0, 0.0])
    # d = 4: outlier clip at sorted |τ| index int(4 · 0.9999 − 1) = 2 → |τ̂1| = [2, 1, 2, 0],
    # |τ̂2| = [1, 2, 2, 0]; Norm² = [1, ¼, 1, 0] and [¼, 1, 1, 0]; K = 2 → B_intra = exp(2·Norm²).
    # Σ τ = [5, 4, 0, 0] → B_inter1 = tanh([20, 4, 0, 0]), B_inter2 = tanh([5, 12, 0, 0]).
    b1 = [math.exp(2) * math.tanh(20), math.exp(0.5) * math.tanh(4), 0.0, 0.0]
    b2 = [math.exp(0.5) * math.tanh(5), math.exp(2) * math.tanh(12), 0.0, 0.0]
    # ratio ½: clamp at sorted index int(4 · ½) = 2 (the second largest), then min–max:
    # only each model's top entry survives, with weight 1 → τ_m = [τ̂1[0], τ̂2[1], 0, 0] = [2, 2, 0, 0]
    out = run(PCB, [base + t1, base + t2], base, ratio=0.5, **{"lambda": 0.5})
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 1.0, 1.0]), rtol=0, atol=1e-6)
    # ratio ¾: clamp index int(4 · ¼) = 1 (value 0: nothing dropped); weights = B / max B
    out = run(PCB, [base + t1, base + t2], base, ratio=0.75)
    a, c = b1[1] / b1[0], b2[0] / b2[1]
    expected = [1 + (2 + c * 1) / (1 + c), 1 + (a * 1 + 2) / (a + 1), 1.0, 1.0]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)


def test_pcb_single_model_keeps_its_top_ratio_entries_clipped():
    base, (x,) = models((100,), 1)
    delta = run(PCB, [x], base, ratio=0.2) - base
    tau = x - base
    kept = delta != 0
    # B = exp(Norm²)·tanh(τ²) is increasing in |τ|; the top r·d minus the clamp entry survive
    assert int(kept.sum()) == 100 - int(100 * 0.8) - 1
    top = tau.abs().topk(int(kept.sum())).indices
    assert set(top.tolist()) == set(kept.nonzero().flatten().tolist())
    clip = tau.abs().sort().values[98]  # int(100 · 0.9999 − 1) = 98
    expected = torch.sign(tau) * tau.abs().clamp(max=clip)
    torch.testing.assert_close(delta[kept], expected[kept], rtol=0, atol=1e-6)


def test_pcb_tiny_tensor_keeps_the_base_instead_of_nan():
    base, xs = models((7,), 3)
    out = run(PCB, xs, base)  # int(7 · 0.9) = 6: every row clamps to its maximum → weight 0
    torch.testing.assert_close(out, base, rtol=0, atol=0)


def test_pcb_rejects_a_zero_ratio():
    base, xs = models((8,), 2)
    with pytest.raises(MethodError, match="ratio"):
        run(PCB, xs, base, ratio=0.0)


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(16, 24), (300,), ()])
def test_zero_task_vectors_give_the_base(spec: MethodSpec, shape: tuple[int, ...]):
    base, _ = models(shape, 0)
    out = run(spec, [base.clone(), base.clone(), base.clone()], base)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(16, 24), (300,), (4, 3, 5)])
def test_permutation_invariance(spec: MethodSpec, shape: tuple[int, ...]):
    base, xs = models(shape, 3, seed=1)
    params = {"ratio": 0.3} if spec is PCB else {}
    out = run(spec, xs, base, **params)
    for order in ((2, 0, 1), (1, 2, 0), (0, 2, 1)):
        permuted = run(spec, [xs[i] for i in order], base, **params)
        torch.testing.assert_close(permuted, out, rtol=1e-6, atol=1e-6)
    assert out.shape == base.shape and out.dtype == torch.float32


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_needs_a_base_and_matching_shapes(spec: MethodSpec):
    base, xs = models((4, 4), 2)
    with pytest.raises(MethodError, match="base"):
        run(spec, xs, None)
    with pytest.raises(MethodError, match="shape"):
        run(spec, [xs[0], torch.zeros(4, 5)], base)


@pytest.mark.parametrize("spec", (MAGMAX, PCB), ids=lambda s: s.name)
def test_lambda_scales_the_merged_task_vector(spec: MethodSpec):
    base, xs = models((32, 32), 3)
    one = run(spec, xs, base) - base
    scaled = run(spec, xs, base, **{"lambda": -0.7}) - base
    torch.testing.assert_close(scaled, -0.7 * one, rtol=1e-5, atol=1e-6)


def test_specs_describe_the_methods():
    assert [s.name for s in SPECS] == ["magmax", "widen", "pcb"]
    for spec in SPECS:
        assert spec.base == "required" and not spec.stochastic
        assert spec.paper.startswith("https://arxiv.org/abs/")
    assert PCB.param("ratio").check(0.0) is not None and PCB.param("ratio").check(1.0) is None
    assert WIDEN.param("columns").check("rows") is not None


# ---------------------------------------------------------------- through the engine


def test_cli_merges_apply_the_functions_tensor_by_tensor(tmp_path):
    """`mergeforge merge` on a tiny Llama: every output tensor is the method applied to that
    tensor alone (PCB with `scope: tensor`; whole-model PCB is tested in
    tests/engine/test_global_pass.py); WIDEN's `columns` follows a parameter filter (out for the
    token embedding)."""
    from helpers import run_cli, write_recipe
    from models import load_state, make_family

    base, fts = make_family("llama", tmp_path / "fam", 2, seed=5, hidden=32)
    b, xs = load_state(base), [load_state(f) for f in fts]
    widen_columns = "  columns: [{filter: embed_tokens, value: out}, {value: in}]\n"
    for spec, params, text in (
        (MAGMAX, {"lambda": 0.5}, "  lambda: 0.5\n"),
        (PCB, {"ratio": 0.3, "scope": "tensor"}, "  ratio: 0.3\n  scope: tensor\n"),
        (WIDEN, {}, widen_columns),
    ):
        recipe = write_recipe(
            tmp_path / f"{spec.name}.yml",
            f"merge_method: {spec.name}\nbase_model: {base}\ndtype: float32\nparameters:\n{text}"
            f"models:\n  - model: {fts[0]}\n  - model: {fts[1]}\n",
        )
        assert run_cli("merge", recipe, tmp_path / spec.name) == 0
        merged = load_state(tmp_path / spec.name)
        assert merged.keys() == b.keys()
        for name, got in merged.items():
            extra = {"columns": "out"} if spec is WIDEN and "embed_tokens" in name else {}
            want = run(spec, [x[name] for x in xs], b[name], **params, **extra)
            assert torch.equal(got, want), (spec.name, name)

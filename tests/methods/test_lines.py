"""LiNeS: the `lines` method and the `mergeforge: {lines: ...}` post-scaling of any method."""

from __future__ import annotations

import pytest
import torch
from method_calls import call_method

from helpers import run_cli, write_recipe
from mergeforge.config import parse_recipe
from mergeforge.errors import RecipeError
from mergeforge.io import arch
from mergeforge.methods import Layer, lines_scale
from models import load_state


def test_scale_grows_linearly_from_alpha_to_alpha_plus_beta() -> None:
    # 3 blocks: ℓ/(L−1) = 0, 1/2, 1 → 0.2, 0.2 + 0.6/2 = 0.5, 0.8; outside blocks: α
    assert [lines_scale(Layer(i, 3), 0.2, 0.6) for i in range(3)] == pytest.approx([0.2, 0.5, 0.8])
    assert lines_scale(Layer(None, 3), 0.2, 0.6) == 0.2
    assert lines_scale(Layer(0, 1), 0.2, 0.6) == 0.2  # one block: ℓ/(L−1) taken as 0


def test_hand_computed_case() -> None:
    base = torch.tensor([1.0, 2.0])
    xs = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])]  # τ = [1, 0], [0, 2]
    # default α = 1/T = 0.5; block 1 of 2 → λ = 0.5 + 0.25 = 0.75
    out = call_method("lines", xs, base, weight=(1.0, 2.0), beta=0.25, layer=Layer(1, 2))
    # Σ w τ = [1, 4]; out = b + 0.75 [1, 4] = [1.75, 5.0]
    torch.testing.assert_close(out, torch.tensor([1.75, 5.0]))
    out = call_method("lines", xs, base, weight=1.0, alpha=0.1, beta=0.25, layer=Layer(None, 2))
    torch.testing.assert_close(out, base + 0.1 * torch.tensor([1.0, 2.0]))


def test_alpha_one_beta_zero_is_task_arithmetic_and_zero_task_vectors_give_base() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, generator=g)
    xs = [base + torch.randn(5, 4, generator=g) for _ in range(3)]
    w = (0.3, -0.5, 1.2)
    got = call_method("lines", xs, base, weight=w, alpha=1.0, beta=0.0, layer=Layer(2, 4))
    want = call_method("task_arithmetic", xs, base, weight=w)
    torch.testing.assert_close(got, want)
    same = call_method("lines", [base, base], base, weight=1.0, layer=Layer(3, 4))
    torch.testing.assert_close(same, base)


def _recipe(tmp_path, base, fts, method: str, extra: str) -> object:
    models = "\n".join(f"  - model: {p}\n    parameters: {{weight: 1.0}}" for p in fts)
    return write_recipe(
        tmp_path / f"{method}.yaml",
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}\n{extra}",
    )


def test_lines_method_end_to_end_scales_by_block(tmp_path, llama_family) -> None:
    from transformers import AutoModelForCausalLM

    base, fts = llama_family
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, base, fts, "lines", "parameters: {alpha: 0.3, beta: 0.6}\n")
    assert run_cli("merge", recipe, out, "--quiet") == 0
    AutoModelForCausalLM.from_pretrained(out)
    b, got = load_state(base), load_state(out)
    xs = [load_state(p) for p in fts]
    n_layers = 1 + max(arch.layer_index(k) or 0 for k in b)
    for name, t in got.items():
        scale = lines_scale(Layer(arch.layer_index(name), n_layers), 0.3, 0.6)
        tau = sum(x[name].float() - b[name].float() for x in xs)
        torch.testing.assert_close(t.float(), b[name].float() + scale * tau, rtol=1e-5, atol=1e-6)


def test_post_scaling_applies_to_any_method(tmp_path, llama_family) -> None:
    base, fts = llama_family
    plain, scaled = tmp_path / "plain", tmp_path / "scaled"
    ties = "parameters: {density: 0.5}\n"
    assert run_cli("merge", _recipe(tmp_path, base, fts, "ties", ties), plain, "--quiet") == 0
    extra = ties + "mergeforge: {lines: {alpha: 0.5, beta: 1.0}}\n"
    recipe = write_recipe(
        tmp_path / "s.yaml", _recipe(tmp_path, base, fts, "ties", extra).read_text()
    )
    assert run_cli("merge", recipe, scaled, "--quiet") == 0
    b, p, s = load_state(base), load_state(plain), load_state(scaled)
    n_layers = 1 + max(arch.layer_index(k) or 0 for k in b)
    for name in b:
        lam = lines_scale(Layer(arch.layer_index(name), n_layers), 0.5, 1.0)
        want = b[name].float() + lam * (p[name].float() - b[name].float())
        torch.testing.assert_close(s[name].float(), want, rtol=1e-5, atol=1e-6)
    assert "lines: LiNeS post-scaling" in (scaled / "README.md").read_text()


@pytest.mark.parametrize(
    "value", [{"alpha": 0.5}, {"alpha": "x", "beta": 1}, 0.5, {"alpha": 1, "beta": 1, "g": 2}]
)
def test_bad_lines_option_is_a_recipe_error(value) -> None:
    data = {"merge_method": "ties", "models": [{"model": "a"}], "mergeforge": {"lines": value}}
    with pytest.raises(RecipeError, match=r"mergeforge\.lines"):
        parse_recipe(data)


def test_post_scaling_without_a_base_is_a_plan_error(tmp_path, llama_family, capsys) -> None:
    _base, fts = llama_family
    models = "\n".join(f"  - model: {p}\n    parameters: {{weight: 0.5}}" for p in fts[:2])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n{models}\nmergeforge: {{lines: {{alpha: 1, beta: 0}}}}\n",
    )
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet") != 0
    assert "needs `base_model:`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

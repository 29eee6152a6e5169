"""Same YAML recipe, same tensors: mergeforge against mergekit 0.1.5 on tiny random models.

Each recipe in ``recipes/`` is rendered for Llama (untied and tied embeddings), GPT-2 and
BertForSequenceClassification families (base + 3 fine-tunes). mergekit runs every recipe once, and
mergeforge runs every recipe once. Then:

* Deterministic methods (linear, task_arithmetic, ties) must agree to 1e-6 relative per tensor:
  max|a - b| / max|b| <= 1e-6. Both tools compute in fp32, and the only permitted difference is the
  order of a handful of fp32 additions and multiplications. Each rounds to 0.5 ulp = 6e-8 relative
  to the largest term, so five or six of them stay far below 1e-6. Any real difference (a wrong
  weight, t, filter, mask or normalisation) is at least 1e-3 here, because task vectors are about
  5% of the weights.
* DARE cannot match bit for bit (mergekit draws Bernoulli masks from the global torch RNG in
  sorted-name order), so it must match in distribution. The fraction of entries changed from the
  base must be within a binomial tolerance of 1 - prod(1 - density_i). The least-squares slope and
  relative residual of the merged task vector against sum_i w_i * tau_i must agree between the
  tools. Repeating a mergeforge merge with the same --seed must give byte-identical files.
* A hand-written reference of the mergekit formulas (below) must reproduce mergekit's own output.
  This self-check keeps the comparisons honest. The same reference is also the oracle for
  BertModel, which mergekit 0.1.5 cannot plan.
* The output directory must load in transformers with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from models import load_state
from parity.parity_harness import (
    ALL_KINDS,
    DETERMINISTIC,
    PARITY_KINDS,
    RECIPES,
    SEED,
    STOCHASTIC,
    MergeforgeRunner,
)

pytestmark = pytest.mark.parity

REL_TOL = 1e-6
LAYER_RE = re.compile(r"\.(\d+)\.")
MISSING = object()


# --- reference: mergekit 0.1.5 semantics, written from its documented behaviour -------------------


def _resolve(setting: Any, name: str, t: float) -> Any:
    """A parameter value for tensor ``name`` at depth ``t`` (gradients, filters); None: no match."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if setting and all(not isinstance(e, dict) for e in setting):
        if any(isinstance(e, bool) or not isinstance(e, int | float) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        pos = t * (len(setting) - 1)
        i0 = int(pos)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (pos - i0)) * setting[i0] + (pos - i0) * setting[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in name:
            return _resolve(cond["value"], name, t)
    return None


def _param(
    recipe: dict, model: str | None, key: str, name: str, t: float, default: Any = MISSING
) -> Any:
    """``model``'s parameters (None: shared parameter), then the global ``parameters``, then
    ``default``; the first scope giving a non-None value wins."""
    per_model = [m.get("parameters") for m in recipe["models"] if m["model"] == model]
    for scope in [*per_model, recipe.get("parameters")]:
        if scope and key in scope:
            value = _resolve(scope[key], name, t)
            if value is not None:
                return value
    if default is MISSING:
        raise KeyError(f"{key} for {model} / {name}")
    return default


def _layer_t(name: str, num_layers: int) -> float:
    """t = i / (L - 1) for tensors of layer i; 0 for embeddings, final norm, heads."""
    match = LAYER_RE.search(name)
    if match is None:
        return 0.0
    return 1.0 if num_layers == 1 else int(match.group(1)) / (num_layers - 1)


def _topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the max(1, int(density * n)) largest |delta| (all if density >= 1, none if <= 0)."""
    if density >= 1:
        return torch.ones_like(delta)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    if density > 0:
        k = max(1, int(density * delta.numel()))
        mask[torch.topk(delta.abs().flatten(), k).indices] = 1
    return mask.view_as(delta)


def _gta(recipe: dict, st: dict, name: str, t: float, base: str, others: list[str]) -> torch.Tensor:
    """task_arithmetic / ties: b + lambda * [normalize] sum_i w_i m_i trim(tau_i) / sum_i w_i m_i."""
    ties = recipe["merge_method"] == "ties"
    b = st[base][name]
    weights = [_param(recipe, m, "weight", name, t) for m in others]
    deltas = []
    for m, w in zip(others, weights, strict=True):
        tau = st[m][name] - b
        if ties:
            tau = tau * _topk_mask(tau, _param(recipe, m, "density", name, t, 1.0))
        deltas.append(w * tau)
    stacked = torch.stack(deltas)  # (n_models, *shape)
    w_col = torch.tensor(weights).view(-1, *[1] * b.dim())  # (n_models, 1, ...)
    if ties:
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        keep = (stacked.sign() == sign).to(b.dtype)
        mixed, divisor = (stacked * keep).sum(0), (w_col * keep).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = stacked.sum(0), w_col.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if _param(recipe, None, "normalize", name, t, ties):
        mixed = mixed / divisor
    return b + _param(recipe, None, "lambda", name, t, 1.0) * mixed


def reference_merge(recipe_path: Path) -> dict[str, torch.Tensor]:
    """mergekit's result for a deterministic recipe (linear, task_arithmetic, ties) in fp32."""
    recipe = yaml.safe_load(recipe_path.read_text())
    models = [m["model"] for m in recipe["models"]]
    base = recipe.get("base_model")
    if base is not None and base not in models:
        models.append(base)
        recipe["models"].append({"model": base})
    st = {m: load_state(m) for m in models}
    cfg = json.loads((Path(models[0]) / "config.json").read_text())
    num_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    out = {}
    for name, first in st[models[0]].items():
        t = _layer_t(name, num_layers)
        if recipe["merge_method"] == "linear":
            weights = [_param(recipe, m, "weight", name, t) for m in models]
            acc = sum(w * st[m][name] for m, w in zip(models, weights, strict=True))
            norm = _param(recipe, None, "normalize", name, t, True)
            out[name] = acc / sum(weights) if norm else acc
        else:
            out[name] = _gta(recipe, st, name, t, base, [m for m in models if m != base])
        out[name] = out[name].to(first.dtype)
    return out


# --- comparison helpers -----------------------------------------------------------------------------


def _signature(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _assert_close(actual: dict, expected: dict, what: str) -> None:
    assert _signature(actual) == _signature(expected), f"{what}: tensor names/shapes/dtypes differ"
    worst = (0.0, "")
    for name, exp in expected.items():
        err = (actual[name].double() - exp.double()).abs().max()
        rel = (err / exp.double().abs().max().clamp_min(1e-30)).item()
        worst = max(worst, (rel, name))
    assert worst[0] <= REL_TOL, (
        f"{what}: {worst[1]} differs by {worst[0]:.3g} relative (> {REL_TOL})"
    )


def _mergekit_out(outputs: dict, kind: str, recipe: str) -> Path:
    result = outputs[(kind, recipe)]
    if isinstance(result, str):
        pytest.fail(f"mergekit failed on {kind}/{recipe} (harness bug?): {result}")
    return result


def _case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


def _cases(kinds: tuple[str, ...], recipes: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(k, r) for k in kinds for r in recipes]


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases(PARITY_KINDS, DETERMINISTIC), ids=_case_id)
def test_reference_reproduces_mergekit(case, recipe_files, mergekit_outputs) -> None:
    """Harness self-check: the hand-written formulas give mergekit's tensors."""
    expected = load_state(_mergekit_out(mergekit_outputs, *case))
    _assert_close(reference_merge(recipe_files[case]), expected, f"reference vs mergekit {case}")


@pytest.mark.parametrize("case", _cases(PARITY_KINDS, RECIPES), ids=_case_id)
def test_same_tensor_names_shapes_dtypes(case, recipe_files, mergekit_outputs, mergeforge) -> None:
    expected = _signature(load_state(_mergekit_out(mergekit_outputs, *case)))
    actual = _signature(load_state(mergeforge.run(recipe_files[case], _case_id(case))))
    assert sorted(actual) == sorted(expected), (
        f"only in mergeforge: {sorted(set(actual) - set(expected))}; "
        f"only in mergekit: {sorted(set(expected) - set(actual))}"
    )
    assert actual == expected


@pytest.mark.parametrize("case", _cases(PARITY_KINDS, DETERMINISTIC), ids=_case_id)
def test_deterministic_values_match(case, recipe_files, mergekit_outputs, mergeforge) -> None:
    expected = load_state(_mergekit_out(mergekit_outputs, *case))
    actual = load_state(mergeforge.run(recipe_files[case], _case_id(case)))
    _assert_close(actual, expected, f"mergeforge vs mergekit {case}")


@pytest.mark.parametrize("recipe", DETERMINISTIC)
def test_bertmodel_matches_reference(recipe, recipe_files, mergeforge) -> None:
    """BertModel: mergekit 0.1.5 cannot plan it, so the reference formulas are the oracle."""
    path = recipe_files[("bert", recipe)]
    actual = load_state(mergeforge.run(path, f"bert-{recipe}"))
    _assert_close(actual, reference_merge(path), f"mergeforge vs reference bert/{recipe}")


# --- DARE: equal in distribution --------------------------------------------------------------------

Z_TENSOR = 5.0  # binomial z-score bound per tensor (tiny tensors: 32 entries and up)
Z_MODEL = 5.0  # and for the whole model pooled
SLOPE_TOL = 0.05  # |slope_mergeforge - slope_mergekit|; seed-to-seed spread of one tool is ~0.01
RESID_TOL = 0.03  # |residual_mergeforge - residual_mergekit|; seed-to-seed spread ~0.005


def dare_statistics(out: Path, recipe_path: Path) -> dict[str, float]:
    """Kept fraction vs expectation, and fit of the merged task vector to sum_i w_i tau_i.

    For each float tensor: delta = out - base, expect = sum_i w_i (ft_i - base), kept = share of
    entries with delta != 0, whose expectation is p = 1 - prod_i (1 - density_i) for both
    dare_linear and dare_ties (an entry survives when any model keeps it: the elected sign is the
    sign of the sum of kept terms, so at least one of them agrees). slope = <delta, expect> /
    <expect, expect>, residual = |delta - slope * expect| / |expect|, both numel-weighted means.
    """
    recipe = yaml.safe_load(recipe_path.read_text())
    base_path = recipe["base_model"]
    others = [m["model"] for m in recipe["models"] if m["model"] != base_path]
    base, fts, merged = load_state(base_path), [load_state(m) for m in others], load_state(out)
    cfg = json.loads((Path(base_path) / "config.json").read_text())
    num_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    kept = expected_kept = total = slope = resid = 0.0
    worst_z, worst_name = 0.0, ""
    for name, b in base.items():
        t = _layer_t(name, num_layers)
        weights = [_param(recipe, m, "weight", name, t) for m in others]
        p = 1.0
        for m in others:
            p *= 1.0 - _param(recipe, m, "density", name, t, 1.0)
        p = 1.0 - p
        delta = merged[name].double() - b.double()
        expect = sum(
            w * (ft[name].double() - b.double()) for w, ft in zip(weights, fts, strict=True)
        )
        n = delta.numel()
        k = (delta != 0).sum().item()
        z = abs(k / n - p) / max((p * (1 - p) / n) ** 0.5, 1e-12)
        if z > worst_z:
            worst_z, worst_name = z, name
        s = ((delta * expect).sum() / (expect * expect).sum()).item()
        kept, expected_kept, total = kept + k, expected_kept + p * n, total + n
        slope += s * n
        resid += ((delta - s * expect).norm() / expect.norm()).item() * n
    p_all = expected_kept / total
    z_all = abs(kept / total - p_all) / (p_all * (1 - p_all) / total) ** 0.5
    return {
        "z_model": z_all,
        "z_tensor": worst_z,
        "worst_tensor": worst_name,
        "slope": slope / total,
        "residual": resid / total,
    }


def _check_dare_alone(stats: dict, who: str) -> None:
    assert stats["z_tensor"] <= Z_TENSOR, f"{who}: kept fraction off in {stats['worst_tensor']}"
    assert stats["z_model"] <= Z_MODEL, f"{who}: whole-model kept fraction off: {stats}"


@pytest.mark.parametrize("case", _cases(PARITY_KINDS, STOCHASTIC), ids=_case_id)
def test_dare_equal_in_distribution(case, recipe_files, mergekit_outputs, mergeforge) -> None:
    recipe = recipe_files[case]
    ours = dare_statistics(mergeforge.run(recipe, _case_id(case)), recipe)
    theirs = dare_statistics(_mergekit_out(mergekit_outputs, *case), recipe)
    _check_dare_alone(theirs, f"mergekit {case} (harness bug?)")
    _check_dare_alone(ours, f"mergeforge {case}")
    if case[1] == "dare_linear":  # L1 rescale keeps E[merged task vector] = sum_i w_i tau_i
        assert abs(theirs["slope"] - 1) <= SLOPE_TOL, f"mergekit {case}: {theirs}"
    assert abs(ours["slope"] - theirs["slope"]) <= SLOPE_TOL, f"slope: {ours} vs {theirs}"
    assert abs(ours["residual"] - theirs["residual"]) <= RESID_TOL, f"residual: {ours} vs {theirs}"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_seed_gives_identical_files(kind, recipe_files, mergeforge: MergeforgeRunner) -> None:
    recipe = recipe_files[(kind, "dare_ties")]
    first = mergeforge.run(recipe, f"{kind}-dare_ties")
    again = mergeforge.run(recipe, f"{kind}-dare_ties-again")
    other = mergeforge.run(recipe, f"{kind}-dare_ties-seed+1", seed=SEED + 1)
    files = sorted(p.name for p in first.glob("*.safetensors*"))
    assert files, f"no safetensors files in {first}"
    assert files == sorted(p.name for p in again.glob("*.safetensors*"))
    for name in files:
        assert (first / name).read_bytes() == (again / name).read_bytes(), f"{name} differs"
    a, b = load_state(first), load_state(other)
    assert any(not torch.equal(a[k], b[k]) for k in a), "--seed has no effect on dare_ties"


# --- the output is a loadable Hugging Face directory -------------------------------------------------


def _load_info(out: Path) -> dict[str, Any]:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(out)
    model_cls = getattr(transformers, cfg.architectures[0])
    _, info = model_cls.from_pretrained(out, output_loading_info=True)
    return info


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_output_loads_in_transformers(kind, recipe_files, mergeforge) -> None:
    info = _load_info(mergeforge.run(recipe_files[(kind, "ties")], f"{kind}-ties"))
    assert not info["missing_keys"], f"missing: {sorted(info['missing_keys'])}"
    assert not info["unexpected_keys"], f"unexpected: {sorted(info['unexpected_keys'])}"
    assert not info.get("mismatched_keys"), f"mismatched: {info['mismatched_keys']}"


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_config_json_matches(kind, recipe_files, mergekit_outputs, mergeforge) -> None:
    """config.json equals mergekit's (the base's config with dtype set), apart from versions."""
    ours_dir = mergeforge.run(recipe_files[(kind, "ties")], f"{kind}-ties")
    theirs_dir = _mergekit_out(mergekit_outputs, kind, "ties")
    drop = {"transformers_version", "mergeforge_version"}
    ours = {k: v for k, v in json.loads((ours_dir / "config.json").read_text()).items()}
    theirs = json.loads((theirs_dir / "config.json").read_text())
    assert {k: v for k, v in ours.items() if k not in drop} == {
        k: v for k, v in theirs.items() if k not in drop
    }
    assert (ours_dir / "README.md").is_file(), "mergeforge wrote no README.md model card"

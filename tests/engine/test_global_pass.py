"""TIES trimmed over the whole model (paper / FusionBench variant): the first streaming pass."""

from __future__ import annotations

import pytest
import torch

from helpers import run_cli, write_recipe
from mergeforge.config import parse_recipe
from mergeforge.engine.execute import ExecOptions
from mergeforge.engine.global_pass import model_thresholds
from mergeforge.engine.plan import build_plan
from mergeforge.errors import PlanError
from mergeforge.methods import find_method
from models import load_state


def _recipe(base, fts, density0="0.3", extra=""):
    return f"""\
merge_method: ties
base_model: {base}
models:
  - model: {fts[0]}
    parameters: {{weight: 1.0, density: {density0}}}
  - model: {fts[1]}
    parameters: {{weight: 1.0, density: 0.6}}
parameters: {{trim_scope: model{extra}}}
"""


def _kth_smallest_over_model(base, ft, names, density):
    b, x = load_state(base), load_state(ft)
    v = torch.cat([(x[n].float() - b[n].float()).abs().reshape(-1) for n in names])
    r = v.numel() - int(v.numel() * density)
    return float(torch.kthvalue(v, r).values)


def test_thresholds_equal_kthvalue_over_the_concatenated_task_vector(llama_family):
    import yaml

    base, fts = llama_family
    plan = build_plan(parse_recipe(yaml.safe_load(_recipe(base, fts))))
    got = model_thresholds(plan, ExecOptions())
    names = [t.name for t in plan.tensors if t.op == "merge"]
    plan.close()
    assert got[0] == _kth_smallest_over_model(base, fts[0], names, 0.3)
    assert got[1] == _kth_smallest_over_model(base, fts[1], names, 0.6)


def test_model_scope_merge_uses_the_global_threshold(llama_family, tmp_path):
    base, fts = llama_family
    r = write_recipe(tmp_path / "r.yaml", _recipe(base, fts))
    assert run_cli("merge", r, tmp_path / "o", "--quiet") == 0
    out, b = load_state(tmp_path / "o"), load_state(base)
    xs = [load_state(f) for f in fts[:2]]
    names = list(out)
    t = (
        _kth_smallest_over_model(base, fts[0], names, 0.3),
        _kth_smallest_over_model(base, fts[1], names, 0.6),
    )
    ties = find_method("ties").fn
    kept = 0
    for n in names:
        want = ties([x[n] for x in xs], b[n], weight=(1.0, 1.0), density=(0.3, 0.6),
                    trim_scope="model", threshold=t)  # fmt: skip
        assert torch.equal(out[n], want), n
        kept += int(((xs[0][n] - b[n]).abs() >= t[0]).sum())
    total = sum(out[n].numel() for n in names)
    assert kept == total - (total - int(total * 0.3)) + 1  # r-th smallest kept with all above it


def test_model_scope_needs_one_density_per_model(llama_family, tmp_path, capsys):
    base, fts = llama_family
    r = write_recipe(tmp_path / "r.yaml", _recipe(base, fts, density0="[0.2, 0.4]"))
    assert run_cli("merge", r, tmp_path / "o", "--quiet") != 0
    assert "same for every tensor" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_trim_scope_is_rejected(llama_family):
    import yaml

    base, fts = llama_family
    bad = _recipe(base, fts).replace("trim_scope: model", "trim_scope: layer")
    with pytest.raises(PlanError, match="trim_scope"):
        build_plan(parse_recipe(yaml.safe_load(bad)))


def _pcb_recipe(tmp_path, base, fts, scope: str):
    from helpers import write_recipe

    models = "\n".join(f"  - model: {p}" for p in fts)
    return write_recipe(
        tmp_path / f"pcb_{scope}.yaml",
        f"merge_method: pcb\nbase_model: {base}\nmodels:\n{models}\n"
        f"parameters: {{ratio: 0.3, lambda: 0.8, scope: {scope}}}\n",
    )


def test_whole_model_pcb_equals_pcb_of_the_flattened_model(tmp_path, llama_family):
    """scope: model streams; the result equals the official formulation, which flattens each
    model into one (K, D) matrix."""
    from helpers import run_cli
    from mergeforge.methods.pcb import pcb_task_vector
    from models import load_state

    base, fts = llama_family
    out = tmp_path / "model"
    assert run_cli("merge", _pcb_recipe(tmp_path, base, fts, "model"), out, "--quiet") == 0
    b, xs, got = load_state(base), [load_state(p) for p in fts], load_state(out)
    names = sorted(b)
    flat_b = torch.cat([b[n].float().reshape(-1) for n in names])
    taus = torch.stack([torch.cat([x[n].float().reshape(-1) for n in names]) - flat_b for x in xs])
    want = flat_b + 0.8 * pcb_task_vector(taus, 0.3)
    flat_got = torch.cat([got[n].float().reshape(-1) for n in names])
    torch.testing.assert_close(flat_got, want, rtol=1e-5, atol=1e-6)
    per_tensor = tmp_path / "tensor"
    assert run_cli("merge", _pcb_recipe(tmp_path, base, fts, "tensor"), per_tensor, "--quiet") == 0
    t = load_state(per_tensor)
    name = "model.layers.0.mlp.up_proj.weight"
    tau_t = torch.stack([x[name].float().reshape(-1) - b[name].float().reshape(-1) for x in xs])
    want_t = b[name].float().reshape(-1) + 0.8 * pcb_task_vector(tau_t, 0.3)
    torch.testing.assert_close(t[name].float().reshape(-1), want_t, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(t[name].float(), got[name].float())  # the scopes differ

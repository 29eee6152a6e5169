"""Reversible merges: artifacts saved beside the model, `mergeforge recover`, error accounting.

Uses two test-only methods (patched into the planner's and recover's method lookup): one that
saves every task vector exactly (recovery is exact), one that saves them rounded to float16
(recovery error is known in closed form).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from helpers import run_cli, write_recipe
from mergeforge.engine import plan as plan_mod
from mergeforge.engine import recover as recover_mod
from mergeforge.methods import ArtifactSpec, MethodSpec, ParamSpec, find_method
from models import load_state


def _average(tensors, base, *, lossy: bool = False, artifacts: bool = False):
    merged = base + torch.stack([x - base for x in tensors]).mean(0)
    if not artifacts:
        return merged
    deltas = torch.stack([x - base for x in tensors])  # (K, *shape)
    return merged, {"deltas": deltas.half() if lossy else deltas}


def _shapes(shape, k, params):
    dt = torch.float16 if params["lossy"] else torch.float32
    return {"deltas": ((k, *shape), dt)}


def _recover(arts, base, i, params):
    return base + arts["deltas"][i].float()


SPEC = MethodSpec(
    name="test_reversible",
    fn=_average,
    summary="test-only: average, saving every task vector",
    base="required",
    params=(ParamSpec("lossy", "bool", "global", "round saved task vectors", default=False),),
    locality="elementwise",
    stochastic=False,
    paper="",
    artifacts=ArtifactSpec(
        enabled=lambda p: True, shapes=_shapes, recover=_recover, doc="task vectors"
    ),
)


@pytest.fixture
def reversible(monkeypatch):
    def find(name):
        return SPEC if name == SPEC.name else find_method(name)

    monkeypatch.setattr(plan_mod, "find_method", find)
    monkeypatch.setattr(recover_mod, "get_method", lambda name: find(name))


def _recipe(tmp_path, family, lossy: bool):
    base, fts = family
    models = "\n".join(f"  - model: {p}" for p in fts)
    return write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: test_reversible\nbase_model: {base}\nmodels:\n{models}\n"
        f"parameters:\n  lossy: {str(lossy).lower()}\n",
    )


def test_exact_artifacts_recover_every_input_bit_for_bit(reversible, tmp_path, llama_family):
    _base, fts = llama_family
    out = tmp_path / "out"
    assert run_cli("merge", _recipe(tmp_path, llama_family, False), out, "--quiet") == 0
    manifest = json.loads((out / "artifacts" / "artifacts.json").read_text())
    assert [m["rel_error"] for m in manifest["models"]] == [0.0, 0.0, 0.0]
    assert "Reversible" in (out / "README.md").read_text()
    for i, ft in enumerate(fts):
        dest = tmp_path / f"rec{i}"
        assert run_cli("recover", out, dest, "--model", str(i)) == 0
        got, want = load_state(dest), load_state(ft)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert (tmp_path / "rec0" / "config.json").is_file()


def test_lossy_artifacts_report_the_true_error(reversible, tmp_path, llama_family):
    base, fts = llama_family
    out = tmp_path / "out"
    assert run_cli("merge", _recipe(tmp_path, llama_family, True), out, "--quiet") == 0
    manifest = json.loads((out / "artifacts" / "artifacts.json").read_text())
    b = load_state(base)
    for i, ft in enumerate(fts):
        x = load_state(ft)
        err = norm = 0.0
        for name, t in x.items():
            if not t.is_floating_point():
                continue
            d = t.float() - b[name].float()
            err += float((d.half().float() - d).double().square().sum())
            norm += float(d.double().square().sum())
        assert manifest["models"][i]["rel_error"] == pytest.approx(math.sqrt(err / norm), rel=1e-4)
        assert 0 < manifest["models"][i]["rel_error"] < 1e-3
    dest = tmp_path / "rec1"
    assert run_cli("recover", out, dest, "--model", str(fts[1])) == 0  # by label
    got = load_state(dest)
    assert set(got) == set(load_state(fts[1]))


def test_recover_without_artifacts_or_bad_model_is_a_clear_error(
    reversible, tmp_path, llama_family, capsys
):
    base, fts = llama_family
    out = tmp_path / "out"
    assert run_cli("merge", _recipe(tmp_path, llama_family, False), out, "--quiet") == 0
    assert run_cli("recover", out, tmp_path / "x", "--model", "7") != 0
    err = capsys.readouterr().err
    assert "no input model '7'" in err and "0: " in err
    assert not (tmp_path / "x").exists()
    plain = tmp_path / "plain"
    recipe = write_recipe(
        tmp_path / "p.yaml",
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n"
        "parameters:\n  weight: 1.0\n",
    )
    assert run_cli("merge", recipe, plain, "--quiet") == 0
    assert run_cli("recover", plain, tmp_path / "y", "--model", "0") != 0
    assert "artifacts.json does not exist" in capsys.readouterr().err


def test_method_returning_undeclared_artifacts_fails_and_writes_nothing(
    monkeypatch, tmp_path, llama_family, capsys
):
    bad = dataclasses.replace(
        SPEC,
        artifacts=dataclasses.replace(
            SPEC.artifacts, shapes=lambda s, k, p: {"x": (s, torch.float32)}
        ),
    )
    monkeypatch.setattr(
        plan_mod, "find_method", lambda n: bad if n == SPEC.name else find_method(n)
    )
    out = tmp_path / "out"
    assert run_cli("merge", _recipe(tmp_path, llama_family, False), out, "--quiet") != 0
    assert "declares ['x']" in capsys.readouterr().err
    assert not out.exists()

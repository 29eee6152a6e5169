"""The command line: validate, plan, methods, and the light import of the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import run_cli, write_recipe
from mergeforge.cli import parse_size


def test_import_is_light():
    code = "import mergeforge, sys; assert 'transformers' not in sys.modules, 'heavy import'"
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=src))


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1024") == 1024


def test_validate_ok_and_plan_json(llama_family, tmp_path, capsys):
    base, fts = llama_family
    r = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {fts[0]}\n    parameters: {{weight: [0, 1], density: 0.5}}\n"
        f"  - model: {base}\n",
    )
    assert run_cli("validate", r) == 0
    assert "OK" in capsys.readouterr().out
    assert run_cli("plan", r, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "ties" and plan["models"] == [str(fts[0])]
    by_name = {t["name"]: t for t in plan["tensors"]}
    assert by_name["model.embed_tokens.weight"]["params"]["weight"] == [0.0]  # t = 0
    last = max(int(n.split(".")[2]) for n in by_name if n.startswith("model.layers."))
    assert by_name[f"model.layers.{last}.mlp.up_proj.weight"]["params"]["weight"] == [1.0]
    assert plan["bytes_read"] > 0 and plan["peak_memory_bytes"] > plan["largest_tensor_work_bytes"]
    assert run_cli("plan", r) == 0
    text = capsys.readouterr().out
    assert "estimated peak memory" in text and "model.layers.0.mlp.up_proj.weight" in text


def test_validate_reports_problems_without_traceback(tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yaml", "merge_method: nope\nmodels: [{model: /nonexistent}]\n")
    assert run_cli("validate", r) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_methods_json_lists_parameters(capsys):
    assert run_cli("methods", "--json") == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(methods)
    ties = methods["ties"]
    assert ties["category"] == "data-free" and ties["paper"].startswith("https://")
    params = {p["name"]: p for p in ties["parameters"]}
    assert params["density"]["scope"] == "per_model" and params["density"]["range"] == "[0, 1]"
    assert all(p["doc"] for m in methods.values() for p in m["parameters"])
    ada = methods["adamerging"]
    assert ada["category"] == "needs-data" and "test inputs" in ada["data"]
    assert {p["name"]: p["default"] for p in ada["parameters"]}["init"] == 0.3
    assert methods["smile"]["category"] == "dynamic"
    assert run_cli("methods") == 0
    out = capsys.readouterr().out
    assert "dare_ties" in out and "twin_merging  [dynamic]" in out


def test_readme_method_table_is_generated_from_the_registry():
    from mergeforge.cli import methods_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- methods:begin -->\n")[1].split("\n<!-- methods:end -->")[0]
    assert block == methods_markdown(), "regenerate with `mergeforge methods --markdown`"

"""Every kind of bad input ends in one clear message, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from helpers import run_cli, write_recipe
from models import make_family

TA = """\
merge_method: {method}
base_model: {base}
models:
  - model: {ft0}
    parameters: {{weight: 0.5{extra}}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
"""


@pytest.fixture
def fam(tmp_path):
    """A private copy of a tiny Llama family that a test may corrupt."""
    base, fts = make_family("llama", tmp_path / "m", 2, seed=3, num_layers=2)
    return base, fts


def _recipe(tmp_path: Path, base, fts, method="task_arithmetic", extra="", text=None) -> Path:
    body = text or TA.format(method=method, base=base, ft0=fts[0], ft1=fts[1], extra=extra)
    return write_recipe(tmp_path / "recipe.yaml", body)


def _fails(capsys, tmp_path: Path, recipe: Path, *words: str, out: str = "out") -> str:
    code = run_cli("merge", recipe, tmp_path / out, "--quiet")
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, f"{w!r} not in:\n{err}"
    leftovers = [p.name for p in tmp_path.iterdir() if "mergeforge-tmp" in p.name]
    if out == "out":
        assert not (tmp_path / out).exists()
    assert not leftovers
    return err


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), n


def _rewrite_header(path: Path, header: dict) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def test_missing_model_file(capsys, tmp_path, fam):
    base, fts = fam
    shutil.rmtree(fts[1])
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), str(fts[1]), "no such file")


def test_hub_id_is_not_downloaded(capsys, tmp_path, fam):
    base, fts = fam
    r = _recipe(tmp_path, base, [fts[0], "meta-llama/Llama-3-8B"])
    _fails(capsys, tmp_path, r, "never downloads", "huggingface-cli download")


def test_truncated_safetensors(capsys, tmp_path, fam):
    base, fts = fam
    f = fts[0] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), str(f), "truncated")


def test_header_lies_about_offsets(capsys, tmp_path, fam):
    base, fts = fam
    f = fts[0] / "model.safetensors"
    header, _ = _header(f)
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4, end + 4]
    _rewrite_header(f, header)
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), str(f))


def test_header_lies_about_dtype(capsys, tmp_path, fam):
    base, fts = fam
    f = fts[0] / "model.safetensors"
    header, _ = _header(f)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F16"  # half the bytes the offsets span
    _rewrite_header(f, header)
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), str(f), name)


def test_unknown_dtype(capsys, tmp_path, fam):
    base, fts = fam
    f = fts[0] / "model.safetensors"
    header, _ = _header(f)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F12"
    _rewrite_header(f, header)
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), "F12", str(f))


def _edit_state(ft: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = ft / "model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f, metadata={"format": "pt"})


def test_shape_mismatch_between_models(capsys, tmp_path, fam):
    base, fts = fam
    key = "model.layers.0.mlp.up_proj.weight"
    _edit_state(fts[0], lambda s: s.__setitem__(key, torch.zeros(3, 3)))
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), key, "shapes differ", "[3, 3]")


def test_missing_tensor_in_one_model(capsys, tmp_path, fam):
    base, fts = fam
    key = "model.layers.1.self_attn.q_proj.weight"
    _edit_state(fts[1], lambda s: s.pop(key))
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), key, "missing", str(fts[1]))


def test_nan_in_an_input_is_an_error_by_default(capsys, tmp_path, fam):
    base, fts = fam
    key = "model.layers.0.mlp.down_proj.weight"

    def poison(s):
        s[key][0, 0] = float("nan")

    _edit_state(fts[0], poison)
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), key, "NaN", "allow_nonfinite")


def test_nan_opt_in_merges_and_is_recorded(capsys, tmp_path, fam):
    base, fts = fam
    key = "model.layers.0.mlp.down_proj.weight"

    def poison(s):
        s[key][0, 0] = float("inf")

    _edit_state(fts[0], poison)
    text = TA.format(method="task_arithmetic", base=base, ft0=fts[0], ft1=fts[1], extra="")
    r = write_recipe(tmp_path / "r.yaml", text + "mergeforge: {allow_nonfinite: true}\n")
    assert run_cli("merge", r, tmp_path / "out", "--quiet") == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "allow_nonfinite: merge inputs" in card.split("## Opt-ins in effect")[1]


def test_vocab_mismatch_is_an_error_unless_opted_in(capsys, tmp_path, fam):
    base, fts = fam

    def grow(s):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            s[k] = torch.cat([s[k], torch.zeros(8, s[k].shape[1])])

    _edit_state(fts[1], grow)
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), "vocabulary", "truncate_embeddings")
    text = TA.format(method="task_arithmetic", base=base, ft0=fts[0], ft1=fts[1], extra="")
    r = write_recipe(tmp_path / "r2.yaml", text + "mergeforge: {truncate_embeddings: true}\n")
    assert run_cli("merge", r, tmp_path / "ok", "--quiet") == 0
    card = (tmp_path / "ok" / "README.md").read_text()
    assert "truncate_embeddings: crop" in card.split("## Opt-ins in effect")[1]


def test_missing_base_model(capsys, tmp_path, fam):
    base, fts = fam
    text = f"merge_method: ties\nmodels:\n  - model: {fts[0]}\n    parameters: {{weight: 1}}\n"
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts, text=text), "base_model")


def test_unknown_method(capsys, tmp_path, fam):
    base, fts = fam
    err = _fails(capsys, tmp_path, _recipe(tmp_path, base, fts, method="tiez"), "'tiez'")
    assert "ties" in err  # lists the known methods


def test_unknown_parameter(capsys, tmp_path, fam):
    base, fts = fam
    r = _recipe(tmp_path, base, fts, method="ties", extra=", densty: 0.5")
    _fails(capsys, tmp_path, r, "densty", "density")


def test_parameter_out_of_range(capsys, tmp_path, fam):
    base, fts = fam
    r = _recipe(tmp_path, base, fts, method="ties", extra=", density: 1.7")
    _fails(capsys, tmp_path, r, "density", "1.7", "[0, 1]")


def test_all_problems_are_reported_at_once(capsys, tmp_path, fam):
    base, fts = fam
    r = _recipe(tmp_path, base, fts, method="ties", extra=", density: 1.7, densty: 2")
    err = _fails(capsys, tmp_path, r, "1.7", "densty")
    assert "2 problems" in err


def test_malicious_pickle_bin_is_never_executed(capsys, tmp_path, fam):
    import pickle

    base, fts = fam
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (fts[0] / "model.safetensors").unlink()
    with open(fts[0] / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), "pytorch_model.bin")
    assert not marker.exists()


def test_empty_recipe(capsys, tmp_path):
    r = write_recipe(tmp_path / "recipe.yaml", "")
    _fails(capsys, tmp_path, r, "empty")


def test_existing_output_without_overwrite(capsys, tmp_path, fam):
    base, fts = fam
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), "--overwrite", out="taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    r = _recipe(tmp_path, base, fts)
    assert run_cli("merge", r, tmp_path / "taken", "--quiet", "--overwrite") == 0
    assert not (tmp_path / "taken" / "keep.txt").exists()


def test_output_path_is_a_file(capsys, tmp_path, fam):
    base, fts = fam
    (tmp_path / "afile").write_text("x")
    _fails(capsys, tmp_path, _recipe(tmp_path, base, fts), "is a file", out="afile")


def test_memory_budget_below_largest_tensor(capsys, tmp_path, fam):
    base, fts = fam
    code = run_cli(
        "merge", _recipe(tmp_path, base, fts), tmp_path / "out", "--memory-budget", "1KB"
    )
    err = capsys.readouterr().err
    assert code != 0 and "memory budget" in err and not (tmp_path / "out").exists()


def test_della_spread_outside_zero_one_is_found_by_validate(capsys, tmp_path, fam):
    base, fts = fam
    r = _recipe(tmp_path, base, fts, method="della", extra=", density: 0.9, epsilon: 0.2")
    assert run_cli("validate", r) != 0
    err = capsys.readouterr().err
    assert "density 0.9" in err and "epsilon 0.2" in err and "Traceback" not in err

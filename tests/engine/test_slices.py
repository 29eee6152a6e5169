"""`slices:` recipes: layer stacking (frankenmerges, depth up-scaling) and per-slice merges."""

from __future__ import annotations

import json

import torch

from helpers import run_cli, write_recipe
from models import load_state, make_family


def _stack_recipe(a, b) -> str:
    return f"""\
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]
"""


def test_passthrough_stacks_layers_and_renumbers(tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = make_family("llama", tmp_path / "m", 1, seed=8)
    a, b = base, fts[0]
    r = write_recipe(tmp_path / "r.yaml", _stack_recipe(a, b))
    assert run_cli("merge", r, tmp_path / "o", "--quiet") == 0
    out, sa, sb = load_state(tmp_path / "o"), load_state(a), load_state(b)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 6
    for j in range(6):
        src, layer = (sa, j) if j < 3 else (sb, j - 3 + 1)
        for key in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight"):
            got = out[f"model.layers.{j}.{key}"]
            want = src[f"model.layers.{layer}.{key}"]
            scale = 0.5 if (j >= 3 and "o_proj" in key) else 1.0
            assert torch.equal(got, want * scale), (j, key)
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], sb["model.norm.weight"])  # post: last slice
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])
    _m, info = AutoModelForCausalLM.from_pretrained(tmp_path / "o", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_merging_slices_uses_the_slice_position_for_gradients(tmp_path):
    _base, fts = make_family("llama", tmp_path / "m", 2, seed=9)
    text = f"""\
merge_method: linear
slices:
  - sources:
      - model: {fts[0]}
        layer_range: [1, 4]
        parameters: {{weight: [0.0, 1.0]}}
      - model: {fts[1]}
        layer_range: [0, 3]
        parameters: {{weight: 1.0}}
parameters: {{normalize: false}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o", "--quiet") == 0
    out, s0, s1 = load_state(tmp_path / "o"), load_state(fts[0]), load_state(fts[1])
    for j in range(3):
        k = "self_attn.v_proj.weight"
        want = (j / 2) * s0[f"model.layers.{j + 1}.{k}"] + s1[f"model.layers.{j}.{k}"]
        torch.testing.assert_close(out[f"model.layers.{j}.{k}"], want, rtol=1e-6, atol=1e-7)
    emb = "model.embed_tokens.weight"  # t = 0 outside the layers
    torch.testing.assert_close(out[emb], s1[emb], rtol=1e-6, atol=1e-7)


def test_slice_past_the_last_layer_is_an_error(tmp_path, capsys):
    base, fts = make_family("llama", tmp_path / "m", 1, seed=8)
    text = _stack_recipe(base, fts[0]).replace("[1, 4]", "[2, 6]")
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o") != 0
    err = capsys.readouterr().err
    assert "points past its last layer" in err and "[2, 6]" in err and "4 layers" in err
    assert not (tmp_path / "o").exists()


def test_sources_of_different_lengths_are_an_error(tmp_path, capsys):
    _base, fts = make_family("llama", tmp_path / "m", 2, seed=8)
    text = f"""\
merge_method: linear
slices:
  - sources:
      - {{model: {fts[0]}, layer_range: [0, 2], parameters: {{weight: 1}}}}
      - {{model: {fts[1]}, layer_range: [0, 3], parameters: {{weight: 1}}}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o") != 0
    assert "same number of layers" in capsys.readouterr().err


def test_passthrough_takes_one_source(tmp_path, capsys):
    base, fts = make_family("llama", tmp_path / "m", 1, seed=8)
    text = f"""\
merge_method: passthrough
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {fts[0]}, layer_range: [0, 2]}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o") != 0
    assert "at most 1 model" in capsys.readouterr().err


def test_unlisted_base_of_a_linear_slice_spans_the_slice(tmp_path):
    base, fts = make_family("llama", tmp_path / "m", 1, seed=12)
    text = f"""\
merge_method: linear
base_model: {base}
parameters: {{weight: 0.5}}
slices:
  - sources:
      - {{model: {fts[0]}, layer_range: [1, 3]}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o", "--quiet") == 0
    out, sb, sf = load_state(tmp_path / "o"), load_state(base), load_state(fts[0])
    k = "self_attn.q_proj.weight"
    for j in range(2):  # the base is appended as an input over the same layer range
        want = (sf[f"model.layers.{j + 1}.{k}"] + sb[f"model.layers.{j + 1}.{k}"]) / 2
        torch.testing.assert_close(out[f"model.layers.{j}.{k}"], want, rtol=1e-6, atol=1e-7)

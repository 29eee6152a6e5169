"""End-to-end merges through the engine: outputs, determinism, streaming == in-memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli, write_recipe
from mergeforge.methods import find_method, seeded_generator
from models import load_state, make_family

TIES = """\
merge_method: ties
base_model: {base}
models:
  - model: {ft0}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {ft2}
    parameters: {{weight: [0.2, 1.0], density: 0.8}}
parameters: {{normalize: true}}
"""

DARE = """\
merge_method: dare_ties
base_model: {base}
models:
  - model: {ft0}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
"""


def _fmt(text: str, base: Path, fts: list[Path]) -> str:
    return text.format(base=base, ft0=fts[0], ft1=fts[1], ft2=fts[2] if len(fts) > 2 else "")


def test_ties_output_is_a_loadable_hf_directory(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = llama_family
    recipe = write_recipe(tmp_path / "r.yaml", _fmt(TIES, base, fts))
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet") == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    _model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    card = (tmp_path / "out" / "README.md").read_text()
    import hashlib

    digest = hashlib.sha256((fts[1] / "model.safetensors").read_bytes()).hexdigest()
    assert digest in card and "merge_method: ties" in card and "arxiv.org" in card


def _in_memory(recipe_text: str, base: Path, fts: list[Path], seed: int) -> dict[str, torch.Tensor]:
    """Recompute the merge from whole state dicts with the method function directly."""
    from mergeforge.config import parse_recipe
    from mergeforge.engine.execute import tie_rule
    from mergeforge.engine.plan import build_plan

    plan = build_plan(parse_recipe(__import__("yaml").safe_load(recipe_text)))
    states = {label: load_state(path) for label, path in plan.paths.items()}
    out = {}
    for tp in plan.tensors:
        b = states[tp.base.model][tp.base.info.name].float()
        xs = [states[s.model][s.info.name].float() for s in tp.inputs]
        kw = dict(tp.params)
        if "tie_break" in plan.method.engine_kwargs:
            raws = [states[s.model][s.info.name] for s in tp.sources()]
            kw["tie_break"] = tie_rule(plan, raws)
        if plan.method.stochastic:
            kw["generator"] = seeded_generator(seed, tp.name)
        out[tp.name] = find_method(plan.method.name).fn(xs, b, **kw).to(tp.dtype)
    plan.close()
    return out


@pytest.mark.parametrize("text", [TIES, DARE], ids=["ties", "dare_ties"])
def test_streamed_equals_in_memory_bit_for_bit(llama_family, tmp_path, text):
    base, fts = llama_family
    recipe_text = _fmt(text, base, fts)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text)
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet", "--seed", "7") == 0
    streamed = load_state(tmp_path / "out")
    expected = _in_memory(recipe_text, base, fts, seed=7)
    assert streamed.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(streamed[k], v), k


def test_same_seed_gives_identical_bytes_and_other_seed_differs(llama_family, tmp_path):
    base, fts = llama_family
    recipe = write_recipe(tmp_path / "r.yaml", _fmt(DARE, base, fts))
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert run_cli("merge", recipe, tmp_path / name, "--quiet", "--seed", seed) == 0
    read = lambda d: (tmp_path / d / "model.safetensors").read_bytes()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")
    assert (tmp_path / "a" / "README.md").read_text() == (tmp_path / "b" / "README.md").read_text()


def test_sharded_output_and_small_memory_budget(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = llama_family
    recipe = write_recipe(tmp_path / "r.yaml", _fmt(TIES, base, fts))
    assert run_cli("merge", recipe, tmp_path / "one", "--quiet") == 0
    args = ("--quiet", "--shard-size", "20KB", "--memory-budget", "2MB")
    assert run_cli("merge", recipe, tmp_path / "sharded", *args) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    one, sharded = load_state(tmp_path / "one"), load_state(tmp_path / "sharded")
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
    _m, info = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_linear_gradient_and_filters_by_hand(llama_family, tmp_path):
    base, fts = llama_family
    text = f"""\
merge_method: linear
models:
  - model: {fts[0]}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}, {{filter: self_attn, value: [0.0, 1.0]}}, {{value: 0.25}}]
  - model: {fts[1]}
    parameters: {{weight: 1.0}}
parameters: {{normalize: false}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o", "--quiet") == 0
    out, a, b = load_state(tmp_path / "o"), load_state(fts[0]), load_state(fts[1])
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    for name, got in out.items():
        if "mlp" in name:
            w = 0.5
        elif "self_attn" in name:
            w = int(name.split(".")[2]) / (n_layers - 1)
        else:
            w = 0.25
        torch.testing.assert_close(got, w * a[name] + b[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["llama_tied", "gpt2", "bert", "bert_seqcls"])
def test_every_test_architecture_merges_and_loads(kind, tmp_path):
    from transformers import AutoModel

    base, fts = make_family(kind, tmp_path / "m", 2, seed=5)
    text = f"""\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {fts[0]}
    parameters: {{weight: 0.5}}
  - model: {fts[1]}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.8}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o", "--quiet") == 0
    got, b = load_state(tmp_path / "o"), load_state(base)
    assert got.keys() == b.keys()
    s0, s1 = load_state(fts[0]), load_state(fts[1])
    for k, v in b.items():
        if v.is_floating_point():
            want = v + 0.8 * (0.5 * (s0[k] - v) + 0.5 * (s1[k] - v))
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got[k], v)
    cls = AutoModel
    if kind in ("llama_tied", "gpt2"):
        from transformers import AutoModelForCausalLM as cls
    elif kind == "bert_seqcls":
        from transformers import AutoModelForSequenceClassification as cls
    _m, info = cls.from_pretrained(tmp_path / "o", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_cuda_request_without_a_gpu_is_a_clear_error(llama_family, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; see test_cuda_merge_matches_cpu")
    base, fts = llama_family
    recipe = write_recipe(tmp_path / "r.yaml", _fmt(TIES, base, fts))
    assert run_cli("merge", recipe, tmp_path / "o", "--quiet", "--device", "cuda") != 0
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", [TIES, DARE], ids=["ties", "dare_ties"])
def test_cuda_merge_matches_cpu(llama_family, tmp_path, text):
    base, fts = llama_family
    recipe = write_recipe(tmp_path / "r.yaml", _fmt(text, base, fts))
    assert run_cli("merge", recipe, tmp_path / "cpu", "--quiet") == 0
    assert run_cli("merge", recipe, tmp_path / "gpu", "--quiet", "--device", "cuda") == 0
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "gpu")
    for k, v in cpu.items():
        torch.testing.assert_close(gpu[k], v, rtol=1e-5, atol=1e-6)


def test_bf16_merge_breaks_ties_by_index_and_matches_in_memory(tmp_path):
    base, fts = make_family("llama", tmp_path / "m", 3, seed=9, dtype=torch.bfloat16)
    text = _fmt(TIES, base, fts)
    recipe = write_recipe(tmp_path / "r.yaml", text)
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet") == 0
    streamed = load_state(tmp_path / "out")
    expected = _in_memory(text, base, fts, seed=0)
    assert all(v.dtype == torch.bfloat16 for v in streamed.values())
    assert all(torch.equal(streamed[k], v) for k, v in expected.items())


def test_fp32_ties_at_the_cut_follow_mergekit_unless_index_tie_break(tmp_path):
    from safetensors.torch import save_file

    base, fts = make_family("llama", tmp_path / "m", 2, seed=4)
    b = load_state(base)
    for i, ft in enumerate(fts):  # task vectors with few distinct magnitudes: ties everywhere
        g = torch.Generator().manual_seed(50 + i)
        state = {k: v + torch.randint(-3, 4, v.shape, generator=g) / 64 for k, v in b.items()}
        save_file(state, ft / "model.safetensors", metadata={"format": "pt"})
    text = _fmt(DARE, base, fts).replace("dare_ties", "ties")
    for name, extra in (("mk", ""), ("idx", "mergeforge: {index_tie_break: true}\n")):
        recipe = write_recipe(tmp_path / f"{name}.yaml", text + extra)
        assert run_cli("merge", recipe, tmp_path / name, "--quiet") == 0
        got, want = load_state(tmp_path / name), _in_memory(text + extra, base, fts, seed=0)
        assert all(torch.equal(got[k], v) for k, v in want.items())
    mk, idx = load_state(tmp_path / "mk"), load_state(tmp_path / "idx")
    assert any(not torch.equal(mk[k], idx[k]) for k in mk)  # the rules really differ here
    assert "index_tie_break" in (tmp_path / "idx" / "README.md").read_text().split("## Opt-ins")[1]


def test_bin_and_sharded_inputs_merge_like_safetensors(llama_family, tmp_path):
    """The same models as sharded .bin (with index) and as one .safetensors give the same merge."""
    import shutil

    base, fts = llama_family
    ref_recipe = write_recipe(tmp_path / "ref.yaml", _fmt(TIES, base, fts))
    assert run_cli("merge", ref_recipe, tmp_path / "ref", "--quiet") == 0
    converted = []
    for i, src in enumerate([base, *fts]):
        dst = tmp_path / f"bin{i}"
        shutil.copytree(src, dst)
        state = load_state(dst)
        (dst / "model.safetensors").unlink()
        names = sorted(state)
        half = len(names) // 2
        shards = {"pytorch_model-00001-of-00002.bin": names[:half],
                  "pytorch_model-00002-of-00002.bin": names[half:]}  # fmt: skip
        for file, keys in shards.items():
            torch.save({k: state[k] for k in keys}, dst / file)
        weight_map = {k: f for f, keys in shards.items() for k in keys}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        converted.append(dst)
    recipe = write_recipe(tmp_path / "bin.yaml", _fmt(TIES, converted[0], converted[1:]))
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet") == 0
    ref, got = load_state(tmp_path / "ref"), load_state(tmp_path / "out")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_tokenizer_and_generation_files_come_from_tokenizer_source(llama_family, tmp_path):
    import shutil

    base, fts = llama_family
    donor = tmp_path / "donor"
    shutil.copytree(fts[1], donor)
    (donor / "tokenizer.json").write_text('{"donor": true}')
    (donor / "tokenizer_config.json").write_text("{}")
    text = _fmt(TIES, base, fts)
    assert run_cli("merge", write_recipe(tmp_path / "a.yaml", text), tmp_path / "a", "--quiet") == 0
    assert not (tmp_path / "a" / "tokenizer.json").exists()  # the base has none
    assert (tmp_path / "a" / "generation_config.json").exists()  # the base has one
    r = write_recipe(tmp_path / "b.yaml", text + f"tokenizer_source: {donor}\n")
    assert run_cli("merge", r, tmp_path / "b", "--quiet") == 0
    assert (tmp_path / "b" / "tokenizer.json").read_text() == '{"donor": true}'
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg == json.loads((base / "config.json").read_text())  # no dtype in the recipe

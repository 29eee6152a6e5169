"""PEFT LoRA adapters as recipe inputs: ``base+adapter`` and adapter directories naming their base."""

from __future__ import annotations

import pytest
import torch

from helpers import run_cli, write_recipe
from models import load_state, make_family


def _adapter(base, out, seed, **lora):
    """Train nothing: a LoRA with random (non-zero) A and B, saved with peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, **lora)  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base, _ = make_family("llama", root / "m", 0, seed=21)
    merged = [
        _adapter(base, root / "a0", 1),
        _adapter(base, root / "a1", 2, use_rslora=True, rank_pattern={"v_proj": 2}),
    ]
    return base, [root / "a0", root / "a1"], merged


def test_base_plus_adapter_equals_peft_merge_and_unload(lora_family, tmp_path):
    base, adapters, merged = lora_family
    for i, ad in enumerate(adapters):
        text = f"merge_method: linear\nmodels:\n  - model: {base}+{ad}\n    parameters: {{weight: 1}}\n"
        assert (
            run_cli(
                "merge", write_recipe(tmp_path / f"{i}.yaml", text), tmp_path / f"o{i}", "--quiet"
            )
            == 0
        )
        got = load_state(tmp_path / f"o{i}")
        for k, v in got.items():
            torch.testing.assert_close(v, merged[i][k], rtol=1e-5, atol=1e-6, msg=k)
        card = (tmp_path / f"o{i}" / "README.md").read_text()
        assert "adapter_model.safetensors" in card  # its sha256 is recorded


def test_adapter_directory_naming_its_base_and_ties_of_two_adapters(lora_family, tmp_path):
    base, adapters, _merged = lora_family
    text = f"""\
merge_method: ties
base_model: {base}
models:
  - model: {adapters[0]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {base}+{adapters[1]}
    parameters: {{weight: 1.0, density: 0.5}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o", "--quiet") == 0
    out, b = load_state(tmp_path / "o"), load_state(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(out[q], b[q])  # the adapters' updates are merged
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(out[k], b[k])  # untouched by both adapters


def test_adapter_for_another_base_is_a_clear_error(lora_family, tmp_path, capsys):
    _, adapters, _ = lora_family
    other, _ = make_family("llama", tmp_path / "other", 0, seed=5, hidden=48)
    text = f"merge_method: linear\nmodels:\n  - model: {other}+{adapters[0]}\n    parameters: {{weight: 1}}\n"
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o") != 0
    err = capsys.readouterr().err
    assert "does not belong to this base" in err and "q_proj" in err
    assert not (tmp_path / "o").exists()


def test_adapter_targeting_a_module_the_base_lacks(lora_family, tmp_path, capsys):
    import shutil

    base, adapters, _ = lora_family
    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    from safetensors.torch import load_file, save_file

    state = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key.replace("q_proj", "qq_proj")] = state.pop(key)
    state[key.replace("q_proj", "qq_proj").replace("lora_A", "lora_B")] = state.pop(
        key.replace("lora_A", "lora_B")
    )
    save_file(state, bad / "adapter_model.safetensors")
    text = (
        f"merge_method: linear\nmodels:\n  - model: {base}+{bad}\n    parameters: {{weight: 1}}\n"
    )
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o") != 0
    assert "qq_proj" in capsys.readouterr().err


def test_right_side_of_plus_must_be_an_adapter(lora_family, tmp_path, capsys):
    base, _, _ = lora_family
    text = (
        f"merge_method: linear\nmodels:\n  - model: {base}+{base}\n    parameters: {{weight: 1}}\n"
    )
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o") != 0
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_adapter_on_a_base_other_than_the_recipes_base_model(lora_family, tmp_path, capsys):
    base, adapters, _ = lora_family
    other, _ = make_family("llama", tmp_path / "other", 0, seed=6)  # same shapes, other weights
    text = f"""\
merge_method: task_arithmetic
base_model: {other}
models:
  - model: {base}+{adapters[0]}
    parameters: {{weight: 1.0}}
"""
    assert run_cli("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "o") != 0
    err = capsys.readouterr().err
    assert "applied to base" in err and "base_model is" in err and str(other) in err
    assert not (tmp_path / "o").exists()

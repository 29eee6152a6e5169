"""Merging PEFT LoRA adapters in factor space (`mergeforge: {factor_space: true}`)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli, write_recipe
from mergeforge.io import open_checkpoint
from methods.method_calls import call_method
from models import load_state, make_family

TARGETS = ["q_proj", "v_proj"]


def _adapter(base, out, seed, r=4, targets=TARGETS, **lora):
    """A LoRA with random non-zero A and B, saved with peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=r, target_modules=targets, init_lora_weights=False, **lora)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("factors")
    base, fts = make_family("llama", root / "m", 1, seed=31)
    a0 = _adapter(base, root / "a0", 1, lora_alpha=8)
    a1 = _adapter(base, root / "a1", 2, lora_alpha=4, use_rslora=True)
    return base, [a0, a1], fts[0]


def _factors(adapter) -> dict[str, torch.Tensor]:
    """Factors with peft's scale folded into lora_B (what factor space merges)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    with open_checkpoint(adapter / "adapter_model.safetensors") as ck:
        return {n: ck.read(n) * (s if ".lora_B." in n else 1.0) for n in ck.tensors}


def _recipe(tmp_path, text: str):
    return write_recipe(tmp_path / "r.yaml", text + "mergeforge: {factor_space: true}\n")


def test_task_arithmetic_of_factors_is_a_loadable_adapter(adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, (a0, a1), _plain = adapters
    recipe = _recipe(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {a0}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {a1}\n    parameters: {{weight: 0.4}}\n",
    )
    out = tmp_path / "out"
    assert run_cli("merge", recipe, out, "--quiet") == 0
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    f0, f1 = _factors(a0), _factors(a1)
    with open_checkpoint(out / "adapter_model.safetensors") as ck:
        got = {n: ck.read(n) for n in ck.tensors}
    assert got.keys() == f0.keys()
    for n in f0:
        torch.testing.assert_close(got[n], 0.7 * f0[n] + 0.4 * f1[n], rtol=1e-6, atol=1e-7)
    # peft loads it with scale 1: W + B_m A_m
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    b = load_state(base)
    q = "model.layers.0.self_attn.q_proj"
    delta = got[f"base_model.model.{q}.lora_B.weight"] @ got[f"base_model.model.{q}.lora_A.weight"]
    torch.testing.assert_close(
        merged[f"{q}.weight"], b[f"{q}.weight"] + delta, rtol=1e-5, atol=1e-6
    )


def test_ties_in_factor_space_equals_ties_on_each_factor(adapters, tmp_path):
    base, (a0, a1), _plain = adapters
    recipe = _recipe(
        tmp_path,
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {a0}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {a1}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    )
    out = tmp_path / "out"
    assert run_cli("merge", recipe, out, "--quiet") == 0
    f0, f1 = _factors(a0), _factors(a1)
    with open_checkpoint(out / "adapter_model.safetensors") as ck:
        for n in f0:
            want = call_method("ties", [f0[n], f1[n]], torch.zeros_like(f0[n]),
                               weight=(1.0, 0.5), density=0.5, tie_break="mergekit")  # fmt: skip
            torch.testing.assert_close(ck.read(n), want, rtol=1e-6, atol=1e-7)


def _two(tmp_path, base, a, b, method="task_arithmetic"):
    return _recipe(
        tmp_path,
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1.0}}\n",
    )


def test_different_ranks_are_a_clear_error(adapters, tmp_path, capsys):
    base, (a0, _a1), _plain = adapters
    a2 = _adapter(base, tmp_path / "a2", 3, r=2)
    assert run_cli("merge", _two(tmp_path, base, a0, a2), tmp_path / "out", "--quiet") != 0
    err = capsys.readouterr().err
    assert "different LoRA ranks" in err and "r=4 vs r=2" in err and "weight space" in err
    assert not (tmp_path / "out").exists()


def test_different_target_modules_are_a_clear_error(adapters, tmp_path, capsys):
    base, (a0, _a1), _plain = adapters
    a3 = _adapter(base, tmp_path / "a3", 4, targets=["q_proj", "k_proj"])
    assert run_cli("merge", _two(tmp_path, base, a0, a3), tmp_path / "out", "--quiet") != 0
    err = capsys.readouterr().err
    assert "adapt different modules" in err and "k_proj" in err and "v_proj" in err
    assert not (tmp_path / "out").exists()


def test_method_without_factor_space_and_non_adapter_inputs_are_errors(adapters, tmp_path, capsys):
    base, (a0, a1), plain = adapters
    assert run_cli("merge", _two(tmp_path, base, a0, a1, "slerp"), tmp_path / "o", "--quiet") != 0
    err = capsys.readouterr().err
    assert "cannot merge LoRA factors" in err and "task_arithmetic" in err
    assert run_cli("merge", _two(tmp_path, base, a0, plain), tmp_path / "o", "--quiet") != 0
    assert "is not a PEFT LoRA adapter directory" in capsys.readouterr().err
    assert run_cli("merge", _two(tmp_path, base, a0, base), tmp_path / "o", "--quiet") != 0
    assert "also listed under `models:`" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

"""`extract-lora`: exact recovery of low-rank updates, Eckart–Young tails, PEFT round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from mergeforge.engine.extract_lora import extract_lora, factorize
from mergeforge.errors import CheckpointError, OutputError, PlanError
from models import load_state, make_llama

LAYERS = 4


def _low_rank(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> torch.Tensor:
    b = torch.randn(shape[0], rank, generator=gen)  # (out, rank)
    a = torch.randn(rank, shape[1], generator=gen)  # (rank, in)
    return 0.05 * b @ a  # (out, in), rank `rank`


def _make_tuned(base: Path, out: Path, ranks: dict[str, int], seed: int = 7, **extra) -> Path:
    """``base`` + an exact low-rank update on every weight whose name ends with a key of
    ``ranks`` (layer 3's v_proj gets rank 1), plus ``extra`` name -> additive update."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = name.split(".")[-2]
            if kind in ranks and p.ndim == 2:
                r = 1 if name.startswith(f"model.layers.{LAYERS - 1}.self_attn.v_proj") else 2
                p.add_(_low_rank(tuple(p.shape), min(r, ranks[kind]), gen))
            if name in extra:
                p.add_(extra[name])
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = make_llama(root / "base", seed=3, num_layers=LAYERS)
    tuned = _make_tuned(base, root / "tuned", {"q_proj": 2, "v_proj": 2})
    return base, tuned


def _peft_merged(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
    return model.merge_and_unload()


def _deltas(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    b, t = load_state(base), load_state(tuned)
    return {k: t[k] - b[k] for k in b if not torch.equal(t[k], b[k])}


def test_rank2_update_is_recovered_exactly_and_peft_merges_to_tuned(pair, tmp_path):
    from transformers import LlamaForCausalLM

    base, tuned = pair
    out = tmp_path / "adapter"
    res = extract_lora(base, tuned, out, rank=2)
    assert res.modules == 2 * LAYERS and res.rank == 2
    assert res.total_error < 1e-5 and set(res.kind_errors) == {"q_proj", "v_proj"}
    assert all(e < 1e-5 for e in res.kind_errors.values()) and res.not_captured == []
    cfg = json.loads((out / "adapter_config.json").read_text())
    v3 = f"model.layers.{LAYERS - 1}.self_attn.v_proj"
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (2, 2, ["q_proj", "v_proj"])
    assert cfg["rank_pattern"] == {v3: 1} == cfg["alpha_pattern"]
    assert cfg["base_model_name_or_path"] == str(base)
    report = json.loads((out / "extraction.json").read_text())
    assert report["modules"][v3]["rank"] == 1 and report["total_rel_error"] < 1e-5
    ad = load_state(out / "adapter_model.safetensors")
    assert ad[f"base_model.model.{v3}.lora_A.weight"].shape == (1, 32)
    assert ad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 2)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "extraction.json",
    ]  # fmt: skip

    merged = _peft_merged(base, out)
    want = load_state(tuned)
    for name, p in merged.state_dict().items():
        assert torch.allclose(p, want[name], atol=1e-5), name
    ids = torch.arange(12).reshape(2, 6)  # (batch, seq)
    ref = LlamaForCausalLM.from_pretrained(tuned)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-4)


def test_rank1_error_is_the_eckart_young_tail(pair, tmp_path):
    base, tuned = pair
    res = extract_lora(base, tuned, tmp_path / "r1", rank=1)
    report = json.loads((tmp_path / "r1" / "extraction.json").read_text())
    tails: dict[str, list[float]] = {}
    for name, delta in _deltas(base, tuned).items():
        s = torch.linalg.svdvals(delta.double())
        tail, full = float(s[1:].square().sum()), float(s.square().sum())
        module = name.removesuffix(".weight")
        assert report["modules"][module]["rel_error"] == pytest.approx(
            math.sqrt(tail / full), rel=1e-4, abs=1e-6
        )
        acc = tails.setdefault(module.rsplit(".", 1)[-1], [0.0, 0.0])
        acc[0], acc[1] = acc[0] + tail, acc[1] + full
    assert res.total_error > 0.05
    for kind, (tail, full) in tails.items():
        assert res.kind_errors[kind] == pytest.approx(math.sqrt(tail / full), rel=1e-4)
    cfg = json.loads((tmp_path / "r1" / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and cfg["rank_pattern"] == {}


def test_factorize_splits_sqrt_s_and_truncates():
    gen = torch.Generator().manual_seed(0)
    delta = _low_rank((12, 9), 3, gen)  # (12, 9), rank 3
    b, a = factorize(delta, 5)  # numerical rank caps the requested 5
    assert b.shape == (12, 3) and a.shape == (3, 9)
    assert torch.allclose(b @ a, delta, atol=1e-5)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b1, a1 = factorize(delta, 1)
    assert torch.allclose(b1.abs(), (u[:, :1] * s[0].sqrt()).abs(), atol=1e-5)
    assert torch.allclose(a1.abs(), (s[0].sqrt() * vh[:1]).abs(), atol=1e-5)
    assert factorize(torch.zeros(4, 3), 2)[1].shape == (0, 3)


def test_filters_use_full_paths_and_report_what_is_left_out(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "f"
    res = extract_lora(base, tuned, out, rank=2, include=r"layers\.[01]\.")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [
        f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in ("q_proj", "v_proj")
    ]
    left = {n for n, why in res.not_captured if "--include/--exclude" in why}
    assert left == {f"model.layers.{i}.self_attn.{k}.weight" for i in (2, 3) for k in ("q_proj", "v_proj")}  # fmt: skip
    merged = _peft_merged(base, out).state_dict()
    b, t = load_state(base), load_state(tuned)
    for name in t:
        want = t[name] if ".layers.0." in name or ".layers.1." in name else b[name]
        assert torch.allclose(merged[name], want, atol=1e-5), name

    res = extract_lora(base, tuned, tmp_path / "x", rank=2, exclude="v_proj")
    assert set(res.kind_errors) == {"q_proj"}
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj"]


def test_embeddings_and_norms(pair, tmp_path):
    base, _ = pair
    gen = torch.Generator().manual_seed(5)
    extra = {
        "model.embed_tokens.weight": _low_rank((64, 32), 1, gen),
        "lm_head.weight": _low_rank((64, 32), 2, gen),
        "model.norm.weight": torch.full((32,), 0.1),
    }
    tuned = _make_tuned(base, tmp_path / "tuned", {"q_proj": 2}, **extra)
    res = extract_lora(base, tuned, tmp_path / "plain", rank=2)
    assert dict(res.not_captured) == {
        "model.embed_tokens.weight": "embedding or output head (pass --include-embeddings)",
        "lm_head.weight": "embedding or output head (pass --include-embeddings)",
        "model.norm.weight": "not a 2-D weight (bias, norm or buffer)",
    }
    out = tmp_path / "emb"
    res = extract_lora(base, tuned, out, rank=2, include_embeddings=True)
    assert res.kind_errors["embed_tokens"] < 1e-5 and res.kind_errors["lm_head"] < 1e-5
    assert [n for n, _ in res.not_captured] == ["model.norm.weight"]
    ad = load_state(out / "adapter_model.safetensors")
    assert ad["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (1, 64)
    assert ad["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 1)
    merged = _peft_merged(base, out).state_dict()
    t = load_state(tuned)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.allclose(merged[name], t[name], atol=1e-5), name


def test_cli_prints_errors_per_kind(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "cli"
    assert run_cli("extract-lora", base, tuned, out, "--rank", "1", "--dtype", "bfloat16") == 0
    text = capsys.readouterr().out
    assert "q_proj" in text and "v_proj" in text and "total" in text
    adapter = load_state(out / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    assert run_cli("extract-lora", base, tuned, out, "--rank", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("extract-lora", base, tuned, out, "--rank", "2", "--overwrite") == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("rank", ["0", "-3", "two"])
def test_rank_below_one_is_an_argparse_error(pair, tmp_path, rank, capsys):
    base, tuned = pair
    with pytest.raises(SystemExit) as exc:
        run_cli("extract-lora", base, tuned, tmp_path / "o", "--rank", rank)
    assert exc.value.code == 2 and "--rank" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_inputs_write_nothing(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "o"
    with pytest.raises(CheckpointError):
        extract_lora(tmp_path / "missing", tuned, out, rank=2)
    fewer = make_llama(tmp_path / "three", seed=3, num_layers=LAYERS - 1)
    with pytest.raises(PlanError, match=r"lacks: 'model\.layers\.3\."):
        extract_lora(base, fewer, out, rank=2)
    wide = make_llama(tmp_path / "vocab", seed=3, num_layers=LAYERS, vocab=80)
    with pytest.raises(PlanError, match=r"has shape \[64, 32\] in .* but \[80, 32\]"):
        extract_lora(base, wide, out, rank=2)
    with pytest.raises(PlanError, match="no selected linear weight differs"):
        extract_lora(base, base, out, rank=2)
    with pytest.raises(PlanError, match="not a valid regex"):
        extract_lora(base, tuned, out, rank=2, include="(")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        extract_lora(base, tuned, tmp_path / "file", rank=2)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "file", "three", "vocab",
    ]  # fmt: skip

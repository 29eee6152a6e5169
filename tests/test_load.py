"""``mergeforge.load``: static and dynamic fused directories (as ``bench.fuse_output`` writes them)
come back as working models — a SMILE causal LM generates the same tokens, a task head gives the
classifier's logits — and anything else is refused with a clear error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import mergeforge
from fusion_problems import tiny_body
from mergeforge.bench.fuse_output import FORMAT, extract_head, write_fused_dir
from mergeforge.errors import CheckpointError
from mergeforge.fusion import smile
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.smile import SmileConfig
from mergeforge.loading import load


@pytest.fixture(autouse=True)
def _one_math_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama_problem() -> FusionProblem:
    """A tiny Llama with tied embeddings (lm_head shares the embedding's storage), 2 experts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True,
    )  # fmt: skip
    body = LlamaForCausalLM(cfg).eval()
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    g = torch.Generator().manual_seed(7)
    experts = tuple(
        {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)
    )
    tasks = tuple(FusionTask(f"t{i}", lambda o, b: o.logits[:, -1], 40) for i in range(2))
    return FusionProblem(body, base, experts, tasks)


def _record(kind: str, **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "heads": {}, **extra}


def test_smile_causal_lm_loads_and_generates(tmp_path: Path) -> None:
    problem = _llama_problem()
    res = smile.run(problem, SmileConfig(gate_k=2, k=4, top_k=1))
    problem.body.config.save_pretrained(tmp_path / "cfg")
    record = _record("dynamic", loader=res.loader, description=res.description,
                     body_class="AutoModelForCausalLM")  # fmt: skip
    out = write_fused_dir(tmp_path / "out", res.tensors, config_from=tmp_path / "cfg",
                          record=record, card="# test\n")  # fmt: skip
    loaded = mergeforge.load(out)
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    sd = loaded.state_dict()
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    ids = torch.tensor([[3, 17, 5, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, res.module(ids).logits)
        want = res.module.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False), want)


@pytest.fixture
def static_dir(tmp_path: Path) -> tuple[Path, Any, Any]:
    """A static fused dir of a tiny BERT encoder with one 3-class head; (dir, encoder, classifier)."""
    from transformers import BertForSequenceClassification

    body = tiny_body(seed=1)
    body.config.save_pretrained(tmp_path / "cfg")
    cfg = body.config.__class__.from_dict({**body.config.to_dict(), "num_labels": 3})
    torch.manual_seed(2)
    classifier = BertForSequenceClassification(cfg).eval()
    classifier.bert.load_state_dict(body.state_dict())
    head = extract_head("topic", classifier, ("a", "b", "c"), tmp_path / "src")
    assert sorted(head.tensors) == ["classifier.bias", "classifier.weight"]
    record = _record("static", heads={"topic": {}})
    out = write_fused_dir(tmp_path / "out", body.state_dict(), config_from=tmp_path / "cfg",
                          record=record, card="# test\n", heads=[head])  # fmt: skip
    return out, body, classifier


def test_static_dir_loads_encoder_and_task_classifier(static_dir: tuple[Path, Any, Any]) -> None:
    out, body, classifier = static_dir
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 4, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        enc = load(out)
        torch.testing.assert_close(
            enc(**batch).last_hidden_state, body(**batch).last_hidden_state, rtol=1e-6, atol=1e-6
        )
        model = load(out, task="topic")
        assert type(model).__name__ == "BertForSequenceClassification" and not model.training
        assert model.config.num_labels == 3
        torch.testing.assert_close(
            model(**batch).logits, classifier(**batch).logits, rtol=1e-6, atol=1e-6
        )


def test_unknown_task_lists_the_known_ones(static_dir: tuple[Path, Any, Any]) -> None:
    with pytest.raises(CheckpointError, match=r"no head for task 'nope'.*\['topic'\]"):
        load(static_dir[0], task="nope")


def test_a_directory_that_is_not_a_fusion_output_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing")
    tiny_body().save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a directory written by `mergeforge fuse`"):
        load(tmp_path / "plain")
    (tmp_path / "plain" / "fusion.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not JSON"):
        load(tmp_path / "plain")
    (tmp_path / "plain" / "fusion.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(CheckpointError, match="no kind"):
        load(tmp_path / "plain")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loader": "os.system"}, "only functions of mergeforge.fusion"),
        ({"loader": "mergeforge.fusion.smile.rebuild; import os"}, "only functions of"),
        ({"loader": "mergeforge.fusionx.smile.rebuild"}, "only functions of"),
        ({"loader": "mergeforge.fusion.smile.no_such_function"}, "does not exist"),
        ({"body_class": "AutoModelForSomething"}, "body_class"),
    ],
)
def test_dynamic_record_is_data_not_code(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    from fusion_problems import tiny_problem

    res = smile.run(tiny_problem(2), SmileConfig(k=2))
    res.module.config.save_pretrained(tmp_path / "cfg")
    record = _record("dynamic", loader=res.loader, description=res.description,
                     body_class="AutoModel", attn_implementation="eager")  # fmt: skip
    out = write_fused_dir(tmp_path / "out", res.tensors, config_from=tmp_path / "cfg",
                          record=record, card="# test\n")  # fmt: skip
    ids = torch.tensor([[2, 5, 7, 3]])
    with torch.no_grad():
        assert torch.equal(load(out)(input_ids=ids)[0], res.module(input_ids=ids)[0])
    (out / "fusion.json").write_text(json.dumps({**record, **change}))
    with pytest.raises(CheckpointError, match=message):
        load(out)


def test_load_is_lazy_public_api() -> None:
    from mergeforge import loading

    assert mergeforge.load is loading.load and "load" in mergeforge.__all__

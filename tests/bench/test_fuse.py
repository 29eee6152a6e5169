"""`mergeforge fuse`: a user pool YAML + algorithm → a fused model directory, checked by loading it
back (no missing keys, logits of fused encoder + head, bit-identical dynamic models), by merging
its exported recipe with the engine, by evaluating its accuracy independently, and by bad inputs
that must stop with a clear message and write nothing."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bench.fake_pool import build_fake_pool
from helpers import run_cli
from mergeforge.bench.fuse import FuseOutcome, fuse
from mergeforge.bench.pool import Pool
from mergeforge.io.side_files import sha256_file
from mergeforge.loading import EncoderAdapter, load


@pytest.fixture(scope="module", autouse=True)
def _one_math_thread() -> Iterator[None]:
    """Tiny models: one thread is fastest and avoids contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI caches extracted encoders under ~/.cache: keep them in the test's directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    """Two tiny fine-tuned BERT classifiers (2 and 3 classes) with their splits as CSV files."""
    root = tmp_path_factory.mktemp("fuse_pool")
    built = build_fake_pool(root, n_tasks=2)
    for task in built.tasks:
        for split in ("validation", "test"):
            data = getattr(task.data, split)
            with open(root / f"{task.name}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["sentence", "y"])
                w.writerows(zip(data.texts, data.labels, strict=True))
    return built


def write_config(pool: Pool, algorithm: str, parameters: dict[str, Any], **task0: Any) -> Path:
    """A fuse YAML over ``pool`` (``task0``: overrides of task0's data spec)."""
    tasks = []
    for t in pool.tasks:
        data = {"validation": f"{t.name}_validation.csv", "test": f"{t.name}_test.csv",
                "text": "sentence", "label": "y"}  # fmt: skip
        if t.name == "task0":
            data.update(task0)
        tasks.append({"name": t.name, "model": f"{t.name}/model", "data": data})
    doc = {"name": "mine", "base": "base", "tasks": tasks, "algorithm": algorithm,
           "parameters": parameters}  # fmt: skip
    path = pool.root / f"fuse-{algorithm}-{len(list(pool.root.glob('fuse-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_fuse(pool: Pool, out: Path, algorithm: str, parameters: dict[str, Any]) -> FuseOutcome:
    cfg = write_config(pool, algorithm, parameters)
    return fuse(cfg, out, progress=False, cache_root=pool.root / "cache")


@pytest.fixture(scope="module")
def adamerging(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> FuseOutcome:
    out = tmp_path_factory.mktemp("fused") / "adamerging"
    return run_fuse(pool, out, "adamerging", {"steps": 2, "lr": 0.05})


def _batch(pool: Pool, task: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pool.base_dir)
    texts = list(pool.task(task).data.test.texts[:6])
    return dict(tok(texts, padding=True, return_tensors="pt"))


def _reference_classifier(pool: Pool, task: str, encoder: Any) -> Any:
    """The task's fine-tuned classifier with ``encoder`` (weights or a module) as its encoder."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(pool.task(task).model_dir).eval()
    if isinstance(encoder, dict):
        model.bert.load_state_dict(encoder, strict=True)
    else:
        model.bert = EncoderAdapter(encoder)
    return model


def _accuracy(model: Any, pool: Pool, task: str, split: str) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pool.base_dir)
    data = getattr(pool.task(task).data, split)
    with torch.no_grad():
        batch = tok(list(data.texts), padding=True, truncation=True, return_tensors="pt")
        pred = model(**batch).logits.argmax(-1)  # (N,)
    return float((pred == torch.tensor(data.labels)).float().mean())


def test_static_result_is_a_plain_encoder_directory(adamerging: FuseOutcome, pool: Pool) -> None:
    from transformers import AutoModel

    out = adamerging.out_dir
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    assert adamerging.result.state and all(
        torch.equal(state[n], t) for n, t in adamerging.result.state.items()
    )
    base = AutoModel.from_pretrained(pool.base_dir).state_dict()
    assert any(not torch.equal(state[n], base[n]) for n in adamerging.result.state)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "fusion.json", "README.md", "recipe.yaml",
            "heads", "tokenizer_config.json"} <= names  # fmt: skip
    assert sorted(p.name for p in (out / "heads").iterdir()) == [
        "task0.json", "task0.safetensors", "task1.json", "task1.safetensors",
    ]  # fmt: skip
    head = json.loads((out / "heads" / "task1.json").read_text())
    assert head["num_labels"] == 3 and head["model_type"] == "bert"
    assert len(head["id2label"]) == 3


def test_record_and_card(adamerging: FuseOutcome, pool: Pool) -> None:
    out = adamerging.out_dir
    rec = json.loads((out / "fusion.json").read_text())
    assert rec["kind"] == "static" and rec["algorithm"] == "adamerging"
    assert rec["parameters"]["steps"] == 2 and rec["parameters"]["lr"] == 0.05
    assert rec["data"]["split"] == "test" and rec["data"]["examples"] == {"task0": 24, "task1": 24}
    assert rec["history"]["steps"] == 2 and len(rec["history"]["loss"]) == 2
    assert rec["recipe"] == "recipe.yaml"
    card = (out / "README.md").read_text()
    base_sha = sha256_file(pool.root / "base" / "model.safetensors")
    assert base_sha in card and "arxiv.org/abs/2310.02575" in card and "`steps` | `2`" in card
    for split in ("validation", "test"):
        for task in ("task0", "task1"):
            assert f"{100 * rec['accuracy'][split][task]:.1f}" in card


def test_recorded_accuracy_matches_an_independent_evaluation(
    adamerging: FuseOutcome, pool: Pool
) -> None:
    from transformers import AutoModel

    fused = AutoModel.from_pretrained(adamerging.out_dir).state_dict()
    rec = json.loads((adamerging.out_dir / "fusion.json").read_text())
    for task in ("task0", "task1"):
        model = _reference_classifier(pool, task, fused)
        for split in ("validation", "test"):
            assert rec["accuracy"][split][task] == pytest.approx(
                _accuracy(model, pool, task, split)
            )


def test_load_with_task_gives_fused_encoder_plus_head(adamerging: FuseOutcome, pool: Pool) -> None:
    from transformers import AutoModel

    fused = AutoModel.from_pretrained(adamerging.out_dir).state_dict()
    for task in ("task0", "task1"):
        batch = _batch(pool, task)
        model = load(adamerging.out_dir, task=task)
        assert not model.training
        with torch.no_grad():
            got = model(**batch).logits
            want = _reference_classifier(pool, task, fused)(**batch).logits
        assert got.shape == (6, 2 if task == "task0" else 3)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_exported_recipe_reproduces_the_fused_tensors(
    adamerging: FuseOutcome, tmp_path: Path
) -> None:
    from mergeforge.engine.merge import merge
    from models import load_state

    recipe = yaml.safe_load((adamerging.out_dir / "recipe.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic"
    assert Path(recipe["base_model"]).is_absolute()
    assert all(Path(m["model"]).is_absolute() for m in recipe["models"])
    merge(adamerging.out_dir / "recipe.yaml", tmp_path / "merged", progress=False)
    merged, fused = load_state(tmp_path / "merged"), load_state(adamerging.out_dir)
    assert merged.keys() == fused.keys()
    for name, t in fused.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-6, msg=name)
    coeffs = adamerging.result.coefficients
    assert coeffs is not None and len({round(v, 6) for v in coeffs["task0"].values()}) > 1


def test_recipe_filters_pick_each_tensors_own_coefficient() -> None:
    """Filters match by substring, first entry wins: names inside other names must still get
    their own λ (e.g. ``h.1.mlp.weight`` inside ``h.1.mlp.weight_2`` and ``x.h.1.mlp.weight``)."""
    from mergeforge.bench.fuse_output import recipe_yaml
    from mergeforge.config import evaluate_setting, parse_recipe

    names = ["h.1.mlp.weight", "h.1.mlp.weight_2", "x.h.1.mlp.weight", "mlp", "h.11.mlp.weight"]
    coeffs = {t: {n: float(10 * i + j) for j, n in enumerate(names)} for i, t in enumerate("ab")}
    text = recipe_yaml(coeffs, Path("/base"), {"a": Path("/a"), "b": Path("/b")}, "adamerging")
    recipe = parse_recipe(yaml.safe_load(text), text=text)
    for i, entry in enumerate(recipe.models):
        weight = entry.parameters["weight"]
        assert [evaluate_setting(weight, n, 0.0) for n in names] == [10 * i + j for j in range(5)]
        assert evaluate_setting(weight, "embeddings.position_ids", 0.0) == 0.0
    assert recipe.base_model == "/base" and [m.model for m in recipe.models] == ["/a", "/b"]


def test_user_pool_problem_reads_real_tokens(pool: Pool) -> None:
    from mergeforge.bench.fusion_problem import problem_from_pool
    from mergeforge.bench.user_pools import load_user_pool

    user_pool = load_user_pool(write_config(pool, "adamerging", {}), cache_root=pool.root / "cache")
    ids = problem_from_pool(user_pool, "test").problem.tasks[0].unlabeled[0]["input_ids"]
    assert (ids > 4).any(), "every token is special or [UNK]"  # ids 0-4: special tokens


def test_regmean_static_has_no_recipe(pool: Pool, tmp_path: Path) -> None:
    from transformers import AutoModel

    res = run_fuse(pool, tmp_path / "out", "regmean", {})
    assert res.result.coefficients is None and not (tmp_path / "out" / "recipe.yaml").exists()
    rec = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert rec["data"]["used"].startswith("validation inputs")
    _, info = AutoModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize(
    ("algorithm", "parameters"),
    [
        ("smile", {"k": 4}),
        ("wemoe", {"steps": 1}),
        ("twin_merging", {"epochs": 1, "batch_size": 4}),
    ],
)
def test_dynamic_result_loads_bit_identical(
    pool: Pool, tmp_path: Path, algorithm: str, parameters: dict[str, Any]
) -> None:
    res = run_fuse(pool, tmp_path / "out", algorithm, parameters)
    rec = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert rec["kind"] == "dynamic" and rec["body_class"] == "AutoModel"
    assert rec["attn_implementation"] == "sdpa"
    assert rec["loader"] == res.result.loader and rec["description"]["algorithm"] == algorithm
    module = res.result.module
    loaded = load(tmp_path / "out")
    assert type(loaded) is type(module) and not loaded.training
    batch = _batch(pool, "task1")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, module(**batch).last_hidden_state)
        got = load(tmp_path / "out", task="task1")(**batch).logits
        classifier = _reference_classifier(pool, "task1", module)  # BERT: classifier(pooled)
        want = classifier.classifier(module(**batch).pooler_output)  # (6, 3)
    assert got.shape == (6, 3) and torch.equal(got, want)
    model = _reference_classifier(pool, "task0", loaded)
    assert rec["accuracy"]["test"]["task0"] == pytest.approx(
        _accuracy(model, pool, "task0", "test")
    )


def test_cli_fuse_writes_and_reports(
    pool: Pool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = write_config(pool, "smile", {"k": 2})
    assert run_cli("fuse", cfg, tmp_path / "out", "--quiet") == 0
    text = capsys.readouterr().out
    assert "smile" in text and "task1" in text and "mergeforge.load" in text
    assert "reads no data" in (tmp_path / "out" / "README.md").read_text()
    assert any((tmp_path / "home" / ".cache" / "mergeforge" / "pools").iterdir())
    assert run_cli("fuse", cfg, tmp_path / "out", "--quiet", "--overwrite") == 0


def _other_architecture(pool: Pool) -> str:
    """A 2-label classifier with hidden size 16: not a fine-tune of the pool's base."""
    from transformers import BertConfig, BertForSequenceClassification

    path = pool.root / "other"
    if not path.exists():
        cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)  # fmt: skip
        BertForSequenceClassification(cfg).save_pretrained(path)
    return "other"


BAD = {
    "unknown algorithm": (lambda p: write_config(p, "adamergin", {}), ["adamergin", "regmean"]),
    "unknown parameter": (lambda p: write_config(p, "adamerging", {"stepz": 2}), ["stepz", "steps"]),
    "bad parameter value": (lambda p: write_config(p, "adamerging", {"steps": -1}), ["steps"]),
    "bad data column": (lambda p: write_config(p, "regmean", {}, text="txt"), ["txt", "sentence"]),
    "missing data file": (
        lambda p: write_config(p, "regmean", {}, test="nope.csv"), ["nope.csv", "does not exist"]
    ),
    "label out of range": (
        lambda p: write_config(p, "regmean", {}, test="task1_test.csv"), ["label id 2", "num_labels=2"]
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_clear_error_and_writes_nothing(
    case: str, pool: Pool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make, words = BAD[case]
    cfg = make(pool)
    assert run_cli("fuse", cfg, tmp_path / "out", "--quiet") != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert not list(tmp_path.glob("out*"))


def test_models_of_another_architecture_are_refused(
    pool: Pool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = write_config(pool, "regmean", {})
    doc = yaml.safe_load(cfg.read_text())
    doc["tasks"][0]["model"] = _other_architecture(pool)
    cfg.write_text(yaml.safe_dump(doc))
    assert run_cli("fuse", cfg, tmp_path / "out", "--quiet") != 0
    err = capsys.readouterr().err
    assert "hidden size 16" in err and "fine-tuned from the base" in err
    assert not list(tmp_path.glob("out*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_refused_before_anything_runs(
    pool: Pool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = write_config(pool, "smile", {})
    assert run_cli("fuse", cfg, tmp_path / "out", "--quiet", "--device", "cuda") != 0
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))


def test_existing_out_dir_is_kept_without_overwrite(
    pool: Pool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = write_config(pool, "smile", {})
    assert run_cli("fuse", cfg, out, "--quiet") != 0
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


CUDA_FAST: dict[str, dict[str, Any]] = {
    "fisher": {"examples": 8}, "regmean": {"examples": 8}, "regmean_pp": {"examples": 8},
    "adamerging": {"steps": 2}, "adamerging_pp": {"steps": 2}, "concrete_ta": {"steps": 2},
    "concrete_adamerging": {"steps": 1, "adamerging_steps": 2},
    "wemoe": {"steps": 2}, "e_wemoe": {"steps": 2}, "smile": {"k": 2},
    "twin_merging": {"epochs": 1, "batch_size": 4},
}  # fmt: skip
# Sampled on the device's own generator (masks, dropout): CUDA and CPU draw different numbers.
CUDA_RANDOM = {"concrete_ta", "concrete_adamerging", "twin_merging"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("algorithm", sorted(CUDA_FAST))
def test_fuse_on_cuda_matches_cpu(pool: Pool, tmp_path: Path, algorithm: str) -> None:
    """Every algorithm fuses on CUDA (heads, batches and modules on the GPU); the written result
    loads on the CPU and, where nothing is sampled, equals the CPU run's to float tolerance."""
    cfg = write_config(pool, algorithm, CUDA_FAST[algorithm])
    cache = pool.root / "c"
    for device in ("cuda", "cpu"):
        fuse(cfg, tmp_path / device, device=device, progress=False, cache_root=cache)
    batch = _batch(pool, "task0")
    with torch.no_grad():
        got = load(tmp_path / "cuda")(**batch).last_hidden_state  # loads and runs on the CPU
        want = load(tmp_path / "cpu")(**batch).last_hidden_state
    assert got.device.type == "cpu" and got.shape == want.shape
    if algorithm not in CUDA_RANDOM:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)

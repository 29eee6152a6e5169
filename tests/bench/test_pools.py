"""Text pools: cached builds (no retraining), fingerprints, atomic builds, user pool YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergeforge.bench import pools
from mergeforge.bench.finetune import TrainConfig
from mergeforge.bench.pools import build_text_pool, get_pool
from mergeforge.bench.tasks import load_task, rows_digest, task_rows
from mergeforge.bench.user_pools import load_user_pool
from mergeforge.errors import PoolError

TASKS = ("ucla_subject", "entity_type")
CFG = TrainConfig(steps=2, batch_size=8, max_len=12, warmup_steps=1, eval_batch_size=128, threads=1)


def _state_names(path: Path) -> dict[str, tuple[int, ...]]:
    from models import load_state

    return {k: tuple(v.shape) for k, v in load_state(path).items()}


@pytest.fixture(scope="module")
def built(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, build_text_pool("tiny", tiny_bert, TASKS, CFG, cache_root=cache, progress=False)


def test_build_layout_and_manifest(built) -> None:
    cache, pool = built
    assert pool.root == cache / pool.fingerprint and pool.kind == "text-classification"
    assert [t.name for t in pool.tasks] == list(TASKS)
    assert [p.name for p in cache.iterdir()] == [pool.fingerprint]  # no temp dirs left
    base = _state_names(pool.base_dir)
    for task in pool.tasks:
        assert _state_names(task.encoder_dir) == base
        assert (task.model_dir / "config.json").is_file()
        assert task.data == load_task(task.name, 0)
    manifest = json.loads((pool.root / "manifest.json").read_text())
    entry = manifest["tasks"][0]
    data = load_task("ucla_subject", 0)
    assert entry["label_names"] == list(data.label_names)
    assert entry["sizes"] == {"train": 523, "validation": 100, "test": 200}
    assert entry["rows_sha256"] == rows_digest(task_rows("ucla_subject", 0))
    assert entry["rows"]["test"] == list(task_rows("ucla_subject", 0)["test"])
    for key in ("val_acc", "test_acc", "base_head_test_acc", "train_s", "majority_test_acc"):
        assert 0 <= entry[key] <= (1 if key != "train_s" else 1e4)
    assert manifest["train"] == CFG.to_json() and len(manifest["base"]["sha256"]) == 64


def test_cache_hit_trains_nothing(built, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, pool = built

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached pool must not be fine-tuned again")

    monkeypatch.setattr(pools, "finetune_classifier", fail)
    again = build_text_pool("tiny", tiny_bert, TASKS, CFG, cache_root=cache, progress=False)
    assert again == pool


def test_fingerprint_follows_config(built, tiny_bert: Path) -> None:
    _, pool = built
    other_cfg = TrainConfig(**{**CFG.to_json(), "steps": 3})
    fps = {
        pools.fingerprint(pools._build_config(tiny_bert, TASKS, c, s))
        for c, s in ((CFG, 0), (other_cfg, 0), (CFG, 1))
    }
    assert len(fps) == 3 and pool.fingerprint in fps
    assert pools.fingerprint(pools._build_config(tiny_bert, TASKS[::-1], CFG, 0)) not in fps


def test_interrupted_build_leaves_nothing(tiny_bert: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = pools.finetune_classifier

    def flaky(*args: object, **kwargs: object):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pools, "finetune_classifier", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_text_pool("tiny", tiny_bert, TASKS, CFG, cache_root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_pool_and_task(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(PoolError, match=r"unknown pool 'nope'.*text-minilm"):
        get_pool("nope")
    with pytest.raises(PoolError, match=r"unknown task 'nope'.*ucla_subject"):
        build_text_pool("x", tiny_bert, ["nope"], CFG, cache_root=tmp_path)


# --- user pools ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory, bert_tools) -> Path:
    """A base BertModel, two 2-label classifiers derived from it, a 3-layer one, and data."""
    from models import make_finetune

    make_tiny_bert, save_tokenizer = bert_tools

    root = tmp_path_factory.mktemp("user")
    make_tiny_bert(root / "base", seed=1)
    head = make_tiny_bert(root / "head", seed=1, head="sequence_classification")
    for i in (0, 1):
        save_tokenizer(make_finetune(head, root / f"ft{i}", seed=10 + i))
    make_tiny_bert(root / "deep", seed=1, head="sequence_classification", num_layers=3)
    rows = "text,label\n" + "".join(f"example {i},{i % 2}\n" for i in range(6))
    (root / "val.csv").write_text(rows)
    (root / "test.csv").write_text(rows)
    (root / "bad.csv").write_text(rows + "another,2\n")
    return root


def _yaml(root: Path, tasks: list[dict[str, object]], base: str = "base") -> Path:
    path = root / f"pool{len(list(root.glob('pool*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "base": base, "tasks": tasks}))
    return path


def _task(name: str, model: str, **data: object) -> dict[str, object]:
    spec = {"validation": "val.csv", "test": "test.csv", "text": "text", "label": "label"}
    return {"name": name, "model": model, "data": {**spec, **data}}


def test_user_pool_happy_path(user_dir: Path, tmp_path: Path) -> None:
    path = _yaml(user_dir, [_task("a", "ft0"), _task("b", "ft1", label_names=["no", "yes"])])
    pool = get_pool(str(path), cache_root=tmp_path)
    assert pool.name == "mine" and [t.name for t in pool.tasks] == ["a", "b"]
    assert pool.tasks[0].model_dir == user_dir / "ft0"
    assert pool.tasks[1].data.label_names == ("no", "yes")
    assert pool.tasks[0].data.label_names == ("0", "1") and len(pool.tasks[0].data.test) == 6
    base = _state_names(pool.base_dir)
    assert all(_state_names(t.encoder_dir) == base for t in pool.tasks)
    assert load_user_pool(path, cache_root=tmp_path).fingerprint == pool.fingerprint
    # the base may also be a classifier directory: its encoder is used
    via_head = load_user_pool(
        _yaml(user_dir, [_task("a", "ft0")], base="head"), cache_root=tmp_path
    )
    assert _state_names(via_head.base_dir) == base


@pytest.mark.parametrize(
    ("tasks", "base", "match"),
    [
        ([_task("a", "missing")], "base", r"task 'a' model .*missing is not a Hugging Face"),
        ([_task("a", "ft0")], "nobase", r"base model .*nobase is not a Hugging Face"),
        (
            [_task("a", "ft0", text="sentence")],
            "base",
            r"no column 'sentence'.*\['text', 'label'\]",
        ),
        ([_task("a", "ft0", test="bad.csv")], "base", r"label id 2 .*num_labels=2"),
        ([_task("a", "ft0"), _task("b", "deep")], "base", r"'b'.*architecture mismatch"),
        ([_task("a", "ft0"), _task("a", "ft1")], "base", r"task names repeat"),
    ],
)
def test_user_pool_errors(user_dir: Path, tmp_path: Path, tasks, base: str, match: str) -> None:
    with pytest.raises(PoolError, match=match):
        load_user_pool(_yaml(user_dir, tasks, base=base), cache_root=tmp_path)
    assert not any(p.name.startswith("user-") for p in tmp_path.iterdir())


def test_user_pool_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="does not exist"):
        load_user_pool(tmp_path / "none.yaml")
    (tmp_path / "p.yaml").write_text("name: x\ntasks: []\n")
    with pytest.raises(PoolError, match="expected a mapping with keys name, base, tasks"):
        load_user_pool(tmp_path / "p.yaml")

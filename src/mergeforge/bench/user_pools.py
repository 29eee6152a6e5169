"""User pools: a YAML file listing a base model, the fine-tuned classifiers and their data.

``load_user_pool(path)`` reads::

    name: my-pool
    base: ./bert-base            # HF dir: an encoder, or a ForSequenceClassification model
    tasks:
      - name: sentiment
        model: ./bert-sentiment  # HF dir of the fine-tuned AutoModelForSequenceClassification
        data: {validation: val.csv, test: test.csv, text: sentence, label: label}

Each model's encoder is extracted once into the pool cache (keyed by the weights' and data files'
digests), so merges combine encoders with the base's tensor names while every task keeps its head.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergeforge.bench.finetune import extract_encoder, save_encoder
from mergeforge.bench.pool import CACHE_ROOT, Pool, PoolTask, TaskData, fingerprint
from mergeforge.bench.pools import build_atomically, weights_digest
from mergeforge.bench.tasks import data_digest
from mergeforge.errors import PoolError


def _yaml_tasks(path: Path, doc: Any) -> list[Mapping[str, Any]]:
    """The YAML's ``tasks`` list, checked for shape (each a mapping with name, model, data)."""
    if not isinstance(doc, Mapping) or not {"name", "base", "tasks"} <= set(doc):
        raise PoolError(
            f"user pool {path}: expected a mapping with keys name, base, tasks "
            f"(tasks: [{{name, model, data: {{validation, test, text, label}}}}])."
        )
    tasks = doc["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise PoolError(f"user pool {path}: `tasks` must be a non-empty list.")
    for i, t in enumerate(tasks):
        data = t.get("data") if isinstance(t, Mapping) else None
        need = {"validation", "test", "text", "label"}
        if (
            not isinstance(data, Mapping)
            or not need <= set(data)
            or not {"name", "model"} <= set(t)
        ):
            raise PoolError(
                f"user pool {path}: task #{i} needs `name`, `model` and `data` with keys "
                f"{sorted(need)} (label_names optional)."
            )
    names = [str(t["name"]) for t in tasks]
    if len(set(names)) != len(names):
        raise PoolError(f"user pool {path}: task names repeat: {names}")
    return tasks


def _model_config(path: Path, what: str) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise PoolError(
            f"{what} {path} is not a Hugging Face model directory (no config.json there); "
            "give the directory written by save_pretrained."
        )
    return AutoConfig.from_pretrained(path)


def _user_task_data(yaml_path: Path, task: Mapping[str, Any], num_labels: int) -> TaskData:
    """A user task's validation and test splits, labels checked against the head's size.

    Without ``label_names``, integer labels keep their ids, and string labels get ids from the
    sorted union of both files' labels (so both splits use the same ids).
    """
    from mergeforge.bench.pool import Split
    from mergeforge.bench.tasks import load_user_split

    spec = task["data"]
    files = {s: (yaml_path.parent / str(spec[s])).expanduser() for s in ("validation", "test")}

    def read(names: Any) -> dict[str, tuple[Split, tuple[str, ...]]]:
        return {
            s: load_user_split(f, str(spec["text"]), str(spec["label"]), names)
            for s, f in files.items()
        }

    loaded = read(spec.get("label_names"))
    if spec.get("label_names") is None:
        found = [n for _, names in loaded.values() for n in names]
        if any(n != str(i) for _, names in loaded.values() for i, n in enumerate(names)):
            loaded = read(sorted(set(found)))  # string labels: one id order for both files
    for s, (split, names) in loaded.items():
        top = max(split.labels)
        if top >= num_labels:
            raise PoolError(
                f"user pool {yaml_path}: task {task['name']!r}: {files[s]} has label id {top} "
                f"({names[top]!r}) but the model's head has num_labels={num_labels}; labels "
                f"must lie in 0…{num_labels - 1}."
            )
    names = max((n for _, n in loaded.values()), key=len)[:num_labels]
    names = tuple(names) + tuple(str(i) for i in range(len(names), num_labels))
    val, test = loaded["validation"][0], loaded["test"][0]
    source = f"user pool {yaml_path}"
    return TaskData(str(task["name"]), names, Split((), ()), val, test, source=source)


def load_user_pool(yaml_path: str | Path, *, cache_root: str | Path = CACHE_ROOT) -> Pool:
    """A pool described by a YAML file (see the module docs; paths relative to the YAML).

    Each task's encoder (and the base's) is extracted once into ``cache_root/user-<fingerprint>``,
    the fingerprint covering the weights' and data files' digests.
    """
    import yaml

    path = Path(yaml_path).expanduser()
    if not path.is_file():
        raise PoolError(f"user pool file {path} does not exist; check the path.")
    doc = yaml.safe_load(path.read_text())
    tasks = _yaml_tasks(path, doc)
    base = (path.parent / str(doc["base"])).expanduser()
    base_cfg = _model_config(base, "base model")
    models, datas = [], []
    for t in tasks:
        model = (path.parent / str(t["model"])).expanduser()
        cfg = _model_config(model, f"task {t['name']!r} model")
        if (cfg.model_type, cfg.hidden_size) != (base_cfg.model_type, base_cfg.hidden_size):
            raise PoolError(
                f"user pool {path}: task {t['name']!r} model {model} is a {cfg.model_type} with "
                f"hidden size {cfg.hidden_size}, the base {base} a {base_cfg.model_type} with "
                f"{base_cfg.hidden_size}; every model must be fine-tuned from the base."
            )
        models.append(model)
        datas.append(_user_task_data(path, t, int(cfg.num_labels)))
    config = {
        "format": "mergeforge-user-pool/1",
        "base_sha256": weights_digest(base),
        "tasks": [
            {"name": d.name, "model_sha256": weights_digest(m), "data_sha256": data_digest(d)}
            for d, m in zip(datas, models, strict=True)
        ],
    }
    root = Path(cache_root).expanduser() / f"user-{fingerprint(config)}"
    if not (root / "manifest.json").is_file():
        build_atomically(root, lambda tmp: _extract_user(tmp, base, datas, models, config))
    tasks_out = tuple(
        PoolTask(d.name, m, root / "tasks" / d.name / "encoder", d)
        for d, m in zip(datas, models, strict=True)
    )
    return Pool(
        str(doc["name"]),
        "text-classification",
        root / "base",
        tasks_out,
        root,
        fingerprint(config),
        config,
    )


def _extract_user(
    tmp: Path,
    base: Path,
    datas: Sequence[TaskData],
    models: Sequence[Path],
    config: Mapping[str, Any],
) -> None:
    """Extract every encoder into ``tmp`` and check they all have the base's tensor names/shapes."""
    import torch
    from transformers import AutoModel

    from mergeforge.bench.finetune import _quiet

    _quiet()
    torch.manual_seed(0)  # a part the base lacks (e.g. a pooler) gets a reproducible init
    base_model = AutoModel.from_pretrained(base)
    save_encoder(base_model, tmp / "base")
    want = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    for d, m in zip(datas, models, strict=True):
        enc_dir = extract_encoder(m, tmp / "tasks" / d.name / "encoder")
        got = {
            k: tuple(v.shape) for k, v in AutoModel.from_pretrained(enc_dir).state_dict().items()
        }
        if got != want:
            diff = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
            raise PoolError(
                f"task {d.name!r} model {m}: its encoder does not match the base {base} "
                f"(architecture mismatch; first differing tensors: {diff[:5]}); every task model "
                "must be fine-tuned from the same base."
            )
    (tmp / "manifest.json").write_text(json.dumps({"build_config": config}, indent=1))

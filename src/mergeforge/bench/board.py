"""The leaderboard as data: one row per method from a benchmark's ``results.json`` dict.

Numbers: a task's cell is its test metric (accuracy shown in %); **avg** = (1/T) Σ_t acc_t (the
absolute average); **norm. avg** = (1/T) Σ_t acc_t(merged) / acc_t(fine-tuned) × 100 (the
normalized accuracy of Ilharco et al. 2023, https://arxiv.org/abs/2212.04089, and later merging
papers). Rows are sorted by avg, descending; baselines are kept and marked.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergeforge.bench.records import BASELINES, Candidate, RunRecord
from mergeforge.errors import MergeforgeError

PERCENT_METRICS = ("accuracy", "acc", "top1", "f1", "exact_match")
MD_SPECIAL = "\\`*[]<>|&#"


@dataclass(frozen=True)
class Row:
    """One method's line of the leaderboard (values in display units, e.g. % for accuracy)."""

    method: str
    baseline: bool
    values: Mapping[str, float]
    normalized: Mapping[str, float]
    params: Mapping[str, object]
    selection: tuple[Candidate, ...]
    data_used: str
    merge_s: float
    eval_s: float
    wall_s: float
    peak_rss_bytes: int

    @property
    def avg(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def norm_avg(self) -> float | None:
        return statistics.fmean(self.normalized.values()) if self.normalized else None


@dataclass(frozen=True)
class Board:
    """The leaderboard: tasks in pool order, rows sorted by avg (descending, then by name)."""

    pool: Mapping[str, object]
    tasks: tuple[str, ...]
    metrics: Mapping[str, str]
    rows: tuple[Row, ...]
    run_info: Mapping[str, object]

    @property
    def scale(self) -> float:
        """100 when every task's metric is a fraction shown in %, else 1."""
        return 100.0 if all(m in PERCENT_METRICS for m in self.metrics.values()) else 1.0

    @property
    def value_name(self) -> str:
        kinds = sorted(set(self.metrics.values()))
        if self.scale == 100.0:
            return "test accuracy (%)" if kinds == ["accuracy"] else f"test {'/'.join(kinds)} (%)"
        return f"test {'/'.join(kinds)}"

    def complete(self, row: Row) -> bool:
        return len(row.values) == len(self.tasks)

    def best(self, task: str) -> float | None:
        """The best merged (non-baseline) value on ``task``."""
        vals = [r.values[task] for r in self.rows if not r.baseline and task in r.values]
        return max(vals) if vals else None


def build_board(results: Mapping[str, object]) -> Board:
    """Parse a results dict into a sorted ``Board``; a clear error when it is malformed."""
    raw = results.get("records") if isinstance(results, Mapping) else None
    if not isinstance(raw, list):
        raise MergeforgeError(
            "the benchmark results have no 'records' list; a results.json holds "
            '{"format", "pool", "run_info", "records": [...]} as written by `mergeforge bench`. '
            "Rerun the benchmark (it resumes from finished runs) to regenerate it."
        )
    records = [RunRecord.from_json(r) for r in raw]
    pool = results.get("pool") or {}
    pool_tasks = [str(t["name"]) for t in pool.get("tasks", ())]  # type: ignore[union-attr]
    tasks = tuple(dict.fromkeys([*pool_tasks, *(r.task for r in records)]))
    metrics = {r.task: r.metric for r in records}
    scale = 100.0 if all(m in PERCENT_METRICS for m in metrics.values()) else 1.0
    by_method: dict[str, list[RunRecord]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    rows = [_row(m, recs, scale) for m, recs in by_method.items()]
    rows.sort(key=lambda r: (r.avg is None, -(r.avg or 0.0), r.method))
    run_info = results.get("run_info") or {}
    return Board(pool, tasks, metrics, tuple(rows), run_info)  # type: ignore[arg-type]


def _row(method: str, recs: Sequence[RunRecord], scale: float) -> Row:
    first = recs[0]
    return Row(
        method=method,
        baseline=method in BASELINES,
        values={r.task: r.value * scale for r in recs if math.isfinite(r.value)},
        normalized={r.task: r.normalized * 100 for r in recs if math.isfinite(r.normalized)},
        params=dict(first.params),
        selection=tuple(first.selection),
        data_used=first.data_used,
        merge_s=max(r.merge_s for r in recs),
        eval_s=max(r.eval_s for r in recs),
        wall_s=max(r.wall_s for r in recs),
        peak_rss_bytes=max(r.peak_rss_bytes for r in recs),
    )


def format_value(x: object) -> str:
    """A parameter value as short text: floats with up to 4 significant digits, others as JSON."""
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (int, str)):
        return str(x)
    return json.dumps(x, sort_keys=True, default=str)


def format_params(params: Mapping[str, object]) -> str:
    """``k=v, k=v`` in the params' own order, or ``—`` when empty."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in params.items()) or "—"


def num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def flatten_info(info: Mapping[str, object], prefix: str = "") -> list[tuple[str, str]]:
    """``run_info`` as ``(dotted key, text)`` pairs, nested mappings flattened in order."""
    out: list[tuple[str, str]] = []
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(flatten_info(value, name + "."))
        else:
            out.append((name, format_value(value)))
    return out


def md(text: object) -> str:
    """Markdown-safe text: backslash-escape markup characters (underscores only at word edges,
    so ``task_arithmetic`` stays readable); newlines become spaces (table cells are one line)."""
    s = str(text).replace("\r", " ").replace("\n", " ")
    out = []
    for i, ch in enumerate(s):
        edge = ch == "_" and (i == 0 or i == len(s) - 1 or not s[i - 1].isalnum())
        out.append("\\" + ch if ch in MD_SPECIAL or edge else ch)
    return "".join(out)

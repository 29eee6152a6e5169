"""``report.html``: the leaderboard, charts (inline SVG), parameters, tasks and run info in one
self-contained page (inline CSS, no scripts, no external resources), readable 1280 px wide."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from mergeforge.bench import svg
from mergeforge.bench.board import Board, Row, flatten_info, format_params, format_value, num
from mergeforge.bench.literature import literature_checks, verdict
from mergeforge.methods.registry import find_method

CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;background:#fff}
main{max-width:1180px;margin:0 auto;padding:16px 20px}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
nav a{margin-right:12px}
table{border-collapse:collapse;width:100%;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top;overflow-wrap:anywhere;word-break:break-word}
th{background:#f4f4f4;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.baseline td{color:#666;font-style:italic}
.lb td:first-child{min-width:9em}.lb th:nth-last-child(-n+2){white-space:nowrap}
svg{display:block;margin:6px 0}
.note{color:#555}
code{overflow-wrap:anywhere}
"""


def breakable(text: str) -> str:
    """Escaped ``text`` with line-break opportunities after ``_ - / .`` (long task names wrap
    at word parts instead of mid-word)."""
    out = escape(text)
    for ch in "_-/.":
        out = out.replace(ch, ch + "<wbr>")
    return out


def _table(
    header: Sequence[str], body: Sequence[Sequence[str]], numeric: set[int], cls: str = ""
) -> str:
    """An HTML table; ``header`` is plain text, body cells are HTML (escaped by the caller);
    a body row may start with a class name given as ``"class:NAME"``."""
    head = "".join(f"<th>{breakable(h)}</th>" for h in header)
    rows = []
    for cells in body:
        row_cls = ""
        if cells and cells[0].startswith("class:"):
            row_cls, cells = f' class="{cells[0][6:]}"', cells[1:]
        tds = "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(cells)
        )
        rows.append(f"<tr{row_cls}>{tds}</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _html_leaderboard(board: Board) -> str:
    body = []
    for row in board.rows:
        cells = ["class:baseline" if row.baseline else "class:merged"]
        cells.append(breakable(row.method) + (" (baseline)" if row.baseline else ""))
        for task in board.tasks:
            v = row.values.get(task)
            best = v is not None and not row.baseline and v == board.best(task)
            cells.append(f"<b>{num(v)}</b>" if best else num(v))
        cells += [num(row.avg) + ("" if board.complete(row) else "*"), num(row.norm_avg)]
        body.append(cells)
    n = len(board.tasks)
    table = _table(["method", *board.tasks, "avg", "norm. avg"], body, set(range(1, n + 3)), "lb")
    return (
        f'<p class="note">Cells: {escape(board.value_name)} on each task\'s test split. '
        "<b>avg</b>: mean over tasks; <b>norm. avg</b>: mean over tasks of merged ÷ fine-tuned "
        "(%). Sorted by avg; baselines in italics; the best merged value per task in bold. "
        "Hyperparameters were chosen on validation splits only.</p>" + table
    )


def _per_task_chart(board: Board) -> str:
    rows = [r.method for r in board.rows]
    series = [
        svg.Series(
            t, tuple((float(i), r.values[t]) for i, r in enumerate(board.rows) if t in r.values)
        )
        for t in board.tasks
    ]
    muted = {r.method for r in board.rows if r.baseline}
    unit = "%" if board.scale == 100.0 else ""
    return svg.dot_plot(rows, series, f"Per-task {board.value_name} by method", unit, muted)


def _norm_chart(board: Board) -> str:
    rows = sorted(
        (r for r in board.rows if r.norm_avg is not None),
        key=lambda r: (-(r.norm_avg or 0.0), r.method),
    )
    bars = [
        svg.BarRow(
            r.method,
            (svg.Segment(r.norm_avg or 0.0, "#bab0ac" if r.baseline else "#4e79a7"),),
            f"{r.norm_avg:.1f}%",
            r.baseline,
        )
        for r in rows
    ]
    return svg.bar_chart(bars, "Normalized average accuracy by method", "% of fine-tuned", 100.0)


def _cost_charts(board: Board) -> str:
    if not any(r.wall_s or r.peak_rss_bytes for r in board.rows):
        return '<p class="note">No timings or memory were recorded.</p>'
    time_rows = []
    for r in board.rows:
        other = max(r.wall_s - r.merge_s - r.eval_s, 0.0)
        segs = (
            svg.Segment(r.merge_s, "#4e79a7", "merge"),
            svg.Segment(r.eval_s, "#f28e2b", "evaluation"),
            svg.Segment(other, "#bab0ac", "other"),
        )
        time_rows.append(svg.BarRow(r.method, segs, f"{r.wall_s:.1f} s", r.baseline))
    mem_rows = [
        svg.BarRow(
            r.method,
            (svg.Segment(r.peak_rss_bytes / 2**20, "#59a14f"),),
            f"{r.peak_rss_bytes / 2**20:.0f} MiB",
            r.baseline,
        )
        for r in board.rows
    ]
    return (
        "<h3>Wall time (merge + evaluation of every grid point)</h3>"
        + svg.bar_chart(time_rows, "Wall time by method", "seconds")
        + "<h3>Peak resident memory</h3>"
        + svg.bar_chart(mem_rows, "Peak RSS by method", "MiB")
    )


def _number(x: object) -> float | None:
    """A scalar parameter as a float: numbers, or a list of equal numbers (a uniform weight)."""
    if isinstance(x, (list, tuple)) and x and all(v == x[0] for v in x):
        x = x[0]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def sensitivity(row: Row) -> tuple[str, svg.Series] | None:
    """``(parameter, curve)`` of validation score vs the one numeric parameter the method's grid
    varies; when the grid varies several, the profile (best score at each value) over ``lambda``
    or ``weight``; ``None`` when there is no such parameter."""
    if len(row.selection) < 2:
        return None
    keys = list(dict.fromkeys(k for c in row.selection for k in c.params))
    varied = [k for k in keys if len({format_value(c.params.get(k)) for c in row.selection}) > 1]
    numeric = [
        k for k in varied if all(_number(c.params.get(k)) is not None for c in row.selection)
    ]
    if len(varied) == 1 and numeric:
        key, label = varied[0], row.method
    else:
        key = next((k for k in ("lambda", "weight") if k in numeric), "")
        if not key:
            return None
        label = f"{row.method} (best over {', '.join(k for k in varied if k != key)})"
    best: dict[float, float] = {}
    for c in row.selection:
        x = _number(c.params[key])
        best[x] = max(best.get(x, -math.inf), c.val_avg)  # type: ignore[index]
    points = tuple(sorted(best.items()))
    return key, svg.Series(label, points, _number(row.params.get(key)))


def _sensitivity_charts(board: Board) -> str:
    groups: dict[str, list[svg.Series]] = {}
    for row in board.rows:
        found = sensitivity(row)
        if found:
            key, curve = found
            pts = tuple((x, y * board.scale) for x, y in curve.points)
            groups.setdefault(key, []).append(svg.Series(curve.name, pts, curve.mark))
    if not groups:
        return '<p class="note">No method varied a single numeric parameter; nothing to plot.</p>'
    y_label = "validation score" + (" (%)" if board.scale == 100.0 else "")
    parts = [
        '<p class="note">Validation score used for selection vs the swept parameter; the '
        "chosen value is ringed. Test splits were never used.</p>"
    ]
    for key in sorted(groups, key=lambda k: (k not in ("lambda", "weight"), k)):
        parts.append(f"<h3>{escape(key)}</h3>")
        parts.append(svg.line_chart(groups[key], f"Validation score vs {key}", key, y_label))
    return "".join(parts)


def _params_table(board: Board) -> str:
    body = []
    for r in board.rows:
        spec = find_method(r.method)
        paper = f'<a href="{escape(spec.paper)}">paper</a>' if spec and spec.paper else ""
        body.append(
            [
                breakable(r.method),
                escape(format_params(r.params)),
                str(len(r.selection)),
                escape(r.data_used or "—"),
                paper,
            ]
        )
    return _table(["method", "chosen", "grid points", "data used", "reference"], body, {2})


def _tasks_table(board: Board) -> str:
    body = []
    for t in board.pool.get("tasks", ()):  # type: ignore[union-attr]
        sizes = " · ".join(f"{k} {v}" for k, v in (t.get("sizes") or {}).items())
        body.append(
            [
                escape(str(t.get("name", ""))),
                escape(format_value(t.get("num_classes", ""))),
                escape(sizes),
                escape(str(t.get("source", ""))),
            ]
        )
    return _table(["task", "classes", "examples", "source"], body, {1})


def _literature_table(board: Board) -> str:
    rows = [
        [escape(c.claim), escape(verdict(c)), escape(c.detail)] for c in literature_checks(board)
    ]
    return _table(["claim", "here", "numbers"], rows, set())


def render_html(board: Board) -> str:
    """The whole report page (self-contained: inline CSS and SVG, no external resource)."""
    name = str(board.pool.get("name", "?"))
    info = [[f"<code>{escape(k)}</code>", escape(v)] for k, v in flatten_info(board.run_info)]
    sections = [
        ("leaderboard", "Leaderboard", _html_leaderboard(board)),
        ("per-task", "Per-task results by method", _per_task_chart(board)),
        ("normalized", "Normalized average by method", _norm_chart(board)),
        ("literature", "Literature ordering on this pool", _literature_table(board)),
        ("cost", "Time and memory by method", _cost_charts(board)),
        ("sensitivity", "Hyperparameter sensitivity", _sensitivity_charts(board)),
        ("params", "Chosen hyperparameters and data used", _params_table(board)),
        ("tasks", "Tasks", _tasks_table(board)),
        ("run-info", "Run info", _table(["key", "value"], info, set())),
    ]
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{escape(t)}</h2>{html}</section>' for sid, t, html in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mergeforge bench — {escape(name)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>mergeforge bench — pool {escape(name)}</h1>"
        f'<p class="note">fingerprint <code>{escape(str(board.pool.get("fingerprint", "?")))}</code>'
        f" · {len(board.tasks)} tasks · {len(board.rows)} methods</p>"
        f"<nav>{nav}</nav>{body}</main></body></html>\n"
    )

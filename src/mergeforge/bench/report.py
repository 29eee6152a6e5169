"""Reports made from a benchmark's ``results.json`` dict: ``leaderboard.md`` and ``report.html``.

Both are functions of the results dict alone (format in ``records.py``; rows from ``board.py``),
so a finished or resumed run can be re-reported any time, and the same results give
byte-identical files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mergeforge.bench.board import Board, build_board, flatten_info, format_params, md, num
from mergeforge.bench.literature import literature_checks, verdict
from mergeforge.bench.report_html import render_html
from mergeforge.errors import OutputError


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |")
    lines.extend("| " + " | ".join(cells) + " |" for cells in body)
    return lines


def leaderboard_lines(board: Board) -> list[str]:
    """The methods × tasks table with avg and norm. avg columns."""
    header = ["#", "method", *(md(t) for t in board.tasks), "avg", "norm. avg"]
    body = []
    rank = 0
    for row in board.rows:
        rank += 0 if row.baseline else 1
        name = f"*{md(row.method)}* (baseline)" if row.baseline else md(row.method)
        cells = []
        for task in board.tasks:
            v = row.values.get(task)
            best = v is not None and not row.baseline and v == board.best(task)
            cells.append(f"**{num(v)}**" if best else num(v))
        mark = "" if board.complete(row) else "*"
        body.append(
            [
                "—" if row.baseline else str(rank),
                name,
                *cells,
                num(row.avg) + mark,
                num(row.norm_avg),
            ]
        )
    return _md_table(header, body, "rl" + "r" * (len(board.tasks) + 2))


def write_leaderboard(results: dict, path: str | Path) -> str:
    """Write ``leaderboard.md`` (methods × tasks, avg, norm. avg, chosen parameters, data use,
    pool and run_info) to ``path`` and return its text."""
    board = build_board(results)
    pool = board.pool
    lines = [
        f"# Leaderboard — pool {md(pool.get('name', '?'))}",
        "",
        f"Pool fingerprint `{pool.get('fingerprint', '?')}` · {len(board.tasks)} tasks · "
        f"{len(board.rows)} methods (baselines included, marked *(baseline)*).",
        "",
        f"Cells: {board.value_name} on each task's test split. **avg**: mean over tasks; "
        "**norm. avg**: mean over tasks of merged ÷ fine-tuned (%). Sorted by avg; the best "
        "merged value per task is in bold. Hyperparameters were chosen on validation splits only.",
        "",
        *leaderboard_lines(board),
    ]
    if any(not board.complete(r) for r in board.rows):
        lines += ["", "\\* average over the tasks this method has results for (some are missing)."]
    lines += ["", "## Literature ordering on this pool", ""]
    checks = literature_checks(board)
    lines += _md_table(["claim", "here", "numbers"],
                       [[md(c.claim), verdict(c), md(c.detail)] for c in checks], "lll")  # fmt: skip
    lines += ["", "## Chosen hyperparameters and data used", ""]
    params_body = [
        [md(r.method), md(format_params(r.params)), str(len(r.selection)), md(r.data_used or "—")]
        for r in board.rows
    ]
    lines += _md_table(["method", "chosen", "grid points", "data used"], params_body, "llrl")
    lines += ["", "## Run info", ""]
    lines += [f"- {md(k)}: {md(v)}" for k, v in flatten_info(board.run_info)] or ["- (none)"]
    text = "\n".join(lines) + "\n"
    _write(Path(path), text)
    return text


def write_report(results: dict, path: str | Path) -> None:
    """Write the self-contained ``report.html`` (inline CSS and SVG, no network) to ``path``."""
    board = build_board(results)
    _write(Path(path), render_html(board))


def _write(path: Path, text: str) -> None:
    if path.is_dir():
        raise OutputError(
            f"cannot write the report to {path}: it is a directory. Pass a file path such as "
            f"{path / 'report.html'}."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

"""What the literature reports about method ordering, checked against a board.

design.md §4 asks the benchmark to say, with numbers, whether the embedded pool reproduces the
published ordering: task arithmetic beats simple averaging (Ilharco et al. 2023), TIES is at least
task arithmetic (Yadav et al. 2023), layer-wise AdaMerging beats TIES (Yang et al. 2024), WEMoE and
SMILE come within 5 % of the individual models (Tang et al. 2024, normalized accuracy ≥ 95 %).
Each claim is ``held``, ``not held`` or ``not run`` (a method missing from the board).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeforge.bench.board import Board, num


@dataclass(frozen=True)
class Check:
    """One claim, whether this board shows it (``None``: not run), and the numbers."""

    claim: str
    held: bool | None
    detail: str


def _avg(board: Board, method: str, normalized: bool = False) -> float | None:
    for row in board.rows:
        if row.method == method:
            return row.norm_avg if normalized else row.avg
    return None


def _beats(board: Board, a: str, b: str, label: str, strict: bool = True) -> Check:
    x, y = _avg(board, a), _avg(board, b)
    if x is None or y is None:
        return Check(label, None, f"{a}: {num(x)}, {b}: {num(y)}")
    held = x > y if strict else x >= y
    return Check(label, held, f"{a} {num(x)} vs {b} {num(y)} (avg)")


def _close(board: Board, method: str, label: str) -> Check:
    x = _avg(board, method, normalized=True)
    if x is None:
        return Check(label, None, f"{method}: not run")
    return Check(label, x >= 95.0, f"{method} {num(x)} % normalized")


def literature_checks(board: Board) -> list[Check]:
    """The claims of the module docstring, in order."""
    return [
        _beats(board, "task_arithmetic", "linear", "task arithmetic > simple averaging"),
        _beats(board, "ties", "task_arithmetic", "TIES ≥ task arithmetic", strict=False),
        _beats(board, "adamerging", "ties", "layer-wise AdaMerging > TIES"),
        _close(board, "wemoe", "WEMoE ≥ 95 % of the individual models"),
        _close(board, "smile", "SMILE ≥ 95 % of the individual models"),
    ]


def verdict(check: Check) -> str:
    """``held`` / ``NOT held`` / ``not run``."""
    return {True: "held", False: "NOT held", None: "not run"}[check.held]

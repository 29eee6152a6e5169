"""The leaderboard's literature-ordering checks, on the committed text-minilm results."""

from __future__ import annotations

import json
from pathlib import Path

from mergeforge.bench.board import build_board
from mergeforge.bench.literature import literature_checks, verdict
from mergeforge.bench.report import write_leaderboard

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _results() -> dict:
    path = sorted(RESULTS.glob("bench-text-minilm-*/results.json"))[-1]
    return json.loads(path.read_text())


def test_checks_on_the_embedded_pool_results(tmp_path: Path) -> None:
    board = build_board(_results())
    checks = {c.claim: c for c in literature_checks(board)}
    assert checks["task arithmetic > simple averaging"].held is True
    assert checks["TIES ≥ task arithmetic"].held is True
    assert checks["layer-wise AdaMerging > TIES"].held is False
    assert "adamerging 42.9 vs ties 58.6" in checks["layer-wise AdaMerging > TIES"].detail
    assert checks["SMILE ≥ 95 % of the individual models"].held is False
    text = write_leaderboard(_results(), tmp_path / "leaderboard.md")
    assert "| layer-wise AdaMerging \\> TIES | NOT held |" in text


def test_missing_methods_are_not_run() -> None:
    results = _results()
    results["records"] = [r for r in results["records"] if r["method"] != "wemoe"]
    checks = {c.claim: c for c in literature_checks(build_board(results))}
    assert verdict(checks["WEMoE ≥ 95 % of the individual models"]) == "not run"

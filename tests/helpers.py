"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest


def write_recipe(path: Path, text: str) -> Path:
    """Write YAML ``text`` to ``path`` and return it."""
    path.write_text(text)
    return path


def run_cli(*args: object) -> int:
    """Run the CLI in-process and return its exit code."""
    from mergeforge.cli import main

    return main([str(a) for a in args])


def mergekit_missing(why: str) -> NoReturn:
    """mergekit 0.1.5 is not installed: skip on a developer machine, fail under `make test` (CI
    sets MERGEFORGE_REQUIRE_PARITY=1), so parity is never silently left out."""
    if os.environ.get("MERGEFORGE_REQUIRE_PARITY") == "1":
        pytest.fail(why)
    pytest.skip(why)


REPO = Path(__file__).resolve().parents[1]


def mergekit_python() -> Path | None:
    """The interpreter of a mergekit 0.1.5 venv: ``$MERGEKIT_PYTHON``, ``.venv-mergekit`` (made by
    `make mergekit-venv`), or a scratch venv at /tmp/venvs/mk; ``None`` when there is none."""
    configured = os.environ.get("MERGEKIT_PYTHON", str(REPO / ".venv-mergekit" / "bin" / "python"))
    for candidate in (configured, "/tmp/venvs/mk/bin/python"):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def fusionbench_missing(why: str) -> NoReturn:
    """FusionBench 0.2.33 is not installed: skip on a developer machine, fail when
    MERGEFORGE_REQUIRE_PARITY=1 (as ``mergekit_missing``)."""
    if os.environ.get("MERGEFORGE_REQUIRE_PARITY") == "1":
        pytest.fail(why)
    pytest.skip(why)


def fusionbench_python() -> Path | None:
    """The interpreter of a FusionBench 0.2.33 venv: ``$FUSIONBENCH_PYTHON``,
    ``.venv-fusionbench``, or a scratch venv at /tmp/venvs/fb; ``None`` when there is none."""
    configured = os.environ.get(
        "FUSIONBENCH_PYTHON", str(REPO / ".venv-fusionbench" / "bin" / "python")
    )
    for candidate in (configured, "/tmp/venvs/fb/bin/python"):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def run_fusionbench(worker: str, cases: object, tmp: Path) -> object:
    """``run_reference`` in FusionBench 0.2.33's interpreter with one math thread; skips or fails
    (``fusionbench_missing``) when FusionBench is not installed."""
    python = fusionbench_python()
    if python is None:
        fusionbench_missing("FusionBench 0.2.33 is not installed (set FUSIONBENCH_PYTHON)")
    return run_reference(python, worker, cases, tmp, threads=1)


def require_mergekit_python() -> Path:
    """mergekit 0.1.5's interpreter, or skip / fail as ``mergekit_missing`` does."""
    python = mergekit_python()
    if python is None:
        mergekit_missing(
            "mergekit 0.1.5 not found: set MERGEKIT_PYTHON to its interpreter, or run "
            "`make mergekit-venv`"
        )
    return python


def run_reference(
    python: Path, worker: str, cases: object, tmp: Path, threads: int | None = None
) -> object:
    """Run ``worker`` (Python source: reads the pickled ``cases`` from ``sys.argv[1]``, saves its
    results to ``sys.argv[2]``) in a reference tool's interpreter, in ``tmp``, and return the
    results; ``threads`` pins its math threads (bitwise-stable reference numbers)."""
    import subprocess

    import torch

    torch.save(cases, tmp / "cases.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [str(python), "-c", worker, str(tmp / "cases.pt"), str(tmp / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
        env=env,
    )
    assert proc.returncode == 0, f"reference worker failed:\n{proc.stderr[-3000:]}"
    return torch.load(tmp / "out.pt")

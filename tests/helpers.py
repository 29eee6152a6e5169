"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def write_recipe(path: Path, text: str) -> Path:
    """Write YAML ``text`` to ``path`` and return it."""
    path.write_text(text)
    return path


def run_cli(*args: object) -> int:
    """Run the CLI in-process and return its exit code."""
    from mergeforge.cli import main

    return main([str(a) for a in args])

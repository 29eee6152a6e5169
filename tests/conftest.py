"""Shared fixtures: tiny model families built once per session, recipe writing, CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory):
    """(base, [ft0, ft1, ft2]) of a tiny untied Llama."""
    from models import make_family

    return make_family("llama", tmp_path_factory.mktemp("llama"), 3, seed=1)


def write_recipe(path: Path, text: str) -> Path:
    """Write YAML ``text`` to ``path`` and return it."""
    path.write_text(text)
    return path


def run_cli(*args: str) -> int:
    """Run the CLI in-process and return its exit code."""
    from mergeforge.cli import main

    return main([str(a) for a in args])

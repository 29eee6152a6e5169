"""Shared fixtures: tiny model families built once per session; offline mode for every test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory):
    """(base, [ft0, ft1, ft2]) of a tiny untied Llama."""
    from models import make_family

    return make_family("llama", tmp_path_factory.mktemp("llama"), 3, seed=1)

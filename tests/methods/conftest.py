"""Fixtures for the method tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import method_calls` from the test modules

from method_calls import call_method


@pytest.fixture
def call():
    """``call(name, tensors, base, seed=..., **params)``: see ``method_calls.call_method``."""
    return call_method

"""Session fixtures for the mergekit parity tests: families, rendered recipes, both tools' outputs."""

from __future__ import annotations

from pathlib import Path
from string import Template

import pytest

from helpers import mergekit_missing
from models import make_family
from parity.parity_harness import (
    ALL_KINDS,
    N_FINETUNES,
    PARITY_KINDS,
    RECIPES,
    RECIPES_DIR,
    SEED,
    Family,
    MergeforgeRunner,
    MergekitRunner,
)


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    """One base + N_FINETUNES fine-tunes per model kind, built once per session."""
    root = tmp_path_factory.mktemp("families")
    result = {}
    for i, kind in enumerate(ALL_KINDS):
        base, fts = make_family(kind, root / kind, N_FINETUNES, seed=100 + i)
        result[kind] = Family(kind, base, tuple(fts))
    return result


@pytest.fixture(scope="session")
def recipe_files(
    families: dict[str, Family], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """Every recipe template rendered for every kind: (kind, recipe) -> YAML path."""
    root = tmp_path_factory.mktemp("recipes")
    rendered = {}
    for kind, fam in families.items():
        paths = {"base": str(fam.base)} | {f"ft{i}": str(p) for i, p in enumerate(fam.finetunes)}
        for name in RECIPES:
            text = Template((RECIPES_DIR / f"{name}.yml").read_text()).substitute(paths)
            path = root / f"{kind}-{name}.yml"
            path.write_text(text)
            rendered[(kind, name)] = path
    return rendered


@pytest.fixture(scope="session")
def mergekit_outputs(
    recipe_files: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path | str]:
    """mergekit's output directory (or its error text) for every parity (kind, recipe)."""
    runner = MergekitRunner.locate()
    if runner is None:
        why = (
            "mergekit 0.1.5 not found: set MERGEKIT_YAML, or run `make mergekit-venv` (it installs "
            "mergekit==0.1.5 beside the CPU torch pin in .venv-mergekit)"
        )
        mergekit_missing(why)
    root = tmp_path_factory.mktemp("mergekit")
    cases = [(k, r) for k in PARITY_KINDS for r in RECIPES]
    jobs = [(recipe_files[c], root / f"{c[0]}-{c[1]}") for c in cases]
    results = runner.run(jobs, SEED, root)
    outputs: dict[tuple[str, str], Path | str] = {}
    for case, (_, out) in zip(cases, jobs, strict=True):
        error = results[out]
        outputs[case] = out if error is None else error
    return outputs


@pytest.fixture(scope="session")
def mergeforge(tmp_path_factory: pytest.TempPathFactory) -> MergeforgeRunner:
    return MergeforgeRunner(tmp_path_factory.mktemp("mergeforge"))

"""Parity harness: constants, and runners for mergekit 0.1.5 and the mergeforge CLI.

mergekit is located through ``$MERGEKIT_YAML`` (or ``$MERGEKIT_PYTHON``), then
``<repo>/.venv-mergekit/bin/mergekit-yaml``, then ``/tmp/venvs/mk/bin/mergekit-yaml``; the tests
skip when none exists. When the ``python`` next
to that script can import mergekit, all mergekit merges run in *one* process through
``mergekit.merge.run_merge`` (what ``mergekit-yaml`` itself calls), which saves ~5 s of imports per
recipe; otherwise each recipe is one ``mergekit-yaml`` call. mergeforge runs as
``python -m mergeforge.cli merge RECIPE OUT --seed N`` with ``<repo>/src`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from models import ModelKind

REPO = Path(__file__).resolve().parents[2]

RECIPES_DIR = Path(__file__).parent / "recipes"
RECIPES: tuple[str, ...] = tuple(sorted(p.stem for p in RECIPES_DIR.glob("*.yml")))
STOCHASTIC: tuple[str, ...] = tuple(r for r in RECIPES if r.startswith("dare"))
DETERMINISTIC: tuple[str, ...] = tuple(r for r in RECIPES if r not in STOCHASTIC)
# Kinds mergekit 0.1.5 can merge. BertModel ("bert") crashes its planner (plan.py concatenates a
# list with the tuple of aliases of the optional embeddings.position_ids), so it is mergeforge-only.
PARITY_KINDS: tuple[ModelKind, ...] = ("llama", "llama_tied", "gpt2", "bert_seqcls")
ALL_KINDS: tuple[ModelKind, ...] = (*PARITY_KINDS, "bert")
N_FINETUNES = 3
SEED = 1234
TIMEOUT_S = 300
_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

# Runs JOBS.json ([{config, out, seed}]) through mergekit's own entry point, one process for all.
_MERGEKIT_DRIVER = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for job in json.load(open(sys.argv[1])):
    try:
        source = open(job["config"], encoding="utf-8").read()
        config = MergeConfiguration.model_validate(yaml.safe_load(source))
        options = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=job["seed"])
        run_merge(config, job["out"], options=options, config_source=source)
        print(json.dumps({"out": job["out"], "error": None}), flush=True)
    except Exception as exc:
        print(json.dumps({"out": job["out"], "error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""


def find_mergekit_yaml() -> Path | None:
    """The first existing ``mergekit-yaml`` among $MERGEKIT_YAML, the one beside
    $MERGEKIT_PYTHON, the repo's .venv-mergekit, and /tmp/venvs/mk."""
    beside_python = os.environ.get("MERGEKIT_PYTHON")
    candidates = [
        os.environ.get("MERGEKIT_YAML"),
        str(Path(beside_python).parent / "mergekit-yaml") if beside_python else None,
        str(REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"),
        "/tmp/venvs/mk/bin/mergekit-yaml",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass
class MergekitRunner:
    """Runs recipes through mergekit 0.1.5, batched in one process when possible."""

    script: Path
    python: Path | None

    @classmethod
    def locate(cls) -> MergekitRunner | None:
        script = find_mergekit_yaml()
        if script is None:
            return None
        python = script.parent / "python"
        probe = [str(python), "-c", "import mergekit.merge"]
        ok = python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0
        return cls(script, python if ok else None)

    def run(
        self, jobs: list[tuple[Path, Path]], seed: int, scratch: Path
    ) -> dict[Path, str | None]:
        """Merge each (recipe, out_dir); return out_dir -> None on success or the error text."""
        if self.python is not None:
            return self._run_batched(jobs, seed, scratch)
        results: dict[Path, str | None] = {}
        for recipe, out in jobs:
            cmd = [str(self.script), str(recipe), str(out), "--no-copy-tokenizer", "--quiet"]
            proc = subprocess.run(
                [*cmd, "--random-seed", str(seed)],
                capture_output=True,
                text=True,
                env=_ENV,
                timeout=TIMEOUT_S,
            )
            results[out] = None if proc.returncode == 0 else proc.stderr[-2000:]
        return results

    def _run_batched(
        self, jobs: list[tuple[Path, Path]], seed: int, scratch: Path
    ) -> dict[Path, str | None]:
        job_file = scratch / "mergekit_jobs.json"
        payload = [{"config": str(r), "out": str(o), "seed": seed} for r, o in jobs]
        job_file.write_text(json.dumps(payload))
        proc = subprocess.run(
            [str(self.python), "-c", _MERGEKIT_DRIVER, str(job_file)],
            capture_output=True,
            text=True,
            env=_ENV,
            timeout=TIMEOUT_S,
        )
        results: dict[Path, str | None] = {
            out: f"not run: {proc.stderr[-2000:]}" for _, out in jobs
        }
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                results[Path(record["out"])] = record["error"]
        return results


@dataclass
class MergeforgeRunner:
    """Runs ``python -m mergeforge.cli merge``; caches results so each case runs once."""

    root: Path
    _cache: dict[tuple[str, ...], Path | str] = field(default_factory=dict)

    def run(self, recipe: Path, tag: str, *, seed: int = SEED) -> Path:
        """Merge ``recipe`` into ``root/tag`` (once per tag); fail the test if the CLI fails."""
        key = (str(recipe), tag, str(seed))
        if key not in self._cache:
            out = self.root / tag
            pythonpath = os.pathsep.join(
                p for p in (os.environ.get("PYTHONPATH"), str(REPO / "src")) if p
            )
            cmd = [sys.executable, "-m", "mergeforge.cli", "merge", str(recipe), str(out)]
            proc = subprocess.run(
                [*cmd, "--seed", str(seed)],
                capture_output=True,
                text=True,
                env={**_ENV, "PYTHONPATH": pythonpath},
                timeout=TIMEOUT_S,
            )
            ok = proc.returncode == 0 and out.is_dir()
            self._cache[key] = out if ok else f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
        result = self._cache[key]
        if isinstance(result, str):
            pytest.fail(f"mergeforge merge {recipe.name} -> {tag} failed: {result}")
        return result


@dataclass(frozen=True)
class Family:
    kind: ModelKind
    base: Path
    finetunes: tuple[Path, ...]

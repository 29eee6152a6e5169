"""``run_info()``: where and with what a benchmark ran, recorded in every results JSON.

It answers "can I compare this number with that one?": the git commit (and whether the tree had
uncommitted changes), the UTC time, the versions of Python, torch, mergeforge and of mergekit
(taken from mergekit's own virtual environment, which is separate), and the hardware (CPU model,
cores, RAM) and OS. Nothing here raises: an unknown value is ``None``.

Also :func:`find_mergekit_yaml`, the one place benchmarks look for mergekit 0.1.5's CLI:
``$MERGEKIT_YAML``, then ``<repo>/.venv-mergekit/bin/mergekit-yaml``, then
``/tmp/venvs/mk/bin/mergekit-yaml``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the checkout being benchmarked

from mergeforge.bench import runinfo as bench_runinfo  # noqa: E402  (git state, CPU, cores, RAM)

_PROBE = (
    "import importlib.metadata as m, json\n"
    "def v(p):\n"
    "    try:\n"
    "        return m.version(p)\n"
    "    except m.PackageNotFoundError:\n"
    "        return None\n"
    "print(json.dumps({'mergekit': v('mergekit'), 'torch': v('torch')}))\n"
)


def find_mergekit_yaml() -> Path | None:
    """The first existing ``mergekit-yaml`` among $MERGEKIT_YAML, the repo venv, /tmp/venvs/mk."""
    candidates = [
        os.environ.get("MERGEKIT_YAML"),
        str(REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"),
        "/tmp/venvs/mk/bin/mergekit-yaml",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def mergekit_versions(mergekit_yaml: Path | None) -> dict[str, str | None]:
    """``{"mergekit": ..., "torch": ...}`` as installed next to ``mergekit_yaml`` (its venv)."""
    empty: dict[str, str | None] = {"mergekit": None, "torch": None}
    if mergekit_yaml is None:
        return empty
    python = mergekit_yaml.parent / "python"
    try:
        out = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
        )
        return {**empty, **json.loads(out.stdout.strip().splitlines()[-1])}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return empty


def _mergeforge_version() -> str | None:
    """The version of the mergeforge being benchmarked (the source tree, when it is on sys.path)."""
    try:
        import mergeforge
    except ImportError:
        return bench_runinfo.package_version("mergeforge")
    return mergeforge.__version__


def hardware() -> dict[str, object]:
    """``mergeforge.bench.runinfo.hardware()`` plus physical cores and available RAM."""
    import psutil

    return {
        **bench_runinfo.hardware(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_available_bytes": psutil.virtual_memory().available,
    }


def run_info(mergekit_yaml: Path | None = None) -> dict[str, object]:
    """Git state, UTC time, package versions, hardware and OS of this run (JSON-ready).

    ``mergekit_yaml`` defaults to :func:`find_mergekit_yaml`; mergekit's version (and the torch
    of its venv) is read by running that venv's python. Versions are ``None`` when absent.
    """
    mk = mergekit_versions(mergekit_yaml or find_mergekit_yaml())
    return {
        "utc_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": bench_runinfo.git_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": bench_runinfo.package_version("torch"),
            "transformers": bench_runinfo.package_version("transformers"),
            "safetensors": bench_runinfo.package_version("safetensors"),
            "mergeforge": _mergeforge_version(),
            "mergekit": mk["mergekit"],
            "mergekit_torch": mk["torch"],
        },
        "hardware": hardware(),
        "os": platform.platform(),
        "python_executable": sys.executable,
    }


if __name__ == "__main__":
    print(json.dumps(run_info(), indent=2))

"""Where and with what a benchmark ran (``run_info`` of ``results.json``).

The logic of ``benchmarks/_runinfo.py`` (git state, versions, hardware), without mergekit's venv
probe: the git commit and dirty flag of the checkout mergeforge is imported from (``None`` when
installed from a wheel), the UTC time, package versions, CPU model, cores, RAM and OS. Nothing here
raises: an unknown value is ``None``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "numpy", "psutil", "tqdm",
            "dask", "distributed", "ray")  # fmt: skip


def _checkout() -> Path | None:
    """The git checkout holding this source file (``src/mergeforge/bench/`` → the repo root)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / ".git").exists() else None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, object]:
    """``sha`` of HEAD and ``dirty`` (uncommitted changes); both ``None`` outside a checkout."""
    root = _checkout()
    if root is None:
        return {"sha": None, "dirty": None}
    status = _git(root, "status", "--porcelain")
    return {
        "sha": _git(root, "rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
    }


def package_version(name: str) -> str | None:
    """The installed distribution's version, ``None`` when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware() -> dict[str, object]:
    """CPU model, logical and usable cores, total RAM in bytes (``None`` without psutil)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        ram: int | None = int(psutil.virtual_memory().total)
    except ImportError:
        ram = None
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_total_bytes": ram,
    }


def run_info(*, seed: int, pool_fingerprint: str) -> dict[str, object]:
    """Git state, time, versions, hardware and OS of this run, with its seed and pool (JSON)."""
    from mergeforge import __version__

    return {
        "utc_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
        "versions": {
            "python": platform.python_version(),
            "mergeforge": __version__,
            **{p: package_version(p) for p in PACKAGES},
        },
        "hardware": hardware(),
        "os": platform.platform(),
        "python_executable": sys.executable,
        "seed": seed,
        "pool_fingerprint": pool_fingerprint,
    }

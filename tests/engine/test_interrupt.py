"""A merge stopped mid-write (SIGINT, SIGTERM, SIGKILL) leaves no output directory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slow_recipe(tmp_path_factory) -> Path:
    """Three single-file checkpoints big enough that a merge takes a few seconds."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(24)}
    save_file(base, d / "base.safetensors")
    for j in range(2):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ft, d / f"ft{j}.safetensors")
    recipe = d / "r.yaml"
    recipe.write_text(
        f"merge_method: dare_ties\nbase_model: {d / 'base.safetensors'}\nmodels:\n"
        + "".join(
            f"  - model: {d / f'ft{j}.safetensors'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            for j in range(2)
        )
    )
    return recipe


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "mergeforge", "merge", str(recipe), str(out), "--quiet"]
    cmd += ["--memory-budget", "100MB", "--threads", "1"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(parent: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = [p for p in parent.iterdir() if "mergeforge-tmp" in p.name]
        if temps and any(temps[0].glob("*.safetensors")):
            return temps[0]
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    raise AssertionError("the merge never started writing")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_mid_write_leaves_nothing(slow_recipe, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(slow_recipe, out)
    _wait_for_temp(tmp_path, proc)
    proc.send_signal(sig)
    out_text, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, (out_text, err)
    assert "Traceback" not in err and "interrupted" in err.lower()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "mergeforge-tmp" in p.name]


@pytest.mark.slow
def test_sigkill_leaves_no_output_and_next_run_cleans_up(slow_recipe, tmp_path):
    out = tmp_path / "out"
    proc = _start(slow_recipe, out)
    temp = _wait_for_temp(tmp_path, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert not out.exists() and temp.exists()
    proc = _start(slow_recipe, out)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert out.is_dir() and not temp.exists()

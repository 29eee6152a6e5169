"""The merge-speed benchmark at tiny scale, its process measurement and its output comparison.

The benchmark itself is never timed here: the smoke test only checks that a tiny run completes
and writes a results JSON with every field the issue asks for, with values that hang together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _measure  # noqa: E402
import _synthetic  # noqa: E402
import merge_speed  # noqa: E402

# hidden 128, MLP 352, 2 layers, vocab 4096, untied: embeddings + lm_head, 2 x (q,k,v,o + MLP +
# 2 norms), final norm.
TINY_PARAMS = 2 * 4096 * 128 + 2 * (4 * 128 * 128 + 3 * 128 * 352 + 2 * 128) + 128


@pytest.mark.slow
def test_merge_speed_tiny_writes_complete_results(tmp_path: Path) -> None:
    out, cache = tmp_path / "results", tmp_path / "cache"
    cmd = [sys.executable, str(REPO / "benchmarks" / "merge_speed.py"), "--scale", "tiny",
           "--repeats", "1", "--skip-mergekit", "--out", str(out), "--cache-dir", str(cache)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stamped = [p for p in out.glob("merge_speed-*.json") if p.name != "merge_speed-latest.json"]
    assert len(stamped) == 1
    data = json.loads((out / "merge_speed-latest.json").read_text())
    assert data == json.loads(stamped[0].read_text())
    assert data["ok"] is True

    info = data["run_info"]
    assert set(info["git"]) == {"sha", "dirty"}
    assert {"python", "torch", "mergeforge", "mergekit"} <= set(info["versions"])
    assert info["hardware"]["logical_cores"] >= 1 and info["hardware"]["ram_total_bytes"] > 0
    assert info["utc_time"].endswith("+00:00") and info["os"]

    cfg = data["config"]
    assert cfg["param_count"] == TINY_PARAMS and cfg["model_bytes"] == 4 * TINY_PARAMS
    assert (cfg["k"], cfg["method"], cfg["density"], cfg["repeats"]) == (4, "ties", 0.5, 1)
    assert cfg["page_cache"]["warmed"] is True
    assert cfg["page_cache"]["bytes"] > 5 * cfg["model_bytes"]  # 5 weight files + configs
    assert cfg["largest_tensor"] in ("model.embed_tokens.weight", "lm_head.weight")
    assert cfg["largest_tensor_bytes"] == 4096 * 128 * 4

    runs = data["runs"]
    assert [r["tool"] for r in runs] == ["mergeforge", "io_floor"]
    for r in runs:
        assert r["returncode"] == 0 and r["wall_s"] > 0 and r["samples"] >= 1
        assert r["peak_rss_bytes"] == max(r["peak_rss_sampled_bytes"], r["peak_hwm_bytes"])
        assert 10e6 < r["peak_rss_bytes"] < 8e9

    head = data["headline"]
    floor, ours = data["summary"]["io_floor"], data["summary"]["mergeforge"]
    assert head["ratios"]["time_vs_io_floor"] == pytest.approx(
        ours["median_wall_s"] / floor["median_wall_s"]
    )
    assert head["ratios"]["speedup_vs_mergekit"] is None
    assert head["ratios"]["rss_ratio_vs_mergekit"] is None
    bound = head["memory_bound"]
    assert bound["bound_bytes"] == 7 * cfg["largest_tensor_bytes"] + 500 * 10**6
    assert bound["met"] == (ours["peak_rss_bytes"] <= bound["bound_bytes"])
    assert data["parity"] is None
    assert set(head["targets"]) == {
        "speedup_vs_mergekit >= 2",
        "rss_ratio_vs_mergekit <= 0.5",
        "time_vs_io_floor <= 1.5",
        "peak_rss <= (K+3) x largest + 500 MB",
        "parity max_rel_diff <= 1e-6",
    }
    assert "time vs I/O floor" in proc.stdout


def test_measure_process_sees_the_child_not_the_parent(tmp_path: Path) -> None:
    # The child holds 150 MB of touched bytes; this (torch-importing) process is far larger than
    # the child's baseline, so a measurement polluted by the parent's pre-exec RSS would show it.
    code = "import time; b = b'x' * 150_000_000; time.sleep(0.5)"
    stats = _measure.measure_process([sys.executable, "-c", code], dict(os.environ), tmp_path / "l")
    assert stats.returncode == 0
    assert 150e6 <= stats.peak_hwm_bytes < 150e6 + 80e6
    assert 150e6 <= stats.peak_rss_sampled_bytes <= stats.peak_hwm_bytes
    assert stats.wall_s >= 0.5 and stats.samples >= 5


def _write_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    entries = [(n, tuple(t.shape)) for n, t in tensors.items()]
    _synthetic.write_safetensors(path / "model.safetensors", entries, lambda n, _s: tensors[n])
    return path


def test_compare_outputs_relative_difference_and_mismatches(tmp_path: Path) -> None:
    ref = {"a": torch.tensor([[1.0, -4.0], [2.0, 0.5]]), "b": torch.arange(6.0).reshape(3, 2)}
    theirs = _write_model(tmp_path / "mk", ref)
    same = merge_speed.compare_outputs(_write_model(tmp_path / "same", ref), theirs)
    assert same["ok"] and same["max_rel_diff"] == 0.0 and same["elements_over_tolerance"] == 0
    bumped = {**ref, "a": ref["a"] + torch.tensor([[0.0, 0.0], [0.0, 4e-5]])}
    off = merge_speed.compare_outputs(_write_model(tmp_path / "off", bumped), theirs)
    assert off["max_rel_diff"] == pytest.approx(1e-5, rel=1e-3)  # 4e-5 / max|a| = 4
    assert off["worst_tensor"] == "a" and off["elements_over_tolerance"] == 1 and not off["ok"]
    missing = merge_speed.compare_outputs(_write_model(tmp_path / "miss", {"a": ref["a"]}), theirs)
    assert missing["mismatches"] == ["b: only in mergekit"] and not missing["ok"]


def test_synthetic_tensors_are_seeded_per_name() -> None:
    a = _synthetic.base_tensor("model.layers.0.mlp.up_proj.weight", (8, 4))
    assert torch.equal(a, _synthetic.base_tensor("model.layers.0.mlp.up_proj.weight", (8, 4)))
    assert not torch.equal(a, _synthetic.base_tensor("model.layers.1.mlp.up_proj.weight", (8, 4)))
    assert torch.equal(_synthetic.base_tensor("model.norm.weight", (8,)), torch.ones(8))
    assert _synthetic.build_key("tiny", 4) != _synthetic.build_key("small", 4)

"""MagMax parity with FusionBench 0.2.33's own ``magmax_merge``, run in its interpreter.

FusionBench 0.2.33 ships neither WIDEN nor PCB-Merging (``fusion_bench/method/`` has no such
module), so only MagMax is compared here; WIDEN and PCB are checked against hand-computed cases
in ``test_magmax_widen_pcb.py``.

One subprocess of FusionBench's Python (``$FUSIONBENCH_PYTHON``, else
``<repo>/.venv-fusionbench/bin/python``, else ``/tmp/venvs/fb/bin/python``) builds a module per
case whose parameters are the case's tensors, merges with
``fusion_bench.method.magmax.magmax.magmax_merge`` and saves the merged state dict; every tensor
must match ours within ``1e-5 · max|theirs|``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_fusionbench
from mergeforge.methods.magmax import MAGMAX

pytestmark = pytest.mark.parity

REL_TOL = 1e-5

_WORKER = r"""
import sys
import torch
from torch import nn
from fusion_bench.method.magmax.magmax import magmax_merge

def module(tensors):
    m = nn.Module()
    for name, t in tensors.items():
        m.register_parameter(name, nn.Parameter(t.clone(), requires_grad=False))
    return m

results = []
for case in torch.load(sys.argv[1]):
    merged = magmax_merge(module(case["base"]), [module(sd) for sd in case["models"]],
                          scaling_factor=case["lambda"])
    results.append({k: v.detach().clone() for k, v in merged.state_dict().items()})
torch.save(results, sys.argv[2])
"""


def _cases() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (12, 9), "b": (9,), "s": ()}
    cases = []
    for k, lam in ((1, 1.0), (2, 0.5), (4, 1.0), (3, -0.3)):
        base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        models = [
            {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
            for _ in range(k)
        ]
        cases.append({"base": base, "models": models, "lambda": lam})
    # exact ties in |τ| with both signs: small integers, so later models must win
    base = {"w": torch.zeros(6, 6)}
    models = [{"w": torch.randint(-2, 3, (6, 6), generator=g).float()} for _ in range(4)]
    cases.append({"base": base, "models": models, "lambda": 1.0})
    return cases


def _fusionbench(cases: list[dict], tmp_path: Path) -> list[dict]:
    return run_fusionbench(_WORKER, cases, tmp_path)


def test_magmax_matches_fusionbench(tmp_path: Path):
    cases = _cases()
    theirs = _fusionbench(cases, tmp_path)
    assert len(theirs) == len(cases)
    for case, merged in zip(cases, theirs, strict=True):
        assert set(merged) == set(case["base"])
        for name, want in merged.items():
            xs = [sd[name] for sd in case["models"]]
            got = MAGMAX.fn(xs, case["base"][name], **{"lambda": case["lambda"]})
            scale = max(float(want.abs().max()), 1e-12)
            err = float((got - want).abs().max())
            assert err <= REL_TOL * scale, f"{name} (K={len(xs)}): max error {err:g}"

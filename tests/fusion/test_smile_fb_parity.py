"""SMILE parity with FusionBench 0.2.33's ``SmileMoELinear`` (and its ``SmileGate``), run in its
interpreter.

One subprocess of FusionBench's Python builds, per case, ``fusion_bench.models.smile_moe.
linear_from_module.SmileMoELinear`` from the same pretrained and fine-tuned ``nn.Linear`` weights
and runs it on the case's inputs; our ``SmileLinear`` (``smile.upscale_linear``) must give the
same outputs within ``1e-5 · max|theirs|`` (the SVDs differ in shape, FusionBench computing full
matrices, and singular vectors may flip sign, which neither the experts nor the router's norms see).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import run_fusionbench
from mergeforge.fusion.smile import SmileConfig, upscale_linear

pytestmark = pytest.mark.parity

REL_TOL = 1e-5

_WORKER = r"""
import sys
import torch
from torch import nn
from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

def linear(w, b):
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m

results = []
for c in torch.load(sys.argv[1]):
    moe = SmileMoELinear(
        linear(c["w0"], c["b0"]), [linear(w, b) for w, b in zip(c["ws"], c["bs"])],
        gate_k=c["gate_k"], k=c["k"], top_k=c["top_k"], routing_use_diff=c["diff"],
    )
    with torch.no_grad():
        results.append(moe(c["x"]))
torch.save(results, sys.argv[2])
"""


def _cases() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    cases = []
    settings = (  # (T, out, in, gate_k, k, top_k, routing_use_diff, bias)
        (3, 9, 12, 2, 4, 1, True, True),
        (3, 9, 12, 4, -1, 2, True, True),
        (4, 12, 9, 9, 9, 3, False, True),
        (1, 7, 10, 1, 5, 1, True, True),
        (2, 10, 6, 3, 2, 2, True, False),
    )
    for t, out_f, in_f, gate_k, k, top_k, diff, bias in settings:
        w0 = torch.randn(out_f, in_f, generator=g)
        b0 = torch.randn(out_f, generator=g) if bias else None
        cases.append(
            {
                "w0": w0,
                "b0": b0,
                "ws": [w0 + 0.3 * torch.randn(out_f, in_f, generator=g) for _ in range(t)],
                "bs": [
                    b0 + 0.1 * torch.randn(out_f, generator=g) if bias else None for _ in range(t)
                ],
                "gate_k": gate_k,
                "k": k,
                "top_k": top_k,
                "diff": diff,
                "x": torch.randn(3, 5, in_f, generator=g),
            }
        )
    return cases


def _ours(c: dict) -> torch.Tensor:
    base = nn.Linear(c["w0"].shape[1], c["w0"].shape[0], bias=c["b0"] is not None)
    cfg = SmileConfig(gate_k=c["gate_k"], k=c["k"], top_k=c["top_k"], routing_use_diff=c["diff"])
    biases = None if c["b0"] is None else c["bs"]
    layer = upscale_linear(base, c["w0"], c["b0"], c["ws"], biases, cfg)
    assert layer is not None
    with torch.no_grad():
        return layer(c["x"])


def test_smile_linear_matches_fusionbench(tmp_path: Path) -> None:
    cases = _cases()
    theirs = run_fusionbench(_WORKER, cases, tmp_path)
    assert len(theirs) == len(cases)
    for i, (c, want) in enumerate(zip(cases, theirs, strict=True)):
        got = _ours(c)
        err = float((got - want).abs().max())
        assert err <= REL_TOL * float(want.abs().max()), f"case {i}: max error {err:g}"

"""TALL masks and consensus merging against FusionBench 0.2.33, run in its own interpreter.

One subprocess of FusionBench's Python (``$FUSIONBENCH_PYTHON``, else
``<repo>/.venv-fusionbench/bin/python``, else ``/tmp/venvs/fb/bin/python``), per case:

* the TALL masks from ``fusion_bench.method.tall_mask.utils.generate_task_masks`` on the flattened
  model (one call per task with its own λ_t); they must equal ours bit for bit;
* the consensus mask from FusionBench's ``construct_consensus_mask``, fed those masks (its own
  ``load_tall_mask`` is replaced: in 0.2.33 it reads masks saved with ``torch.save`` only and
  its ``vector_to_state_dict`` calls write every task's mask into the same tensors, so each task
  would get the last task's mask); the merge ``θ0 + λ (Σ_t τ_t) ⊙ c`` is the paper's, on
  FusionBench's flattened vectors; every tensor must match ours within 1e-6 · max|theirs|;
* with a zero base, the per-task models rebuilt by FusionBench's
  ``TallMaskTaskArithmeticAlgorithm`` (with θ0 = 0 its mixing of weights and task vectors is
  harmless) must match our ``recover`` within the same tolerance. The models are given as
  modules whose tensors are buffers: with ``nn.Parameter``s, 0.2.33's algorithm raises
  ``TypeError`` (it subtracts the ``state_dict(keep_vars=True)`` Parameters from plain-tensor task
  vectors, which its ``state_dict_diff_abs`` key check rejects).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_fusionbench
from mergeforge.methods.consensus import CONSENSUS, TALL_MASKS, recover, unpack_bits

pytestmark = pytest.mark.parity

REL_TOL = 1e-6

_WORKER = r"""
import sys
import torch
from torch import nn
from fusion_bench.method.tall_mask import utils as U
from fusion_bench.method.tall_mask import TallMaskTaskArithmeticAlgorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils import state_dict_to_vector, vector_to_state_dict

def to_sd(vec, ref):
    fresh = {k: t.clone() for k, t in ref.items()}  # vector_to_state_dict writes into ref
    return {k: v.clone() for k, v in vector_to_state_dict(vec, fresh).items()}

def module(sd):  # buffers: with parameters the algorithm raises (see the module docstring)
    m = nn.Module()
    for name, t in sd.items():
        m.register_buffer(name, t.clone())
    return m

def run_case(case):
    base = case["base"]
    ptm = state_dict_to_vector(base)
    fts = torch.stack([state_dict_to_vector(m) for m in case["models"]])
    tvs = fts - ptm
    masks = [U.generate_task_masks(tvs, fts[t], ptm, tall_mask_lambda=lam)
             for t, lam in enumerate(case["tall_lambda"])]
    per_task = {f"t{i}": to_sd(m, base) for i, m in enumerate(masks)}
    U.load_tall_mask = lambda remove_keys, ptm_check, config: per_task
    cons = U.construct_consensus_mask(base, case["k"], None)
    merged = ptm + case["lambda"] * (tvs.sum(0) * cons)
    out = {"masks": [per_task[f"t{i}"] for i in range(len(masks))],
           "consensus": to_sd(merged, base), "retrieved": None}
    if all(bool((t == 0).all()) for t in base.values()) and len(set(case["tall_lambda"])) == 1:
        pool = {"_pretrained_": module(base)}
        pool.update({f"t{i}": module(m) for i, m in enumerate(case["models"])})
        algo = TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=case["tall_lambda"][0])
        models = algo.run(BaseModelPool(models=pool))["models"]
        out["retrieved"] = [{k: v.detach().clone() for k, v in models[f"t{i}"].state_dict().items()}
                            for i in range(len(case["models"]))]
    return out

torch.save([run_case(c) for c in torch.load(sys.argv[1])], sys.argv[2])
"""


def _cases() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (12, 9), "b": (9,), "s": ()}
    cases = []
    setups = (
        (1, (0.6,), 1, 1.0, False),
        (2, (0.6, 0.6), 2, 0.5, False),
        (3, (0.2, 0.4, 0.6), 2, 1.0, False),
        (4, (0.5, 0.5, 0.5, 0.5), 1, 0.3, False),
        (4, (0.6, 0.3, 0.6, 0.3), 3, 1.0, False),
        (3, (0.0, 0.6, 1.5), 0, 0.7, False),
        (3, (0.6, 0.6, 0.6), 2, 1.0, True),
        (2, (0.4, 0.4), 2, 1.0, True),
    )
    for k_models, lams, k, lam, zero_base in setups:
        base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        if zero_base:
            base = {n: torch.zeros_like(t) for n, t in base.items()}
        models = [
            {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
            for _ in range(k_models)
        ]
        cases.append({"base": base, "models": models, "tall_lambda": lams, "k": k, "lambda": lam})
    return cases


def _fusionbench(cases: list[dict], tmp_path: Path) -> list[dict]:
    return run_fusionbench(_WORKER, cases, tmp_path)


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    scale = max(float(theirs.abs().max()), 1e-12)
    assert float((ours - theirs.float()).abs().max()) <= REL_TOL * scale, what


def test_masks_and_consensus_match_fusionbench(tmp_path: Path) -> None:
    cases = _cases()
    results = _fusionbench(cases, tmp_path)
    retrieved_cases = 0
    for c, (case, theirs) in enumerate(zip(cases, results, strict=True)):
        lam, k = case["lambda"], case["k"]
        for name, base in case["base"].items():
            xs = [m[name] for m in case["models"]]
            params = {"tall_lambda": case["tall_lambda"], "k": k, "save_masks": True}
            merged, arts = CONSENSUS.fn(xs, base, artifacts=True, **params, **{"lambda": lam})
            masks = unpack_bits(arts["masks"], base.numel())  # (K, numel)
            for i, fb_mask in enumerate(theirs["masks"]):
                assert torch.equal(masks[i], fb_mask[name].reshape(-1).bool()), (c, name, i)
            _close(merged, theirs["consensus"][name], f"case {c} tensor {name}: consensus")
            if theirs["retrieved"] is None:
                continue
            tall = {"tall_lambda": case["tall_lambda"], "save_masks": True}
            _, tall_arts = TALL_MASKS.fn(xs, base, artifacts=True, **tall)
            for i, model in enumerate(theirs["retrieved"]):
                rec = recover(tall_arts, base, i, tall)
                _close(rec, model[name], f"case {c} tensor {name}: model {i} rebuilt")
        retrieved_cases += theirs["retrieved"] is not None
    assert retrieved_cases == 2

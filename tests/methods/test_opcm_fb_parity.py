"""Parity of OPCM with FusionBench 0.2.33's own ``OPCM`` class, run in its interpreter.

One subprocess of FusionBench's Python (``$FUSIONBENCH_PYTHON``, else
``<repo>/.venv-fusionbench/bin/python``, else ``/tmp/venvs/fb/bin/python``) loads small state
dicts into a plain ``nn.Module`` (embedding, square / tall / wide ``nn.Linear`` with and without
bias, a LayerNorm, a head) and runs ``fusion_bench.method.opcm.opcm_general.OPCM.run`` on a
``BaseModelPool`` of them, ``shuffle_order=False``, once per prefix of the model list (its merge
after t models). We run ``merge_continual`` on the same state dicts saved as checkpoints with
``save_steps`` and compare every step's tensors: ``max|ours − theirs| ≤ 1e-5 · max|theirs|``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from helpers import fusionbench_missing, fusionbench_python, run_reference, write_recipe
from models import load_state

pytestmark = pytest.mark.parity

REL_TOL = 1e-5
MODELS = 4
ALPHAS = (0.5, 0.8)
H, F, V = 12, 20, 16

_WORKER = r"""
import sys
import torch
from torch import nn
from fusion_bench import BaseModelPool
from fusion_bench.method.opcm.opcm_general import OPCM

H, F, V = 12, 20, 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(H, H)
        self.up_proj = nn.Linear(H, F, bias=False)
        self.down_proj = nn.Linear(F, H)
        self.norm = nn.LayerNorm(H)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList([Block()])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(H, V, bias=False)


def module(state):
    net = Net()
    net.load_state_dict(state)
    return net


cases = torch.load(sys.argv[1])
out = {}
for alpha in cases["alphas"]:
    for t in range(1, len(cases["models"]) + 1):
        pool = {"_pretrained_": module(cases["base"])}
        pool.update({f"m{i}": module(sd) for i, sd in enumerate(cases["models"][:t])})
        algo = OPCM(alpha=alpha, shuffle_order=False, seed=None, save_on_every_step=False,
                    evaluate_on_every_step=False)
        merged = algo.run(BaseModelPool(pool))
        out[(alpha, t)] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
torch.save(out, sys.argv[2])
"""

SHAPES = {
    "model.embed_tokens.weight": (V, H),
    "model.layers.0.q_proj.weight": (H, H),
    "model.layers.0.q_proj.bias": (H,),
    "model.layers.0.up_proj.weight": (F, H),
    "model.layers.0.down_proj.weight": (H, F),
    "model.layers.0.down_proj.bias": (H,),
    "model.layers.0.norm.weight": (H,),
    "model.layers.0.norm.bias": (H,),
    "lm_head.weight": (V, H),
}


def _states(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    models = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(MODELS)
    ]
    return base, models


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = fusionbench_python()
    if python is None:
        fusionbench_missing("FusionBench 0.2.33 interpreter not found ($FUSIONBENCH_PYTHON)")
    from mergeforge.engine.continual import merge_continual

    work = tmp_path_factory.mktemp("opcm_fb")
    base, models = _states(torch.Generator().manual_seed(5))
    theirs = run_reference(
        python, _WORKER, {"base": base, "models": models, "alphas": ALPHAS}, work
    )
    base_dir = _save(base, work / "base")
    dirs = [_save(sd, work / f"m{i}") for i, sd in enumerate(models)]
    ours = {}
    for alpha in ALPHAS:
        listing = "".join(f"  - model: {d}\n" for d in dirs)
        recipe = write_recipe(
            work / f"r{alpha}.yml",
            f"merge_method: opcm\nbase_model: {base_dir}\nmodels:\n{listing}"
            f"parameters:\n  alpha: {alpha}\n",
        )
        out = work / f"out{alpha}"
        merge_continual(recipe, out, progress=False, save_steps=True)
        for t in range(1, MODELS + 1):
            ours[(alpha, t)] = load_state(out / "steps" / f"step-{t}")
        assert load_state(out).keys() == ours[(alpha, MODELS)].keys()
        final = load_state(out)
        assert all(torch.equal(final[k], ours[(alpha, MODELS)][k]) for k in final)
    return {"ours": ours, "theirs": theirs}


CASES = [(a, t, k) for a in ALPHAS for t in range(1, MODELS + 1) for k in SHAPES]


@pytest.mark.parametrize(("alpha", "step", "key"), CASES)
def test_matches_fusionbench(runs: dict[str, Any], alpha: float, step: int, key: str) -> None:
    theirs = runs["theirs"][(alpha, step)][key]
    ours = runs["ours"][(alpha, step)][key]
    assert ours.shape == theirs.shape
    err = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    assert err <= REL_TOL * scale, f"alpha {alpha} step {step} {key}: error {err:.3g}"


def test_projection_changes_the_result(runs: dict[str, Any]) -> None:
    # the comparison is not vacuous: the projected step differs from plain addition + rescale
    ours = runs["ours"][(0.5, 2)]["model.layers.0.q_proj.weight"]
    alpha8 = runs["ours"][(0.8, 2)]["model.layers.0.q_proj.weight"]
    assert float((ours - alpha8).abs().max()) > 1e-3

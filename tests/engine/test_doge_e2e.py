"""DOGE end to end: a tiny Llama family merged by `mergeforge merge`, loaded by transformers.

The whole-model mask thresholds cover only the tensors DOGE modifies (2-D weights inside the
blocks, as FusionBench's key filter); every other tensor must come out as the base tensor.
"""

from __future__ import annotations

import pytest
import torch

from helpers import run_cli, write_recipe
from mergeforge.io import arch
from mergeforge.methods.doge import doge, modifies
from mergeforge.methods.spec import Layer
from models import load_state

DENSITY = 0.3
STEPS = 60


@pytest.fixture(autouse=True)
def one_thread():
    """DOGE runs hundreds of tiny matrix ops per tensor; on a busy 2-core machine intra-op
    threads spin against other processes and make them ~100× slower. One thread keeps the test
    fast; the results do not depend on it (we compare our own merges, bit for bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _recipe(base, fts, scope: str = "model") -> str:
    models = "\n".join(f"  - model: {f}" for f in fts)
    return f"""\
merge_method: doge
base_model: {base}
models:
{models}
parameters: {{density: {DENSITY}, steps: {STEPS}, trim_scope: {scope}}}
dtype: float32
"""


def _selected(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in state.items() if modifies(tuple(t.shape), arch.layer_index(n))]


def _thresholds(b, xs, names) -> tuple[float, ...]:
    out = []
    for x in xs:
        a = torch.cat([(x[n] - b[n]).abs().reshape(-1) for n in names])  # (D,)
        out.append(float(a.kthvalue(a.numel() - int(a.numel() * DENSITY)).values))
    return tuple(out)


def _merge(tmp_path, base, fts, scope: str):
    r = write_recipe(tmp_path / f"{scope}.yaml", _recipe(base, fts, scope))
    out = tmp_path / f"out_{scope}"
    assert run_cli("merge", r, out, "--quiet") == 0
    return out


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_doge_merge_matches_the_method_and_loads(llama_family, tmp_path, scope) -> None:
    from transformers import AutoModelForCausalLM

    base, fts = llama_family
    path = _merge(tmp_path, base, fts, scope)
    out, b = load_state(path), load_state(base)
    xs = [load_state(f) for f in fts]
    names = _selected(b)
    assert len(names) == 7 * 4  # q, k, v, o, gate, up, down in each of the 4 blocks
    thresholds = _thresholds(b, xs, names) if scope == "model" else None
    for n in out:
        if n not in names:
            assert torch.equal(out[n], b[n]), n  # embeddings, norms, head: pre-trained
            continue
        want = doge([x[n] for x in xs], b[n], density=(DENSITY,) * 3, steps=STEPS,
                    trim_scope=scope, threshold=thresholds,
                    layer=Layer(arch.layer_index(n), 4))  # fmt: skip
        assert torch.equal(out[n], want), n
        assert not torch.equal(out[n], b[n]), n
    model = AutoModelForCausalLM.from_pretrained(path)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[:2] == (1, 4) and bool(torch.isfinite(logits).all())


def test_model_thresholds_ignore_the_tensors_doge_leaves_alone(llama_family) -> None:
    import yaml

    from mergeforge.config import parse_recipe
    from mergeforge.engine.execute import ExecOptions
    from mergeforge.engine.global_pass import model_thresholds
    from mergeforge.engine.plan import build_plan

    base, fts = llama_family
    plan = build_plan(parse_recipe(yaml.safe_load(_recipe(base, fts))))
    got = model_thresholds(plan, ExecOptions())
    plan.close()
    b, xs = load_state(base), [load_state(f) for f in fts]
    assert got == _thresholds(b, xs, _selected(b))
    assert got != _thresholds(b, xs, list(b))  # over every tensor it would differ

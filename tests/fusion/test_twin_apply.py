"""Twin-Merging's per-sample corrections (``fusion.twin_apply``) against θ(x) materialised per
sample: dense and factored twin vectors of Linear, Embedding and LayerNorm tensors, padded
batches, a hand-computed Linear case, and the fallbacks (unsupported module, input whose first
dimension is not the batch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_problems import tiny_problem
from mergeforge.fusion import twin, twin_apply
from mergeforge.fusion.twin import TwinConfig

TOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).detach().abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max error {err:g}"


def _must_not_fall_back(*args: object) -> None:
    raise AssertionError("the per-sample corrections fell back to materialising θ(x)")


@pytest.mark.parametrize("mask_rate", [0.0, 0.5, 0.9], ids=["dense", "rank-half", "rank-tenth"])
def test_corrections_equal_materialised_weights(
    mask_rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tiny_problem(3, n=6)
    res = twin.run(p, TwinConfig(mask_rate=mask_rate, epochs=2))
    module = res.module
    reference = module.materialised
    monkeypatch.setattr(module, "materialised", _must_not_fall_back)
    kinds = {type(module.body.get_submodule(path)) for path in module.twin_tensors()}
    assert {nn.Linear, nn.Embedding, nn.LayerNorm} <= kinds  # every hook is exercised
    assert "embeddings.position_embeddings.weight" in module.layout  # position_ids are (1, L)
    if mask_rate > 0:
        assert any(r > 0 for r in module.layout.values())  # factored tensors too
    with torch.no_grad():
        for task in p.tasks:
            batch = task.unlabeled[0]  # padded: lengths differ per sample
            w = module.route(batch)
            assert torch.unique(w, dim=0).shape[0] == w.shape[0]  # no two samples share θ(x)
            fast, slow = module(**batch), reference(batch, w)
            _close(fast.last_hidden_state, slow.last_hidden_state)
            _close(fast.pooler_output, slow.pooler_output)


def test_linear_correction_by_hand() -> None:
    """One Linear 2→1, T = 2 factored rank-1 twins and a bias twin, two samples."""
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lin.bias.fill_(0.5)
    a = torch.tensor([[[2.0]], [[-1.0]]])  # (T=2, m=1, r=1)
    b = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])  # (T, r, n=2): v_0 = [2, 0], v_1 = [0, -3]
    bias = torch.tensor([[1.0], [10.0]])  # (T, m)
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])  # (N=2, T)
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])  # (N, 2)
    twins = {"": {"weight": [a, b], "bias": [bias]}}
    with twin_apply.hooked(lin, twins, w):
        y = lin(x)
    # sample 0: W = [3, 2], b = 1.5 → 6.5; sample 1: W = [1.5, -0.25], b = 8.25 → 11.5
    assert torch.allclose(y, torch.tensor([[6.5], [11.5]]))
    assert torch.equal(lin(x), x @ lin.weight.T + lin.bias)  # the hook is gone afterwards


def test_unsupported_module_falls_back_to_materialised() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    body = nn.Sequential(Scale())
    twins = {"0": {"weight": [torch.zeros(2, 3)]}}
    assert not twin_apply.supports(body, twins)
    assert twin_apply.supports(nn.Sequential(nn.Linear(3, 3)), twins)


def test_input_without_the_batch_first_is_refused() -> None:
    lin = nn.Linear(2, 2)
    twins = {"": {"bias": [torch.ones(2, 2)]}}
    w = torch.full((3, 2), 0.5)  # three samples
    with pytest.raises(twin_apply.NotBatchFirst), twin_apply.hooked(lin, twins, w):
        lin(torch.ones(6, 2))  # (N·L, d): rows are not samples
    assert not lin._forward_hooks  # removed after the error


def test_module_uses_the_fallback_when_a_hook_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    p = tiny_problem(2, n=3)
    module = twin.run(p, TwinConfig(mask_rate=0.5, epochs=1)).module
    batch = p.tasks[0].unlabeled[0]
    calls = []

    def refuse(*args: object) -> None:
        calls.append(1)
        raise twin_apply.NotBatchFirst("test")

    with torch.no_grad():
        want = module(**batch).last_hidden_state
        monkeypatch.setattr(twin_apply, "_batch_first", refuse)
        got = module(**batch).last_hidden_state
    assert calls and not any(m._forward_hooks for m in module.body.modules())
    _close(got, want)

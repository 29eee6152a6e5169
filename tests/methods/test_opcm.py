"""OPCM's per-tensor step: hand-computed projections, split rank, which tensors are projected."""

from __future__ import annotations

import pytest
import torch

from mergeforge.errors import MethodError
from mergeforge.methods.opcm import (
    OPCM,
    is_projected,
    opcm,
    project_out,
    rescale_factor,
    split_rank,
)

LINEAR = "model.layers.0.self_attn.q_proj.weight"
NEW = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])


def test_split_rank_is_the_first_index_past_alpha() -> None:
    s = torch.tensor([4.0, 3.0, 1.0])  # cumsum / sum = 0.5, 0.875, 1
    assert split_rank(s, 0.4) == 0
    assert split_rank(s, 0.5) == 1  # strictly greater: 0.5 does not pass 0.5
    assert split_rank(s, 0.6) == 1
    assert split_rank(s, 0.9) == 2
    assert split_rank(torch.zeros(3), 0.5) == 0  # 0/0: nothing passes, argmax of zeros


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        # r = 0: only the diagonal of Uᵀ τ_new V (U = V = I here) is removed
        (0.4, [[0.0, 2.0, 3.0], [4.0, 0.0, 6.0], [7.0, 8.0, 0.0]]),
        # r = 2: the top-left 2×2 block and the diagonal are removed
        (0.9, [[0.0, 0.0, 3.0], [0.0, 0.0, 6.0], [7.0, 8.0, 0.0]]),
    ],
)
def test_projection_on_a_diagonal_running_merge(alpha: float, expected) -> None:
    prev = torch.diag(torch.tensor([4.0, 3.0, 1.0]))
    torch.testing.assert_close(project_out(prev, NEW, alpha), torch.tensor(expected))


def test_projection_with_permuted_singular_vectors() -> None:
    # τ_prev = 4·e1 e2ᵀ + 3·e2 e3ᵀ + 1·e3 e1ᵀ: u = (e1, e2, e3), v = (e2, e3, e1). With α = 0.9
    # (r = 2) the pairs (u_i, v_j), i, j < 2, and (u_3, v_3) go: entries [0,1], [0,2], [1,1],
    # [1,2] and [2,0] of τ_new.
    prev = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 8.0, 9.0]])
    torch.testing.assert_close(project_out(prev, NEW, 0.9), expected)


def test_full_step_with_lambda_and_base() -> None:
    base = torch.ones(3, 3)
    prev = torch.diag(torch.tensor([4.0, 3.0, 1.0]))
    out = opcm([base + NEW], base, merged=base + prev, lambda_prev=2.0, alpha=0.9, name=LINEAR)
    clean = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 6.0], [7.0, 8.0, 0.0]])
    torch.testing.assert_close(out, base + 2.0 * prev + clean)


def test_rectangular_thin_svd_matches_the_full_svd_form() -> None:
    # FusionBench: full U (m×m), V (n×n), P = Uᵀ τ V, zero diag and [:r, :r], U P Vᵀ
    gen = torch.Generator().manual_seed(0)
    for shape in ((7, 4), (4, 7)):
        prev = torch.randn(shape, generator=gen, dtype=torch.float64)
        new = torch.randn(shape, generator=gen, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(prev, full_matrices=True)
        p = u.T @ new @ vh.T
        p.diagonal().fill_(0)
        r = split_rank(s, 0.5)
        p[:r, :r] = 0
        torch.testing.assert_close(project_out(prev, new, 0.5), u @ p @ vh)


def test_rank_deficient_running_merge_only_removes_its_own_directions() -> None:
    prev = torch.diag(torch.tensor([2.0, 0.0]))  # s = (2, 0): r = 0, numerical rank 1
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(project_out(prev, new, 0.5), torch.tensor([[0.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(project_out(torch.zeros(2, 2), new, 0.5), new)  # nothing to avoid


def test_orthogonal_task_vector_passes_unchanged() -> None:
    # τ_new's row and column spaces are orthogonal to τ_prev's: the projection keeps all of it
    prev = torch.zeros(4, 4)
    prev[0, 0] = 3.0
    new = torch.zeros(4, 4)
    new[1, 2], new[3, 1] = 2.0, -1.0
    assert torch.equal(project_out(prev, new, 0.5), new)
    out = opcm([new], torch.zeros(4, 4), merged=prev, lambda_prev=1.0, name=LINEAR)
    torch.testing.assert_close(out, prev + new)


def test_projected_task_vector_is_orthogonal_to_the_top_directions() -> None:
    gen = torch.Generator().manual_seed(1)
    prev, new = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    clean = project_out(prev, new, 0.7)
    u, s, vh = torch.linalg.svd(prev, full_matrices=False)
    r = split_rank(s, 0.7)
    block = u.T @ clean @ vh.T  # (5, 5)
    assert r >= 1
    assert float(block[:r, :r].abs().max()) < 1e-5
    assert float(block.diagonal().abs().max()) < 1e-5
    assert float((clean - new).abs().max()) > 0.1


@pytest.mark.parametrize(
    "name",
    ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.bias"],
)
def test_other_tensors_are_added(name: str) -> None:
    shape = (3, 3) if "embed" in name else (3,)
    gen = torch.Generator().manual_seed(2)
    base, prev, new = (torch.randn(shape, generator=gen) for _ in range(3))
    out = opcm([base + new], base, merged=base + prev, lambda_prev=1.5, name=name)
    torch.testing.assert_close(out, base + 1.5 * prev + new)


def test_svd_false_adds_a_linear_weight() -> None:
    base, prev = torch.zeros(3, 3), torch.diag(torch.tensor([4.0, 3.0, 1.0]))
    out = opcm([NEW], base, merged=prev, name=LINEAR, svd=False)
    torch.testing.assert_close(out, prev + NEW)


def test_is_projected() -> None:
    assert is_projected(LINEAR, (4, 4))
    assert is_projected("lm_head.weight", (8, 4))
    assert is_projected("model.layers.0.mlp.down_proj.weight", (4, 8))
    for emb in ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight",
                "bert.embeddings.word_embeddings.weight", "shared.weight",
                "vision_model.embeddings.position_embedding.weight"):  # fmt: skip
        assert not is_projected(emb, (8, 4)), emb
    assert not is_projected("model.norm.weight", (4,))
    assert not is_projected("conv.weight", (3, 2, 2, 2))
    assert not is_projected(LINEAR, (4, 4), svd=False)


def test_first_model_is_returned_as_is() -> None:
    x, base = torch.randn(3, 3), torch.randn(3, 3)
    out = opcm([x], base, name=LINEAR)
    assert torch.equal(out, x) and out is not x


def test_errors() -> None:
    x = torch.randn(2, 2)
    with pytest.raises(MethodError, match="base model"):
        opcm([x], None)
    with pytest.raises(MethodError, match="continual"):
        opcm([x, x], x)
    with pytest.raises(MethodError, match="shape"):
        opcm([torch.randn(3)], x)


def test_rescale_factor() -> None:
    assert rescale_factor([1.0, 3.0], 4.0) == (2.0, 0.5)  # n̄ = 2, m = 4
    assert rescale_factor([2.0], 2.0) == (1.0, 1.0)
    assert rescale_factor([1.0, 1.0], 0.0) == (0.0, 1.0)  # nothing left to scale
    assert rescale_factor([0.0, 0.0], 0.0) == (1.0, 1.0)


def test_spec() -> None:
    assert OPCM.continual and OPCM.base == "required" and not OPCM.stochastic
    alpha = OPCM.param("alpha")
    assert alpha is not None and alpha.default == 0.5
    assert alpha.check(0.0) is not None and alpha.check(1.0) is not None
    assert alpha.check(0.3) is None
    assert OPCM.engine_kwargs == ("name",)

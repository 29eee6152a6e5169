"""RMM: reversible model merging of low-rank updates into a small basis plus coefficients.

Reference: Alipour & Mohammadi Amiri 2025, "Towards Reversible Model Merging For Low-rank
Weights", arXiv 2510.14163 (the "post-training SVD" setting), algorithms.md §24. Only the abstract
and a summary of the method section could be consulted here, so this follows the spec's
description; in particular the position vectors are **not** mean-centred (the summary, like the
spec, stacks the raw vectors ``X = [x_1 … x_K]`` and minimises ``‖X − QC‖_F``).

For the K task updates ``Δ_i = x_i − b`` of one 2-D tensor (m, n), with ``r = min(rank, m, n)``
and ``k = min(basis, K, r)``::

    Δ_i ≈ A_i B_i,  A_i = U_r √S_r (m, r),  B_i = √S_r V_rᵀ (r, n)     truncated SVD of Δ_i
    for each row p of A:    X_p = [A_1[p] … A_K[p]] ∈ R^{r×K}
    for each column q of B: X_q = [B_1[:, q] … B_K[:, q]] ∈ R^{r×K}
    Q = top-k left singular vectors of X (r, k),  C = Qᵀ X (k, K)    (Eckart–Young)
    Â_i[p] = Q_p C_p[:, i],   B̂_i[:, q] = Q_q C_q[:, i]              model i, rebuilt
    recover(i) = b + Â_i B̂_i
    merged     = b + (1/K) Σ_i Â_i B̂_i

The Q's of all positions are k "basis adapters" (``q_a`` (m, r, k), ``q_b`` (n, r, k)); the C's are
the per-model coefficients (``c_a`` (m, k, K), ``c_b`` (n, k, K)). Those four tensors are the
method's artifacts and the point of it: ``mergeforge recover`` rebuilds any input from them. The
paper's output is that basis, not one model; the merged tensor written here (the mean of the
rebuilt updates, i.e. task arithmetic of the reconstructions with weights 1/K) is mergeforge's
choice so that the output directory still holds a loadable model.

Determinism: each ``Δ_i``'s singular vectors get a fixed sign (the largest-magnitude entry of
every left singular vector is positive), so the factors, and hence the basis, do not depend on
LAPACK's sign choice. With ``k = K`` (or ``k = r``) the basis spans every ``X`` and the rebuilt
models are exactly the rank-r truncations; a rank at least the true rank then recovers the inputs.

Tensors that are not 2-D (biases, norms): their K task vectors are stored as they are (artifact
``deltas`` (K, …)), so they come back exactly; the merged tensor is ``b + mean_i Δ_i``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import ArtifactShapes, ArtifactSpec, MethodSpec, ParamSpec

ART_DTYPE = torch.float32


def low_rank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A = U_r √S_r`` (m, r) and ``B = √S_r V_rᵀ`` (r, n) of ``delta`` in float64, with each
    left singular vector's largest-magnitude entry made positive (``r = min(rank, m, n)``)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (m, q), (q,), (q, n)
    r = min(rank, s.numel())
    u, s, vh = u[:, :r], s[:r], vh[:r]  # (m, r), (r,), (r, n)
    pivot = u.abs().argmax(dim=0)  # (r,)
    sign = torch.sign(u[pivot, torch.arange(r)])  # (r,)
    sign[sign == 0] = 1.0
    root = s.sqrt() * sign  # (r,): the sign flips u_j and v_j together, so A B is unchanged
    return u * root, root[:, None] * vh  # (m, r), (r, n)


def position_basis(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per position p: ``Q_p`` = top-k left singular vectors of ``x[p]`` (r, K) and
    ``C_p = Q_pᵀ x[p]``; ``x`` (P, r, K) → ``Q`` (P, r, k), ``C`` (P, k, K)."""
    u, _, _ = torch.linalg.svd(x, full_matrices=False)  # (P, r, min(r, K))
    q = u[:, :, :k]  # (P, r, k)
    return q, q.transpose(1, 2) @ x  # (P, r, k), (P, k, r) @ (P, r, K) -> (P, k, K)


def rebuild_update(arts: Mapping[str, Tensor], i: int) -> Tensor:
    """Model ``i``'s rebuilt update ``Â_i B̂_i`` (m, n) from ``q_a, c_a, q_b, c_b``."""
    a = (arts["q_a"] @ arts["c_a"][:, :, i : i + 1]).squeeze(2)  # (m, r, k) @ (m, k, 1) -> (m, r)
    b = (arts["q_b"] @ arts["c_b"][:, :, i : i + 1]).squeeze(2)  # (n, r)
    return a @ b.T  # (m, r) @ (r, n) -> (m, n)


def compress(deltas: Sequence[Tensor], rank: int, basis: int) -> dict[str, Tensor]:
    """The four artifacts (float64) of one 2-D tensor's updates (see the module docstring)."""
    factors = [low_rank_factors(d, rank) for d in deltas]
    a = torch.stack([f[0] for f in factors], dim=2)  # (m, r, K): row p of every A_i
    b = torch.stack([f[1].T for f in factors], dim=2)  # (n, r, K): column q of every B_i
    k = min(basis, len(deltas), a.shape[1])
    q_a, c_a = position_basis(a, k)
    q_b, c_b = position_basis(b, k)
    return {"q_a": q_a, "c_a": c_a, "q_b": q_b, "c_b": c_b}


def rmm(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    rank: int = 16,
    basis: int = 2,
    artifacts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """RMM of one tensor: ``b + mean_i Â_i B̂_i`` and, with ``artifacts``, the basis and
    coefficients from which ``recover`` rebuilds every input (see the module docstring)."""
    if base is None:
        raise MethodError(
            "rmm compresses task vectors and needs a base model; set `base_model:` in the recipe "
            "to the pretrained model the inputs were fine-tuned from."
        )
    if not tensors:
        raise MethodError("rmm needs at least one model besides the base; list it in models:")
    check_inputs("rmm", tensors, base)
    deltas = [x - base for x in tensors]
    if base.dim() != 2:
        stacked = torch.stack(deltas)  # (K, ...)
        merged = base + stacked.mean(dim=0)
        return (merged, {"deltas": stacked}) if artifacts else merged
    arts = compress(deltas, int(rank), int(basis))
    mean = sum(rebuild_update(arts, i) for i in range(len(deltas))) / len(deltas)  # (m, n)
    merged = base + mean.to(base.dtype)
    if not artifacts:
        return merged
    return merged, {key: t.to(ART_DTYPE).contiguous() for key, t in arts.items()}


def artifact_shapes(shape: tuple[int, ...], k: int, params: Mapping[str, object]) -> ArtifactShapes:
    """Shapes of one tensor's artifacts, known before any tensor is read."""
    if len(shape) != 2:
        return {"deltas": ((k, *shape), ART_DTYPE)}
    m, n = shape
    r = min(_int(params, RANK), m, n)
    b = min(_int(params, BASIS), k, r)
    return {
        "q_a": ((m, r, b), ART_DTYPE),
        "c_a": ((m, b, k), ART_DTYPE),
        "q_b": ((n, r, b), ART_DTYPE),
        "c_b": ((n, b, k), ART_DTYPE),
    }


def _int(params: Mapping[str, object], spec: ParamSpec) -> int:
    value = params.get(spec.name, spec.default)
    assert isinstance(value, (int, float)), value
    return int(value)


def recover(
    arts: Mapping[str, Tensor], base: Tensor | None, i: int, params: Mapping[str, object]
) -> Tensor:
    """Input model ``i``'s tensor: ``b + Â_i B̂_i`` (2-D) or ``b + Δ_i`` (stored exactly)."""
    if base is None:
        raise MethodError("rmm artifacts are updates of the base model; recovery needs the base.")
    if "deltas" in arts:
        return base + arts["deltas"][i].to(base.dtype)
    update = rebuild_update({k: t.double() for k, t in arts.items()}, i)  # (m, n)
    return base + update.to(base.dtype)


RANK = ParamSpec(
    "rank",
    "int",
    "global",
    "rank r of each model's truncated-SVD factors A_i B_i (the post-training SVD setting; "
    "use the LoRA rank for adapters)",
    default=16,
    low=1,
)
BASIS = ParamSpec(
    "basis",
    "int",
    "global",
    "number k of basis adapters kept (capped at the number of models and at r); k = number "
    "of models rebuilds every rank-r truncation exactly",
    default=2,
    low=1,
)

RMM = MethodSpec(
    name="rmm",
    fn=rmm,
    summary="reversible merge: a k-adapter basis plus per-model coefficients from which every "
    "low-rank input can be rebuilt",
    base="required",
    params=(RANK, BASIS),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2510.14163",
    artifacts=ArtifactSpec(
        enabled=lambda params: True,
        shapes=artifact_shapes,
        recover=recover,
        doc="per 2-D tensor: q_a (m, r, k), c_a (m, k, K), q_b (n, r, k), c_b (n, k, K); "
        "other tensors: their K task vectors, exactly",
    ),
)

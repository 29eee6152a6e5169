"""SVD-based task-vector merges: TSV-M, Iso-C and Iso-CTS.

Notation: ``τ_t = x_t − b`` are the T task vectors of one tensor, ``r = min(m, n)`` the full rank
of an ``(m, n)`` matrix, ``α`` the global scale. Every method works on one 2-D tensor at a time:

* TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
  Merging", arXiv 2412.00081): keep the top ``k`` singular triplets of every ``τ_t``, concatenate
  ``U = [U_1 … U_T]``, ``S = diag(S_1 … S_T)``, ``Vᵀ = [V_1ᵀ; …; V_Tᵀ]``, replace ``U`` and ``Vᵀ``
  by their polar factors and return ``b + α · U⊥ S V⊥ᵀ``.
* Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", arXiv 2502.04959): ``Σ τ_t = U diag(s) Vᵀ`` → ``b + α · s̄ U Vᵀ``.
* Iso-CTS (same paper): the top ``k_c`` directions of ``Σ τ_t`` plus, per task, the top
  ``(r − k_c)/T`` directions of ``τ_t`` with the common left subspace projected out; polar-
  orthogonalise, flatten the spectrum to its mean, ``b + α · U⊥ s̄ V⊥ᵀ``.

Tensors that are not 2-D merge as ``b + α · mean_t τ_t`` in all three, as FusionBench 0.2.33 does
(``svd: false``, set per tensor with a parameter filter, does the same for a 2-D tensor: it is
FusionBench's ``exclude_keys``). FusionBench has no special case for position embeddings: they
are 2-D and go through the SVD unless excluded.

Rank and ranks follow FusionBench 0.2.33 (``method/task_singular_vector/utils/TSVM_utils.py``
``compute_and_sum_svd_mem_reduction``, ``method/isotropic_merging/iso_utils.py``): TSV keeps
``k = int(r · (1/T))`` triplets per task (the float product makes this ``⌊r/T⌋ − 1`` for a few
exact multiples, e.g. r = T = 49; kept for parity), and a 2-D tensor with ``k = 0`` (r < T) gets
a zero task vector. α multiplies the merged task vector after the SVD (FB's scalar ``alpha``).

Rank-deficient inputs. FusionBench takes singular vectors of zero (or round-off) singular values
as they come out of LAPACK; those are arbitrary, and they enter its polar factors and Iso's flat
spectrum, so its result is then not a function of the inputs. Here a singular value at or below
``max(m, n) · eps32 · s_max`` counts as zero: its triplet is dropped before the polar step, the
polar factor is the partial isometry ``P_ρ Q_ρᵀ`` on the numerical rank ``ρ``, and Iso's ``s̄`` is
the mean of the nonzero singular values over the directions that exist. For inputs of full rank
this is exactly FusionBench's result; for deficient ones it is the unique, deterministic limit
(e.g. T identical task vectors give TSV the rank-``k`` truncation of τ, not noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodFn, MethodSpec, ParamSpec

EPS32 = torch.finfo(torch.float32).eps


def _rank_floor(s: Tensor, shape: torch.Size) -> float:
    """Singular values at or below this count as zero: ``max(m, n) · eps32 · s_max``."""
    top = float(s.max()) if s.numel() else 0.0
    return max(shape) * EPS32 * top


def polar_factor(a: Tensor) -> Tensor:
    """Orthogonal polar factor ``P_ρ Q_ρᵀ`` of ``a = P Σ Qᵀ`` over its numerical rank ρ.

    For a full-rank ``a`` this is the nearest matrix with orthonormal columns (or rows), the
    "whitening" of TSV-M / Iso-CTS; on a rank-deficient ``a`` it is the partial isometry that
    maps ``range(aᵀ)`` to ``range(a)`` (zero columns stay zero). A zero ``a`` gives zeros.
    """
    p, sig, qh = torch.linalg.svd(a, full_matrices=False)  # (m, q), (q,), (q, n)
    keep = sig > _rank_floor(sig, a.shape)  # (q,)
    return p[:, keep] @ qh[keep]  # (m, n)


def top_triplets(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` singular triplets of ``x`` (m, n) as ``(U (m, k), s (k,), Vᵀ (k, n))``;
    triplets of a zero singular value come back as zeros (their vectors are arbitrary)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (m, r), (r,), (r, n)
    live = (s > _rank_floor(s, x.shape)).to(x.dtype)  # (r,)
    return u[:, :k] * live[:k], s[:k] * live[:k], vh[:k] * live[:k, None]


def _deltas(method: str, tensors: Sequence[Tensor], base: Tensor | None) -> list[Tensor]:
    """Task vectors ``x_t − b``; ``MethodError`` without a base or with mismatched shapes."""
    if base is None:
        raise MethodError(
            f"{method} merges task vectors and needs a base model; set `base_model:` in the "
            "recipe to the pretrained model the inputs were fine-tuned from."
        )
    if not tensors:
        raise MethodError(f"{method} needs at least one model besides the base; list it in models:")
    check_inputs(method, tensors, base)
    return [x - base for x in tensors]


def _mean(deltas: Sequence[Tensor]) -> Tensor:
    """``mean_t τ_t``: the merge of tensors that are not 2-D (or have ``svd: false``)."""
    return torch.stack(deltas).mean(dim=0)  # (shape)


def _flat(s: Tensor) -> Tensor:
    """Every nonzero entry of ``s`` replaced by the mean of the nonzero entries (zeros stay)."""
    nonzero = s != 0  # (q,)
    if not bool(nonzero.any()):
        return s
    return torch.where(nonzero, s[nonzero].mean(), s)


def tsv_delta(deltas: Sequence[Tensor]) -> Tensor:
    """TSV-M task vector of one 2-D tensor: ``U⊥ diag(S) V⊥ᵀ`` from the top ``int(r/T)``
    triplets of every ``τ_t`` (arXiv 2412.00081, Alg. 1)."""
    m, n = deltas[0].shape
    r = min(m, n)
    k = int(r * (1.0 / len(deltas)))  # FusionBench's sv_reduction = 1/T
    u = deltas[0].new_zeros(m, r)  # (m, r): unused columns stay zero, as in FusionBench
    s = deltas[0].new_zeros(r)  # (r,)
    vh = deltas[0].new_zeros(r, n)  # (r, n)
    for t, delta in enumerate(deltas):
        block = slice(t * k, (t + 1) * k)
        u[:, block], s[block], vh[block] = top_triplets(delta, k)
    return (polar_factor(u) * s) @ polar_factor(vh)  # (m, r) · (r,) @ (r, n) -> (m, n)


def iso_c_delta(deltas: Sequence[Tensor]) -> Tensor:
    """Iso-C task vector of one 2-D tensor: ``s̄ · U Vᵀ`` for ``Σ_t τ_t = U diag(s) Vᵀ``
    (arXiv 2502.04959, Eq. 6); ``s̄`` is the mean of the nonzero singular values."""
    total = torch.stack(list(deltas)).sum(dim=0)  # (m, n)
    u, s, vh = top_triplets(total, min(total.shape))  # (m, r), (r,), (r, n)
    return (u * _flat(s)) @ vh  # (m, n)


def common_size(rank: int, tasks: int, fraction: float) -> int:
    """Iso-CTS common-subspace size ``k_c``: ``int(r · f)``, moved so that ``r − k_c`` is a
    multiple of T (FusionBench: ``r − round((r − k_c)/T) · T``, Python's half-to-even round).
    Where that rounding would overshoot r (e.g. r = 3, T = 2, f = 0.2 → −1) FusionBench slices
    with a negative index; here the task part shrinks by T instead, so ``k_c ≥ 0``."""
    k_c = int(rank * fraction)
    specific = round((rank - k_c) / tasks) * tasks
    if specific > rank:
        specific -= tasks
    return rank - specific


def iso_cts_delta(deltas: Sequence[Tensor], fraction: float) -> Tensor:
    """Iso-CTS task vector of one 2-D tensor (arXiv 2502.04959, Alg. 1): common top-``k_c``
    triplets of ``Σ τ_t`` plus each task's top ``(r − k_c)/T`` triplets of
    ``τ_t − U_c U_cᵀ τ_t``, polar-orthogonalised, spectrum flattened to its mean."""
    m, n = deltas[0].shape
    r, tasks = min(m, n), len(deltas)
    k_c = common_size(r, tasks, fraction)
    per_task = (r - k_c) // tasks
    total = torch.stack(list(deltas)).sum(dim=0)  # (m, n)
    u_c, s_c, vh_c = top_triplets(total, k_c)  # (m, k_c), (k_c,), (k_c, n)
    us, ss, vhs = [], [], []
    for delta in deltas:
        specific = delta - u_c @ (u_c.T @ delta)  # (m, n): common left subspace projected out
        u_t, s_t, vh_t = top_triplets(specific, per_task)
        us.append(u_t)
        ss.append(s_t)
        vhs.append(vh_t)
    u = torch.cat([*us, u_c], dim=1)  # (m, r): task blocks first, then common, as FusionBench
    s = torch.cat([*ss, s_c])  # (r,)
    vh = torch.cat([*vhs, vh_c], dim=0)  # (r, n)
    return (polar_factor(u) * _flat(s)) @ polar_factor(vh)  # (m, n)


def _merge(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    alpha: float,
    svd: bool,
    delta_2d: Callable[[Sequence[Tensor]], Tensor],
) -> Tensor:
    """``b + α · delta_2d(τ)`` for a 2-D tensor with ``svd``, else ``b + α · mean_t τ_t``."""
    deltas = _deltas(method, tensors, base)
    assert base is not None  # _deltas raised otherwise
    merged = delta_2d(deltas) if svd and deltas[0].dim() == 2 else _mean(deltas)
    return base + alpha * merged


def tsv(
    tensors: Sequence[Tensor], base: Tensor | None, *, alpha: float = 1.0, svd: bool = True
) -> Tensor:
    """TSV-M: ``b + α · U⊥ S V⊥ᵀ`` (2-D tensors), ``b + α · mean_t τ_t`` otherwise."""
    return _merge("tsv", tensors, base, alpha, svd, tsv_delta)


def iso_c(
    tensors: Sequence[Tensor], base: Tensor | None, *, alpha: float = 1.0, svd: bool = True
) -> Tensor:
    """Iso-C: ``b + α · s̄ U Vᵀ`` of ``Σ τ_t`` (2-D tensors), ``b + α · mean_t τ_t`` otherwise."""
    return _merge("iso_c", tensors, base, alpha, svd, iso_c_delta)


def iso_cts(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
    svd: bool = True,
) -> Tensor:
    """Iso-CTS: ``b + α · U⊥ s̄ V⊥ᵀ`` over common + task subspaces (2-D), else the mean."""

    def delta_2d(deltas: Sequence[Tensor]) -> Tensor:
        return iso_cts_delta(deltas, common_space_fraction)

    return _merge("iso_cts", tensors, base, alpha, svd, delta_2d)


ALPHA = ParamSpec(
    "alpha",
    "float",
    "global",
    "scale of the merged task vector, applied after the SVD (FusionBench's alpha / "
    "scaling_factor; its Iso examples use 1.5)",
    default=1.0,
)
SVD = ParamSpec(
    "svd",
    "bool",
    "global",
    "false merges this tensor as the mean of the task vectors, as for non-2-D tensors "
    "(FusionBench's exclude_keys: set it with a filter on the tensor name)",
    default=True,
)
FRACTION = ParamSpec(
    "common_space_fraction",
    "float",
    "global",
    "share of the rank min(m, n) given to the common subspace of the summed task vectors; the "
    "rest is split equally among the tasks",
    default=0.8,
    low=0.0,
    high=1.0,
    low_open=True,
)


def _spec(
    name: str, fn: MethodFn, summary: str, params: tuple[ParamSpec, ...], paper: str
) -> MethodSpec:
    return MethodSpec(
        name=name,
        fn=fn,
        summary=summary,
        base="required",
        params=params,
        locality="tensor",
        stochastic=False,
        paper=paper,
    )


TSV = _spec(
    "tsv",
    tsv,
    "task singular vectors (TSV-M): top 1/T singular triplets of each task vector, "
    "decorrelated by polar decomposition, summed",
    (ALPHA, SVD),
    "https://arxiv.org/abs/2412.00081",
)
ISO_C = _spec(
    "iso_c",
    iso_c,
    "isotropic merge in the common subspace: flatten the spectrum of the summed task vectors",
    (ALPHA, SVD),
    "https://arxiv.org/abs/2502.04959",
)
ISO_CTS = _spec(
    "iso_cts",
    iso_cts,
    "isotropic merge in common and task-specific subspaces (Iso-CTS)",
    (ALPHA, FRACTION, SVD),
    "https://arxiv.org/abs/2502.04959",
)

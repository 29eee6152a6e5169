"""OPCM: orthogonal projection-based continual merging (one model at a time, constant memory).

Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
Continual Model Merging", arXiv 2501.09522; reference code FusionBench 0.2.33
``fusion_bench/method/opcm/opcm.py`` (``OPCMForCLIP``) and ``opcm_general.py`` (``OPCM``).

Models ``θ_1 … θ_T`` arrive one by one over a base ``θ0``; ``τ_t = θ_t − θ0``. The running merge
starts as ``θ^(1) = θ_1`` with ``λ_1 = 1``. Step ``t ≥ 2``, for every tensor (this module's
``opcm`` function, the per-tensor step):

* ``τ_prev = θ^(t−1) − θ0`` (the rescaled running merge), ``τ_new = θ_t − θ0``;
* a projected tensor (an ``nn.Linear`` weight: 2-D, not an embedding): ``τ_prev = U diag(s) Vᵀ``,
  split rank ``r = argmax_i [cumsum(s)_i / Σs > α]`` (the first index past a fraction α of the
  singular-value mass), ``P = Uᵀ τ_new V`` with ``diag(P) = 0`` and ``P[:r, :r] = 0``,
  ``τ̃ = U P Vᵀ``; any other tensor (biases, norms, embeddings, convolutions): ``τ̃ = τ_new``;
* ``out = θ0 + λ_{t−1} τ_prev + τ̃``.

Then, over the whole model (the engine's job, ``rescale_factor`` here): ``n_t = ‖τ_t‖``,
``n̄ = mean(n_1 … n_t)``, ``m = ‖out − θ0‖`` (global L2 norms over every merged tensor),
``λ_t = m / n̄`` and ``θ^(t) = θ0 + (out − θ0) · n̄ / m``: the merged task vector keeps the mean
norm of the individual ones.

Projection, computed from the thin SVD. With ``k = min(m, n)``, FusionBench's full SVD changes
only the top-left ``k × k`` block of ``P``, so ``τ̃ = τ_new − U_k (M ⊙ U_kᵀ τ_new V_k) V_kᵀ`` with
the mask ``M`` (diagonal and ``[:r, :r]``) and thin factors ``U_k, V_k``: the same matrix without
the ``m × m`` and ``n × n`` factors (an 11008 × 4096 MLP weight needs no 485 MB ``U``).

Rank-deficient ``τ_prev`` (e.g. a tensor the earlier models left at the base). FusionBench zeroes
``diag(P)`` along every singular pair, including those of zero singular values, which LAPACK
returns arbitrarily; its result then depends on LAPACK, not on the inputs. Here a singular value
at or below ``max(m, n) · eps32 · s_max`` counts as zero and its pair is not removed (nothing of
``τ_prev`` lies along it). For full-rank ``τ_prev``, the generic case, this is FusionBench's
result; for ``τ_prev = 0`` the new task vector enters unprojected.

Which tensors are projected. FusionBench walks ``nn.Module`` leaves and projects ``nn.Linear``
weights only. From names alone: a 2-D ``….weight`` whose module is not an embedding
(``embed_tokens``, ``wte``, ``wpe``, ``shared``, ``*embeddings``, ``embed_positions``,
``relative_attention_bias``). ``svd: false`` (set per tensor with a parameter filter) adds a 2-D
tensor like a bias, e.g. for GPT-2's ``Conv1D`` weights, which FusionBench does not project.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import MethodSpec, ParamSpec

EPS32 = torch.finfo(torch.float32).eps
EMBEDDING_MODULE = re.compile(
    r"(?:^|\.)(?:embed_tokens|embed_positions|wte|wpe|shared|relative_attention_bias"
    r"|\w*embeddings?)\.weight$"
)


def is_projected(name: str, shape: Sequence[int], svd: bool = True) -> bool:
    """Whether OPCM projects this tensor: a 2-D ``nn.Linear``-like weight (not an embedding)."""
    if not svd or len(shape) != 2:
        return False
    return name == "weight" or (name.endswith(".weight") and not EMBEDDING_MODULE.search(name))


def split_rank(s: Tensor, alpha: float) -> int:
    """``argmax_i [cumsum(s)_i / Σs > α]``: 0 when no index qualifies (FusionBench's argmax)."""
    return int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax())  # s: (k,) descending


def project_out(tau_prev: Tensor, tau_new: Tensor, alpha: float) -> Tensor:
    """``τ̃ = U P Vᵀ`` with ``P = Uᵀ τ_new V``, ``diag(P) = 0``, ``P[:r, :r] = 0`` (thin form)."""
    u, s, vh = torch.linalg.svd(tau_prev, full_matrices=False)  # (m, k), (k,), (k, n)
    k = s.shape[0]
    r = split_rank(s, alpha)
    top = float(s.max()) if k else 0.0
    rho = int((s > max(tau_prev.shape) * EPS32 * top).sum())  # numerical rank
    mask = torch.zeros(k, k, dtype=torch.bool, device=s.device)  # (k, k)
    mask[:r, :r] = True
    mask.diagonal()[:rho] = True
    coeff = (u.T @ tau_new @ vh.T) * mask  # (k, k): the removed part of P
    removed = u @ coeff @ vh  # (m, n)
    return removed.neg_().add_(tau_new)  # τ_new − removed, without another temporary


def opcm(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    alpha: float = 0.5,
    svd: bool = True,
    merged: Tensor | None = None,
    lambda_prev: float = 1.0,
    name: str = "",
) -> Tensor:
    """One OPCM step for one tensor: ``θ0 + λ_{t−1} (θ^(t−1) − θ0) + τ̃`` (module docstring).

    ``tensors`` holds the one incoming model's tensor; ``merged`` is the running merge
    ``θ^(t−1)`` (already rescaled) and ``lambda_prev`` its ``λ_{t−1}``; both are supplied by
    ``engine.continual``. Without ``merged`` the incoming model is the first, returned as is.
    """
    if base is None:
        raise MethodError("opcm: needs the base model (task vectors are θ_t − θ0); set base_model")
    check_inputs("opcm", tensors, base)
    if len(tensors) != 1:
        raise MethodError(
            f"opcm: got {len(tensors)} models for one step; OPCM is continual and folds one "
            "model at a time (run it through `engine.continual.merge_continual`)"
        )
    if merged is None:
        return tensors[0].clone()
    tau_prev = merged - base  # (m, n) or any shape
    tau_new = tensors[0] - base
    if is_projected(name, tuple(base.shape), svd):
        tau_new = project_out(tau_prev, tau_new, alpha)
    return tau_prev.mul_(lambda_prev).add_(tau_new).add_(base)  # θ0 + (λ τ_prev + τ̃), fresh


def rescale_factor(task_norms: Sequence[float], merged_norm: float) -> tuple[float, float]:
    """``(λ_t, n̄ / m)`` after a step: ``n̄ = mean(task_norms)``, ``m = merged_norm``.

    Degenerate norms (FusionBench divides by zero): ``m = 0`` keeps the merge unscaled, and
    ``n̄ = 0`` gives ``λ_t = 1``.
    """
    mean = sum(task_norms) / len(task_norms)
    lam = merged_norm / mean if mean > 0 else 1.0
    scale = mean / merged_norm if merged_norm > 0 else 1.0
    return lam, scale


OPCM = MethodSpec(
    name="opcm",
    fn=opcm,
    summary=(
        "Continual merging: each new task vector is projected off the top singular subspace "
        "of the running merge, then the merge is rescaled to the mean task-vector norm"
    ),
    base="required",
    params=(
        ParamSpec(
            "alpha",
            "float",
            "global",
            "fraction of the running merge's singular-value mass whose directions (the top-r "
            "block) the incoming task vector may not touch",
            default=0.5,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        ),
        ParamSpec(
            "svd",
            "bool",
            "global",
            "project 2-D nn.Linear-like weights (false: add like a bias; set per tensor with a "
            "filter, e.g. for GPT-2 Conv1D weights)",
            default=True,
        ),
    ),
    locality="model",
    stochastic=False,
    paper="https://arxiv.org/abs/2501.09522",
    min_models=1,
    engine_kwargs=("name",),
    continual=True,
)

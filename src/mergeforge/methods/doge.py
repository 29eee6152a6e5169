"""DOGE: model merging as adaptive projective gradient descent (data-free task arithmetic).

Reference: Wei et al., ICML 2025, "Modeling Multi-Task Model Merging as Adaptive Projective
Gradient Descent", arXiv 2501.01230; implementation: FusionBench 0.2.33
``fusion_bench/method/doge_ta/doge_ta.py`` (``DOGE_TA_Algorithm``), which this module follows.

For one 2-D weight ``W`` (m×n, r = min(m, n)) of a transformer block, base ``b`` and task vectors
``τ_t = x_t − b`` (t = 1..T)::

    λ_t = η / ||τ_t||_F                                  (adaptive coefficient, per tensor)
    S   = Σ_t λ_t τ_t,   c = Σ_t λ_t
    Ū   = [U_1[:, :q] … U_T[:, :q] 0…]  (m×r),  q = ⌊r/T⌋,  U_t from SVD(τ_t)
    B   = U_u[:, :⌊r/s⌋],  U_u from SVD(Ū)               (shared subspace, s = ``subspace``)
    L(δ) = Σ_j Σ_rows ( Σ_cols τ_j ⊙ (τ_j − S − c δ) )²   (data-free surrogate of the loss gap)
    δ ← Adam(lr) for ``steps`` steps from 0, each on the projected gradient ∇ − B Bᵀ ∇
    M_t = [|τ_t| ≥ θ_t]                                   (top-``density`` magnitudes of τ_t)
    out = b + Σ_t λ_t ((τ_t + δ) ⊙ M_t)

Which tensors: FusionBench selects the CLIP encoder weights (names with ``encoder`` and
``weight``, without ``layer_norm``: the 2-D attention and MLP matrices) and leaves every other
parameter pre-trained. Here every 2-D tensor inside a transformer block (the engine's
``layer.index`` is not ``None``) gets DOGE; every other tensor (embeddings, head, norms, biases)
is the base tensor unchanged (``modifies``).

The mask threshold ``θ_t``: with ``trim_scope: model`` (default, as FusionBench) it is the
``r``-th smallest ``|τ_t|`` over the concatenation of the tensors DOGE modifies,
``r = D − int(D·d)`` (so ``int(D·d) + 1`` entries and the ties at θ are kept, FusionBench's
``topk_values_mask``), computed by the engine's first pass (``engine/global_pass.py``) and passed
as ``threshold``; with ``trim_scope: tensor`` the same rule is applied inside each tensor.

Differences from FusionBench 0.2.33 (deliberate, each harmless on generic inputs):

* a task vector that is exactly zero on a tensor gets ``λ_t = 0`` (FusionBench divides by zero
  and writes NaN into that tensor);
* when ``q = ⌊r/T⌋ = 0`` (more tasks than ``min(m, n)``) Ū is all zeros and FusionBench projects
  on singular vectors of a zero matrix (arbitrary); we do not project;
* the gradient is computed in closed form, ``∇L = −2c Σ_j ρ_j τ_j`` with the row sums
  ``ρ_j = Σ_cols τ_j ⊙ (τ_j − S − cδ)``, instead of by autograd, and projected as ``B (Bᵀ ∇)``
  instead of ``(B Bᵀ) ∇`` (no m×m matrix); both agree with FusionBench to float rounding;
* Adam's state is per tensor, as in FusionBench (one optimizer over all layers, but the layers
  are optimized one after another and Adam skips parameters without a gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.primitives import check_inputs
from mergeforge.methods.spec import Layer, MethodSpec, ParamSpec

TrimScope = Literal["model", "tensor"]
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def modifies(shape: Sequence[int], layer_index: int | None) -> bool:
    """Whether DOGE changes a tensor: 2-D and inside a transformer block. The engine's
    whole-model threshold pass counts only these tensors (FusionBench's mask is over them)."""
    return len(shape) == 2 and layer_index is not None


def adaptive_lambdas(taus: Tensor, eta: float) -> Tensor:
    """``λ_t = η / ||τ_t||_F`` for ``taus`` (T, m, n); 0 for a zero task vector."""
    norms = torch.linalg.vector_norm(taus.reshape(taus.shape[0], -1), dim=1)  # (T,)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))  # (T,)
    return torch.where(norms > 0, eta / safe, torch.zeros_like(norms))  # (T,)


def shared_basis(taus: Tensor, subspace: float) -> Tensor:
    """Orthonormal basis B (m×⌊r/s⌋) of the subspace the task vectors share (see module doc).

    Each task contributes its ``q = ⌊r/T⌋`` leading left singular vectors to Ū (m×r, the
    remaining columns zero, as FusionBench); B is the top ``⌊r/s⌋`` left singular vectors of Ū.
    Returns an m×0 basis when ``q = 0`` or ``⌊r/s⌋ = 0`` (no projection).
    """
    t, m, n = taus.shape
    r = min(m, n)
    q, k = r // t, int(r / subspace)
    if q == 0 or k == 0:
        return taus.new_zeros(m, 0)
    u_bar = taus.new_zeros(m, r)  # (m, r)
    for i in range(t):
        u = torch.linalg.svd(taus[i], full_matrices=False)[0]  # (m, r)
        u_bar[:, i * q : (i + 1) * q] = u[:, :q]
    u_u = torch.linalg.svd(u_bar, full_matrices=False)[0]  # (m, r)
    return u_u[:, :k].contiguous()  # (m, k)


def surrogate_grad(taus: Tensor, lams: Tensor, delta: Tensor, rho0: Tensor | None = None) -> Tensor:
    """∇_δ of ``L(δ) = Σ_j Σ_rows ρ_j²`` with ``ρ_j = Σ_cols τ_j ⊙ (τ_j − S − cδ)``:
    ``−2c Σ_j ρ_j τ_j`` (ρ_j broadcast along the columns).

    ``ρ_j = ρ0_j − c Σ_cols τ_j ⊙ δ`` with ``ρ0_j = Σ_cols τ_j ⊙ (τ_j − S)`` independent of δ:
    pass ``rho0`` (:func:`surrogate_offset`) to reuse it across steps (two contractions a step).
    """
    c = lams.sum()
    if rho0 is None:
        rho0 = surrogate_offset(taus, lams)
    rho = rho0 - c * torch.einsum("tmn,mn->tm", taus, delta)  # (T, m)
    return torch.einsum("tm,tmn->mn", rho, taus) * (-2.0 * c)  # (m, n)


def surrogate_offset(taus: Tensor, lams: Tensor) -> Tensor:
    """``ρ0 (T, m)``: ``Σ_cols τ_j ⊙ (τ_j − S)`` with ``S = Σ_t λ_t τ_t``."""
    s = (taus * lams.view(-1, 1, 1)).sum(0)  # (m, n)
    return (taus * (taus - s)).sum(2)  # (T, m)


def project_off(g: Tensor, basis: Tensor) -> Tensor:
    """``g − B (Bᵀ g)``: the part of ``g`` (m×n) whose columns are orthogonal to ``basis``."""
    return g - basis @ (basis.T @ g) if basis.shape[1] else g  # (m, n)


def optimize_delta(taus: Tensor, lams: Tensor, basis: Tensor, steps: int, lr: float) -> Tensor:
    """δ (m×n) after ``steps`` Adam steps from 0 on the gradient projected off ``basis``.

    Adam (Kingma & Ba 2015, β = (0.9, 0.999), ε = 1e-8, as FusionBench's ``torch.optim.Adam``)
    written out with ``torch.optim.Adam``'s operation order, without its per-step overhead.
    """
    delta = torch.zeros_like(taus[0])  # (m, n)
    m1, m2 = torch.zeros_like(delta), torch.zeros_like(delta)  # (m, n) moments
    rho0 = surrogate_offset(taus, lams)  # (T, m)
    for step in range(1, steps + 1):
        g = project_off(surrogate_grad(taus, lams, delta, rho0), basis)  # (m, n)
        m1.lerp_(g, 1 - ADAM_BETAS[0])
        m2.mul_(ADAM_BETAS[1]).addcmul_(g, g, value=1 - ADAM_BETAS[1])
        step_size = lr / (1 - ADAM_BETAS[0] ** step)
        denom = (m2.sqrt() / (1 - ADAM_BETAS[1] ** step) ** 0.5).add_(ADAM_EPS)  # (m, n)
        delta.addcdiv_(m1, denom, value=-step_size)
    return delta


def mask_thresholds(
    taus: Tensor, density: Sequence[float], trim_scope: TrimScope, threshold: Sequence[float] | None
) -> list[float]:
    """θ_t per task: the engine's whole-model ``threshold`` or the per-tensor rule (module doc)."""
    if trim_scope == "model":
        if threshold is None:
            raise MethodError(
                "doge with trim_scope: model needs one magnitude threshold per model, computed "
                "over the whole model before merging; the merge engine passes them as "
                "`threshold` (or use trim_scope: tensor)."
            )
        return [float(v) for v in threshold]
    out = []
    for tau, d in zip(taus, density, strict=True):
        a = tau.abs().reshape(-1)  # (m·n,)
        rank = a.numel() - int(a.numel() * d)
        if d >= 1 or rank <= 0:
            out.append(0.0)
        elif d <= 0:
            out.append(math.inf)
        else:
            out.append(float(torch.kthvalue(a, rank).values))
    return out


def doge(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    eta: float = 0.07,
    subspace: float = 6,
    density: Sequence[float],
    trim_scope: TrimScope = "model",
    steps: int = 400,
    lr: float = 1e-4,
    threshold: Sequence[float] | None = None,
    layer: Layer | None = None,
) -> Tensor:
    """DOGE merge of one tensor (see the module docstring).

    ``layer`` (from the engine) decides whether the tensor is inside a transformer block; when
    it is ``None`` (a direct call) any 2-D tensor is merged. Tensors DOGE does not modify come
    back as a copy of ``base``.
    """
    if base is None or not tensors:
        raise MethodError(
            "doge merges task vectors x_t − base: it needs `base_model:` and at least one "
            "other model in the recipe."
        )
    check_inputs("doge", tensors, base, density=density)
    index = 0 if layer is None else layer.index
    if not modifies(tuple(base.shape), index):
        return base.clone()
    taus = torch.stack([x - base for x in tensors])  # (T, m, n)
    lams = adaptive_lambdas(taus, eta)  # (T,)
    basis = shared_basis(taus, subspace)  # (m, k)
    delta = optimize_delta(taus, lams, basis, int(steps), lr)  # (m, n)
    thetas = mask_thresholds(taus, density, trim_scope, threshold)
    masks = torch.stack([tau.abs() >= th for tau, th in zip(taus, thetas, strict=True)])
    adjusted = (taus + delta) * masks  # (T, m, n), FusionBench's op order
    return base + (adjusted * lams.view(-1, 1, 1)).sum(0)  # (m, n)


DOGE = MethodSpec(
    name="doge",
    fn=doge,
    summary="task arithmetic with adaptive λ = η/‖τ‖ and a shared correction δ learned by "
    "projected gradient descent off the tasks' shared subspace (2-D block weights only)",
    base="required",
    params=(
        ParamSpec(
            "eta",
            "float",
            "global",
            "η: each task vector is scaled by η/‖τ_t‖_F per tensor (FusionBench `lamda`)",
            default=0.07,
        ),
        ParamSpec(
            "subspace",
            "float",
            "global",
            "s: the shared subspace has ⌊min(m,n)/s⌋ directions (FusionBench `subspace`)",
            default=6,
            low=0.0,
            low_open=True,
        ),
        ParamSpec(
            "density",
            "float",
            "per_model",
            "fraction of each task vector's largest magnitudes kept by its mask (FusionBench "
            "`K`/100)",
            default=0.3,
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        ParamSpec(
            "trim_scope",
            "str",
            "global",
            "where the mask's top magnitudes are chosen: model = over each model's whole task "
            "vector on the tensors DOGE modifies (FusionBench; one extra read of the models); "
            "tensor = in each tensor",
            default="model",
            choices=("model", "tensor"),
        ),
        ParamSpec(
            "steps", "int", "global", "Adam steps per tensor (FusionBench: 400)", default=400, low=0
        ),
        ParamSpec(
            "lr", "float", "global", "Adam learning rate (FusionBench: 1e-4)", default=1e-4, low=0
        ),
    ),
    locality="tensor",
    stochastic=False,
    paper="https://arxiv.org/abs/2501.01230",
    category="data-free",
    engine_kwargs=("layer",),
    global_scope=modifies,
)

"""KnOTS: merge low-rank (LoRA) updates after aligning them in one shared SVD basis.

Reference: Stoica et al. 2024, "Model merging with SVD to tie the KnOTS", arXiv 2410.19735;
official code ``gstoica27/KnOTS`` (``task_merger.SVDMerger``, ``masking_ops``); FusionBench
0.2.33 ships only its first step (``method/knots/knots_utils.subspace_alignment``). For the K
task updates ``ΔW_t = x_t − b`` of one 2-D tensor (m, n)::

    [ΔW_1 … ΔW_K] = U diag(s) [V_1ᵀ … V_Kᵀ]      SVD in float64 of the (m, K·n) concatenation;
                                                 triplets with s ≤ eps dropped (FusionBench)
    Ṽ_t = diag(s) V_tᵀ                             (ρ, n) per task: the official ``s_on_V: true``
    Ṽ_m = inner(Ṽ_1 … Ṽ_K; base 0, λ = α)          ties | task_arithmetic | dare_ties | dare_linear
    out = b + U Ṽ_m                                (= b + α U Σ V_mᵀ)

The inner method is mergeforge's own function, run on the K matrices ``Ṽ_t`` as its task vectors
with a zero base, so its trim, DARE drop, sign election and disjoint mean act on the entries of
the Σ-scaled task coordinates, as the official code does (it masks ``diag(s) V_tᵀ`` and merges
with a disjoint mean; its ``scaling_coeffs`` is α). Defaults follow the official configs: inner
``ties``, ``normalize`` true (their ``merging_type: mean``), equal weights, DARE rescale by
``1/density`` (``rescale_mode: inverse``). Their tuned α (0.6 for ties, 0.7 for dare_ties on
ViT-B/32) and densities (0.2 ties, 0.9 dare) are recipe choices; the defaults here are α = 1 and
density 1, which make K = 1 with ``task_arithmetic`` return the input exactly.

Deviations, all documented choices:

* Per tensor, not per model: the official code flattens every layer's ``Ṽ_t`` into one vector
  per task before the TIES trim, so its top-k is model-wide; here the trim (and the DARE draw)
  is per tensor. The SVD is per layer in both.
* ``eps`` defaults to FusionBench's 1e-4; the official code uses 1e-5. It is absolute, so it
  drops more of the spectrum of very small updates.
* Tensors that are not 2-D (biases, norms) or that have ``svd: false`` are merged by the inner
  method directly on their task vectors with the same parameters: ``b + α · inner(x − b)``. This
  is the official ``merge_other_params: true`` path (its default, false, keeps the base; with
  LoRA adapters those tensors carry no update anyway). A 2-D tensor whose concatenated updates
  have no singular value above ``eps`` (e.g. all zero) gives the base.

Randomness: the spec is stochastic because the DARE inners draw masks; ``ties`` and
``task_arithmetic`` receive the generator and ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.errors import MethodError
from mergeforge.methods.dare import RESCALE_MODE, RescaleMode, dare_linear, dare_ties
from mergeforge.methods.gta import CONSENSUS, normalize_param
from mergeforge.methods.primitives import Consensus, check_inputs
from mergeforge.methods.spec import MethodSpec, ParamSpec
from mergeforge.methods.task_arithmetic import task_arithmetic
from mergeforge.methods.ties import ties

INNERS = ("ties", "task_arithmetic", "dare_ties", "dare_linear")


def subspace_alignment(deltas: Sequence[Tensor], eps: float) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``U (m, ρ)``, ``s (ρ,)`` and the per-task blocks ``V_tᵀ (ρ, n)`` of the SVD of
    ``[ΔW_1 … ΔW_K]``, computed in float64 and returned as float32, keeping ``s > eps``."""
    n = deltas[0].shape[1]
    stacked = torch.cat(list(deltas), dim=1).double()  # (m, K·n)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)  # (m, q), (q,), (q, K·n)
    keep = s > eps  # (q,)
    u, s, vh = u[:, keep].float(), s[keep].float(), vh[keep].float()  # (m, ρ), (ρ,), (ρ, K·n)
    return u, s, list(torch.split(vh, n, dim=1))  # K × (ρ, n)


def _inner(
    inner: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool,
    consensus: Consensus,
    rescale_mode: RescaleMode,
    alpha: float,
    generator: torch.Generator | None,
) -> Tensor:
    """``base + α · inner(tensors − base)`` with the inner method's own function."""
    common = {"weight": weight, "normalize": normalize, "lambda": alpha}
    if inner == "ties":
        return ties(tensors, base, density=density, consensus=consensus, **common)
    if inner == "task_arithmetic":
        return task_arithmetic(tensors, base, **common)
    dare = {"density": density, "rescale": True, "rescale_mode": rescale_mode}
    if inner == "dare_ties":
        return dare_ties(tensors, base, consensus=consensus, generator=generator, **dare, **common)
    if inner == "dare_linear":
        return dare_linear(tensors, base, generator=generator, **dare, **common)
    raise MethodError(
        f"knots: unknown inner method {inner!r}; use one of {', '.join(INNERS)} "
        "(`inner:` in the recipe's parameters)."
    )


def knots(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    inner: str = "ties",
    normalize: bool = True,
    consensus: Consensus = "sum",
    rescale_mode: RescaleMode = "inverse",
    alpha: float = 1.0,
    eps: float = 1e-4,
    svd: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """KnOTS merge of one tensor (see the module docstring)."""
    if base is None:
        raise MethodError(
            "knots merges task vectors and needs a base model; set `base_model:` in the recipe "
            "to the pretrained model the adapters were trained on."
        )
    if not tensors:
        raise MethodError("knots needs at least one model besides the base; list it in models:")
    check_inputs("knots", tensors, base, weight=weight, density=density)

    def run(xs: Sequence[Tensor], b: Tensor) -> Tensor:
        args = (weight, density, normalize, consensus, rescale_mode, alpha, generator)
        return _inner(inner, xs, b, *args)

    if not svd or base.dim() != 2:
        return run(tensors, base)
    u, s, vhs = subspace_alignment([x - base for x in tensors], eps)
    if s.numel() == 0:  # every singular value ≤ eps: no update survives (as FusionBench)
        return base.clone()
    coords = [s[:, None] * vh for vh in vhs]  # K × (ρ, n): diag(s) V_tᵀ
    merged = run(coords, torch.zeros_like(coords[0]))  # (ρ, n): α · inner(Ṽ)
    return base + u @ merged  # (m, ρ) @ (ρ, n) -> (m, n)


_WEIGHT = ParamSpec(
    "weight",
    "float",
    "per_model",
    "weight w_i of the model's task coordinates in the inner merge (the official code uses "
    "equal weights)",
    default=1.0,
)
_DENSITY = ParamSpec(
    "density",
    "float",
    "per_model",
    "inner ties: fraction of each task's Σ-scaled coordinates kept by magnitude (official "
    "configs: 0.2); inner dare_*: keep probability (official: 0.9); ignored by task_arithmetic",
    default=1.0,
    low=0.0,
    high=1.0,
)
_INNER = ParamSpec(
    "inner",
    "str",
    "global",
    "method that merges the aligned task coordinates diag(s) V_tᵀ",
    default="ties",
    choices=INNERS,
)
_NORMALIZE = normalize_param(True)
_RESCALE_MODE = ParamSpec(
    "rescale_mode",
    "str",
    "global",
    "inner dare_*: restore the dropped mass by 1/density (inverse, official KnOTS) or by "
    "matching the L1 norm (l1, mergekit)",
    default="inverse",
    choices=RESCALE_MODE.choices,
)
_ALPHA = ParamSpec(
    "alpha",
    "float",
    "global",
    "scale α of the merged update: out = b + α U Σ V_mᵀ (official scaling_coeffs; tuned, "
    "0.6 for ties and 0.7 for dare_ties in the paper's ViT-B/32 configs)",
    default=1.0,
)
_EPS = ParamSpec(
    "eps",
    "float",
    "global",
    "singular values of the concatenated updates at or below eps are dropped (FusionBench "
    "1e-4; the official code 1e-5)",
    default=1e-4,
    low=0.0,
)
_SVD = ParamSpec(
    "svd",
    "bool",
    "global",
    "false merges this tensor with the inner method on its raw task vectors, as for tensors "
    "that are not 2-D (set it with a filter on the tensor name, e.g. for embeddings)",
    default=True,
)

KNOTS = MethodSpec(
    name="knots",
    fn=knots,
    summary="align LoRA updates in the SVD basis of their concatenation, merge the per-task "
    "coordinates with TIES/DARE/TA",
    base="required",
    params=(
        _WEIGHT,
        _DENSITY,
        _INNER,
        _NORMALIZE,
        CONSENSUS,
        _RESCALE_MODE,
        _ALPHA,
        _EPS,
        _SVD,
    ),
    locality="tensor",
    stochastic=True,
    paper="https://arxiv.org/abs/2410.19735",
)

"""AdaMerging: learn merging coefficients by minimising prediction entropy on unlabeled test data.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
arXiv 2310.02575 (FusionBench 0.2.33 ``method/adamerging``). With θ0, task vectors τ_t and
coefficients λ (``merged.MergedModel``):

    task-wise:   θ(λ) = θ0 + Σ_t λ_t τ_t                       λ ∈ R^T
    layer-wise:  θ^k(λ) = θ0^k + Σ_t λ_{t,k} τ_t^k             λ ∈ R^{K×T}, k = every fused tensor
    min_λ  Σ_t E_{x ∈ D_t^test} [ H(softmax(head_t(body_θ(λ)(x)))) ]

Each step draws one unlabeled batch per task (``batches_per_step`` to average more), sums the
per-task entropies, back-propagates to λ only, and takes one Adam step; λ starts at ``init``.

AdaMerging++ (``adamerging_pp``): the same on TIES-preprocessed task vectors (Yadav et al. 2023,
arXiv 2306.01708): trim each τ_t to its ``density`` largest magnitudes, elect a sign per entry
γ = sgn(Σ_t τ̂_t), keep only the entries that agree:

    τ̃_t = τ̂_t ⊙ [sgn τ̂_t = γ]

The trim is over each task's whole task vector (``trim_scope: model``, the TIES paper and the
AdaMerging code: keep |τ| ≥ the r-th smallest |τ|, r = D − int(D·density), as FusionBench's
``topk_values_mask``) or per tensor (``tensor``: ``methods.primitives.trim_magnitude``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeforge.fusion.data import FusionProblem, task_vectors
from mergeforge.fusion.losses import Progress
from mergeforge.fusion.merged import (
    TTA_DATA,
    Layout,
    MergedModel,
    Streams,
    check_fields,
    is_int,
    is_number,
    static_result,
    train,
)
from mergeforge.fusion.results import StaticResult
from mergeforge.fusion.spec import FusionSpec
from mergeforge.methods.primitives import elect_sign, trim_below, trim_magnitude

PAPER = "https://arxiv.org/abs/2310.02575"
TrimScope = Literal["model", "tensor"]


@dataclass(frozen=True)
class AdaMergingConfig:
    """Parameters of ``adamerging``.

    * ``granularity``: ``layer`` — one coefficient per (fused tensor, task) (the paper's best,
      and FusionBench's default); ``task`` — one per task.
    * ``init``: starting value of every coefficient (paper and FusionBench: 0.3).
    * ``lr``: Adam learning rate on the coefficients (1e-3; FusionBench uses 1e-4 for GPT-2).
    * ``steps``: optimisation steps (the paper's 500; FusionBench's configs use 1000). 500: the
      schedule of the paper's reported results, where the entropy has levelled off, at half the
      cost on a CPU.
    * ``clamp``: clamp the coefficients to [0, 1] before merging (the original code does;
      FusionBench's default, kept here, does not).
    * ``seed``: order in which each task's unlabeled batches are drawn.
    * ``batches_per_step``: unlabeled batches per task per step (their entropies are averaged);
      1 as in the paper, whose batch size is 16.
    """

    granularity: Layout = "layer"
    init: float = 0.3
    lr: float = 1e-3
    steps: int = 500
    clamp: bool = False
    seed: int = 0
    batches_per_step: int = 1

    def __post_init__(self) -> None:
        check_fields(self.algorithm, self, self.rules())

    @property
    def algorithm(self) -> str:
        return "adamerging"

    def rules(self) -> list[tuple[str, bool, str]]:
        return [
            ("granularity", self.granularity in ("task", "layer"), "'task' or 'layer'"),
            ("init", is_number(self.init), "a finite number, e.g. 0.3"),
            ("lr", is_number(self.lr) and self.lr >= 0, "a finite number ≥ 0, e.g. 1e-3"),
            ("steps", is_int(self.steps, 0), "an integer ≥ 0"),
            ("clamp", isinstance(self.clamp, bool), "true or false"),
            ("seed", is_int(self.seed, 0), "an integer ≥ 0"),
            ("batches_per_step", is_int(self.batches_per_step, 1), "an integer ≥ 1"),
        ]


@dataclass(frozen=True)
class AdaMergingPPConfig(AdaMergingConfig):
    """Parameters of ``adamerging_pp``: those of ``adamerging``, plus

    * ``density``: fraction of each task vector kept by the TIES trim (TIES / AdaMerging++: 0.2);
    * ``trim_scope``: ``model`` — the largest magnitudes over each task's whole task vector (TIES
      paper, AdaMerging code); ``tensor`` — within each tensor (mergekit's TIES).
    """

    density: float = 0.2
    trim_scope: TrimScope = "model"

    @property
    def algorithm(self) -> str:
        return "adamerging_pp"

    def rules(self) -> list[tuple[str, bool, str]]:
        return [
            *super().rules(),
            ("density", is_number(self.density) and 0 < self.density <= 1, "a number in (0, 1]"),
            ("trim_scope", self.trim_scope in ("model", "tensor"), "'model' or 'tensor'"),
        ]


def model_thresholds(vectors: Mapping[str, Tensor], density: float) -> list[float]:
    """Per task, the magnitude cut of its whole task vector: the r-th smallest |τ_t| over every
    tensor, r = D − int(D·density) (0 when ``density`` ≥ 1: nothing is trimmed)."""
    tvs = list(vectors.values())
    out = []
    for t in range(tvs[0].shape[0]):
        flat = torch.cat([v[t].reshape(-1).abs() for v in tvs])  # (D,)
        rank = flat.numel() - int(flat.numel() * density)
        out.append(0.0 if density >= 1 else float(torch.kthvalue(flat, rank).values))
    return out


def ties_vectors(
    vectors: Mapping[str, Tensor], density: float, trim_scope: TrimScope = "model"
) -> dict[str, Tensor]:
    """AdaMerging++'s task vectors τ̃_t = τ̂_t ⊙ [sgn τ̂_t = γ] (module docstring), same shapes.

    The sign election is ``methods.primitives.elect_sign`` (sum; an exact zero total counts as
    +1, where the TIES code uses the majority sign: it matters only where trimmed entries cancel
    exactly)."""
    cuts = model_thresholds(vectors, density) if trim_scope == "model" else None
    out = {}
    for name, tv in vectors.items():  # (T, *shape)
        if cuts is None:
            trimmed = torch.stack([trim_magnitude(v, density) for v in tv])  # (T, *shape)
        else:
            trimmed = torch.stack([trim_below(v, c) for v, c in zip(tv, cuts, strict=True)])
        sign = elect_sign(trimmed)  # (*shape) int8 ±1
        out[name] = trimmed * (trimmed.sign() == sign)  # (T, *shape)
    return out


def run(
    problem: FusionProblem,
    config: AdaMergingConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> StaticResult:
    """Task-/layer-wise AdaMerging (AdaMerging++ when ``config`` is an ``AdaMergingPPConfig``)."""
    name = config.algorithm
    streams = Streams(problem, config.seed, device, name)
    vectors = None
    if isinstance(config, AdaMergingPPConfig):
        vectors = ties_vectors(task_vectors(problem), config.density, config.trim_scope)
    model = MergedModel(problem, vectors=vectors, device=device)
    lam = model.coefficients(config.granularity, config.init)  # (T,) or (K, T)

    def objective() -> Tensor:
        params = model.params(lam, clamp=config.clamp)
        return model.entropy(params, streams.draw(config.batches_per_step))

    history = train(
        [lam], objective, lr=config.lr, steps=config.steps, algorithm=name,
        lower="the learning rate `lr`", progress=progress,
    )  # fmt: skip
    info = {"config": asdict(config), "tensors": model.num_tensors, "tasks": model.num_tasks}
    return static_result(
        name, model, lam, clamp=config.clamp, exportable=vectors is None, history=history,
        info=info,
    )  # fmt: skip


SPECS: tuple[FusionSpec, ...] = (
    FusionSpec(
        name="adamerging",
        category="needs-data",
        config=AdaMergingConfig,
        run=run,
        data=TTA_DATA,
        paper=PAPER,
        doc="learn task- or layer-wise merging coefficients by minimising prediction entropy "
        "on unlabeled test inputs",
    ),
    FusionSpec(
        name="adamerging_pp",
        category="needs-data",
        config=AdaMergingPPConfig,
        run=run,
        data=TTA_DATA,
        paper=PAPER,
        doc="AdaMerging on TIES-preprocessed task vectors (trimmed, sign-elected)",
    ),
)

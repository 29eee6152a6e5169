"""Concrete subspace learning: a shared mask over the task vectors, learned by test-time entropy.

Tang et al. 2023, "Concrete Subspace Learning based Interference Elimination for Multi-task Model
Fusion", arXiv 2312.06173 (FusionBench 0.2.33 ``method/concrete_subspace``). One mask logit s per
element of every fused tensor (init ``init_logits``, p = σ(s)); a relaxed-Bernoulli (binary
Concrete) sample with temperature T, rescaled per tensor by its mean:

    u ~ U(0, 1),   m = σ((logit σ(s) + log u − log(1 − u)) / T),   m^k ← m^k / mean(m^k)

(exactly ``torch.distributions.RelaxedBernoulli(T, logits=s).rsample()``, drawn from a private
generator seeded with ``seed``), and the merged model θ^k = θ0^k + Σ_t λ_{t,k} (m^k ⊙ τ_t^k)
(``merged.MergedModel``). The mask is shared by all tasks.

* ``concrete_ta``: λ fixed at ``scaling`` (task arithmetic); each step samples m, sums the
  per-task entropies on one unlabeled batch per task, and takes an Adam step on s.
* ``concrete_adamerging`` (bi-level), each outer step: sample m; reset λ to ``init``; inner: one
  Adam step (``base_lr``) on λ of the entropy with m detached; outer: the entropy at the updated
  λ on fresh batches, one Adam step (``lr``) on s (first-order: no gradient through the inner
  step). Then fix the evaluation mask and run ordinary AdaMerging on λ (from ``init``,
  ``adamerging_lr``, ``adamerging_steps``) with it.

The final mask is ``eval_mask``: another continuous sample (FusionBench's default) or a
Bernoulli(σ(s)) draw, rescaled by its mean. Cost: s and its two Adam moments, 3|θ| extra.

Difference from FusionBench 0.2.33 (``ConcreteLayerWiseAdaMergingForCLIP.train_mask``): it builds
the inner step's merged weights *before* resetting λ, so its inner forward sees the previous outer
step's updated λ while Adam then updates the reset value; we evaluate the inner loss at the reset
λ, as the paper's bi-level step (and algorithms.md §12) reads. Concrete TA has no inner step and
matches FusionBench's loop (tests/fusion/test_adamerging_fb.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeforge.fusion.data import FusionProblem
from mergeforge.fusion.losses import Progress, check_finite
from mergeforge.fusion.merged import (
    TTA_DATA,
    Layout,
    Mask,
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

PAPER = "https://arxiv.org/abs/2312.06173"
MaskKind = Literal["continuous", "discrete"]


def _common_rules(c: ConcreteTAConfig | ConcreteAdaMergingConfig) -> list[tuple[str, bool, str]]:
    return [
        ("lr", is_number(c.lr) and c.lr >= 0, "a finite number ≥ 0, e.g. 1e-3"),
        ("steps", is_int(c.steps, 0), "an integer ≥ 0"),
        ("temperature", is_number(c.temperature) and c.temperature > 0, "a number > 0"),
        ("init_logits", is_number(c.init_logits), "a finite number, e.g. 0"),
        ("eval_mask", c.eval_mask in ("continuous", "discrete"), "'continuous' or 'discrete'"),
        ("seed", is_int(c.seed, 0), "an integer ≥ 0"),
        ("batches_per_step", is_int(c.batches_per_step, 1), "an integer ≥ 1"),
    ]


@dataclass(frozen=True)
class ConcreteTAConfig:
    """Parameters of ``concrete_ta`` (defaults: FusionBench's ``clip_concrete_task_arithmetic``).

    * ``scaling``: the fixed task-arithmetic coefficient λ (0.3);
    * ``lr``: Adam learning rate on the mask logits (1e-3);
    * ``steps``: mask-learning steps (2000);
    * ``temperature``: relaxed-Bernoulli temperature (0.5);
    * ``init_logits``: starting mask logit of every element (0: keep probability 0.5);
    * ``eval_mask``: the final mask, ``continuous`` (a relaxed sample) or ``discrete`` (0/1);
    * ``seed``: mask samples and the order of the unlabeled batches;
    * ``batches_per_step``: unlabeled batches per task per step (entropies averaged).
    """

    scaling: float = 0.3
    lr: float = 1e-3
    steps: int = 2000
    temperature: float = 0.5
    init_logits: float = 0.0
    eval_mask: MaskKind = "continuous"
    seed: int = 0
    batches_per_step: int = 1

    def __post_init__(self) -> None:
        scaling = ("scaling", is_number(self.scaling), "a finite number, e.g. 0.3")
        check_fields("concrete_ta", self, [scaling, *_common_rules(self)])


@dataclass(frozen=True)
class ConcreteAdaMergingConfig:
    """Parameters of ``concrete_adamerging`` (defaults: FusionBench's
    ``clip_concrete_layer_wise_adamerging``).

    * ``granularity``: coefficients per ``layer`` (fused tensor × task) or per ``task``;
    * ``init``: the coefficients' starting value, and the value they are reset to before every
      inner step (0.3);
    * ``lr``: Adam learning rate on the mask logits (1e-3);
    * ``base_lr``: Adam learning rate of the inner step on λ (1; the moments persist);
    * ``steps``: outer (mask) steps (1000);
    * ``adamerging_lr``, ``adamerging_steps``: the final AdaMerging with the mask fixed (1e-3,
      1000);
    * ``clamp``: clamp λ to [0, 1] before merging (false, as FusionBench);
    * ``temperature``, ``init_logits``, ``eval_mask``, ``seed``, ``batches_per_step``: as in
      ``concrete_ta``.
    """

    granularity: Layout = "layer"
    init: float = 0.3
    lr: float = 1e-3
    base_lr: float = 1.0
    steps: int = 1000
    adamerging_lr: float = 1e-3
    adamerging_steps: int = 1000
    clamp: bool = False
    temperature: float = 0.5
    init_logits: float = 0.0
    eval_mask: MaskKind = "continuous"
    seed: int = 0
    batches_per_step: int = 1

    def __post_init__(self) -> None:
        rules = [
            ("granularity", self.granularity in ("task", "layer"), "'task' or 'layer'"),
            ("init", is_number(self.init), "a finite number, e.g. 0.3"),
            ("base_lr", is_number(self.base_lr) and self.base_lr >= 0, "a finite number ≥ 0"),
            ("adamerging_lr", is_number(self.adamerging_lr) and self.adamerging_lr >= 0,
             "a finite number ≥ 0, e.g. 1e-3"),
            ("adamerging_steps", is_int(self.adamerging_steps, 0), "an integer ≥ 0"),
            ("clamp", isinstance(self.clamp, bool), "true or false"),
        ]  # fmt: skip
        check_fields("concrete_adamerging", self, [*rules, *_common_rules(self)])


def relaxed_bernoulli(logits: Tensor, uniforms: Tensor, temperature: float) -> Tensor:
    """A binary-Concrete sample from given uniforms, computed as torch's ``RelaxedBernoulli``
    ``rsample`` computes it (probabilities and uniforms clamped to [ε, 1 − ε], the sigmoid to
    [tiny, 1 − ε]), so the same generator state gives the same mask."""
    eps = torch.finfo(logits.dtype).eps
    p = torch.sigmoid(logits).clamp(eps, 1 - eps)
    u = uniforms.clamp(eps, 1 - eps)
    x = (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / temperature
    return torch.sigmoid(x).clamp(torch.finfo(x.dtype).tiny, 1 - eps)


def rescale(m: Tensor) -> Tensor:
    """m / mean(m) (a mask with mean 0 is returned as is: it removes the whole task vector)."""
    mean = m.mean()
    return m / torch.where(mean > 0, mean, torch.ones_like(mean))


class ConcreteMask:
    """Mask logits s (one per element of every fused tensor, flat) and their samplers."""

    def __init__(self, model: MergedModel, init_logits: float, seed: int) -> None:
        self.logits = {
            n: torch.full_like(b, float(init_logits)).requires_grad_()
            for n, b in model.base.items()
        }
        self.generator = torch.Generator(device=model.device).manual_seed(seed)

    def parameters(self) -> list[Tensor]:
        return list(self.logits.values())

    def _uniforms(self, s: Tensor) -> Tensor:
        return torch.rand(s.shape, generator=self.generator, device=s.device, dtype=s.dtype)

    def sample(self, temperature: float) -> dict[str, Tensor]:
        """A rescaled relaxed sample, differentiable in s."""
        return {
            n: rescale(relaxed_bernoulli(s, self._uniforms(s), temperature))
            for n, s in self.logits.items()
        }

    @torch.no_grad()
    def final(self, kind: MaskKind, temperature: float) -> dict[str, Tensor]:
        """The evaluation mask: a relaxed sample or a Bernoulli(σ(s)) draw, rescaled."""
        if kind == "continuous":
            return self.sample(temperature)
        return {
            n: rescale(torch.bernoulli(torch.sigmoid(s), generator=self.generator))
            for n, s in self.logits.items()
        }


def _detached(mask: Mask) -> dict[str, Tensor]:
    return {n: m.detach() for n, m in mask.items()}


@torch.no_grad()
def _mask_info(mask: ConcreteMask, final: Mask) -> dict[str, float]:
    """For the model card: the mean keep probability σ(s), the fraction of elements with
    σ(s) > 0.5, and the final mask's smallest and largest values."""
    s = torch.cat(mask.parameters())  # (D,)
    values = torch.cat([m.reshape(-1) for m in final.values()])  # (D,)
    return {
        "keep_probability": float(torch.sigmoid(s).mean()),
        "kept_fraction": float((s > 0).float().mean()),
        "final_min": float(values.min()),
        "final_max": float(values.max()),
    }


def run_ta(
    problem: FusionProblem,
    config: ConcreteTAConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> StaticResult:
    """Concrete task arithmetic (module docstring)."""
    streams = Streams(problem, config.seed, device, "concrete_ta")
    model = MergedModel(problem, device=device)
    lam = model.coefficients("task", config.scaling).requires_grad_(False)  # (T,)
    mask = ConcreteMask(model, config.init_logits, config.seed)

    def objective() -> Tensor:
        params = model.params(lam, mask=mask.sample(config.temperature))
        return model.entropy(params, streams.draw(config.batches_per_step))

    history = train(
        mask.parameters(), objective, lr=config.lr, steps=config.steps, algorithm="concrete_ta",
        lower="the learning rate `lr`", progress=progress,
    )  # fmt: skip
    final = mask.final(config.eval_mask, config.temperature)
    info = {"config": asdict(config), "mask": _mask_info(mask, final)}
    return static_result(
        "concrete_ta", model, lam, clamp=False, mask=final, history=history, info=info
    )


def learn_mask(
    model: MergedModel,
    mask: ConcreteMask,
    streams: Streams,
    config: ConcreteAdaMergingConfig,
    progress: Progress | None,
) -> list[float]:
    """The bi-level mask phase of Concrete AdaMerging (module docstring); returns the outer loss
    of every step."""
    lam = model.coefficients(config.granularity, config.init)  # (T,) or (K, T)
    inner_opt = torch.optim.Adam([lam], lr=config.base_lr)
    outer_opt = torch.optim.Adam(mask.parameters(), lr=config.lr)
    total, n = config.steps + config.adamerging_steps, config.batches_per_step
    lower = "the learning rates `lr` and `base_lr`"
    history: list[float] = []
    for step in range(1, config.steps + 1):
        m = mask.sample(config.temperature)
        with torch.no_grad():
            lam.fill_(config.init)
        inner = model.entropy(
            model.params(lam, mask=_detached(m), clamp=config.clamp), streams.draw(n)
        )
        check_finite(inner.detach(), step, "concrete_adamerging", lower)
        inner_opt.zero_grad(set_to_none=True)
        inner.backward()
        inner_opt.step()
        params = model.params(lam.detach(), mask=m, clamp=config.clamp)
        outer = model.entropy(params, streams.draw(n))
        history.append(check_finite(outer.detach(), step, "concrete_adamerging", lower))
        outer_opt.zero_grad(set_to_none=True)
        outer.backward()
        outer_opt.step()
        if progress is not None:
            progress(step, total, history[-1])
    return history


def run_adamerging(
    problem: FusionProblem,
    config: ConcreteAdaMergingConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> StaticResult:
    """Concrete AdaMerging: learn the mask (bi-level), then AdaMerging with it fixed."""
    streams = Streams(problem, config.seed, device, "concrete_adamerging")
    model = MergedModel(problem, device=device)
    mask = ConcreteMask(model, config.init_logits, config.seed)
    history = learn_mask(model, mask, streams, config, progress)
    final = mask.final(config.eval_mask, config.temperature)
    lam = model.coefficients(config.granularity, config.init)  # (T,) or (K, T)

    def objective() -> Tensor:
        params = model.params(lam, mask=final, clamp=config.clamp)
        return model.entropy(params, streams.draw(config.batches_per_step))

    history += train(
        [lam], objective, lr=config.adamerging_lr, steps=config.adamerging_steps,
        algorithm="concrete_adamerging", lower="the learning rate `adamerging_lr`",
        progress=progress, first=config.steps + 1, total=config.steps + config.adamerging_steps,
    )  # fmt: skip
    info = {"config": asdict(config), "mask": _mask_info(mask, final), "mask_steps": config.steps}
    return static_result(
        "concrete_adamerging", model, lam, clamp=config.clamp, mask=final, history=history,
        info=info,
    )  # fmt: skip


SPECS: tuple[FusionSpec, ...] = (
    FusionSpec(
        name="concrete_ta",
        category="needs-data",
        config=ConcreteTAConfig,
        run=run_ta,
        data=TTA_DATA,
        paper=PAPER,
        doc="task arithmetic through a shared Concrete mask over the task vectors, learned by "
        "test-time entropy",
    ),
    FusionSpec(
        name="concrete_adamerging",
        category="needs-data",
        config=ConcreteAdaMergingConfig,
        run=run_adamerging,
        data=TTA_DATA,
        paper=PAPER,
        doc="meta-learn a shared Concrete mask over the task vectors, then AdaMerging with it",
    ),
)

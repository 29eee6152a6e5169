"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832; the
batch-level estimate and the normalisation follow MergeLM / FusionBench 0.2.33
(``fusion_bench.method.fisher_merging``).

1. For each expert i, over ``examples`` inputs of its own task (no labels: the expectation is
   under the model's own predictive distribution), per batch B:

       p = softmax(logits).detach(),   L_B = Σ_{x∈B} Σ_c sqrt(p_c(x)) · log_softmax(logits(x))_c

   and F_i += (∂L_B/∂θ)² for every fused tensor; finally F_i /= number of examples. (The square
   of the gradient of a summed surrogate, not the exact per-example Fisher: what MergeLM and
   FusionBench compute, one backward pass per batch.)
2. With F̃_i = F_i + ε and model weights c_i (1, or with ``normalize`` 1 / (‖F_i‖₂ + ε), ‖·‖₂
   over all fused tensors of model i):

       θ* = Σ_i c_i F̃_i ⊙ θ_i / Σ_i c_i F̃_i        (full weights θ_i, not task vectors)

   FusionBench scales c_i by 1/N and renormalises the 1/(‖F_i‖+ε) to sum to 1; a factor common
   to every model cancels in the ratio, so we accumulate numerator and denominator as each
   expert's Fisher is done and keep only them and that one Fisher (float32), never T Fishers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mergeforge.errors import FusionError
from mergeforge.fusion.data import FusionProblem, FusionTask, StateDict, batch_size, to_device
from mergeforge.fusion.hooks import body_tensors, example_batches, forward
from mergeforge.fusion.losses import Progress
from mergeforge.fusion.results import StaticResult
from mergeforge.fusion.spec import FusionSpec

PAPER = "https://arxiv.org/abs/2111.09832"


@dataclass(frozen=True)
class FisherConfig:
    """Parameters of ``fisher``.

    * ``examples``: inputs of each task used to estimate its model's Fisher (FusionBench 256;
      all of them when the task has fewer).
    * ``batch_size``: split the task's batches into chunks of at most this many inputs (the
      surrogate's gradient is squared per chunk, so this changes the estimate; FusionBench uses
      32); ``None`` uses the batches as given.
    * ``epsilon``: ε added to every Fisher entry and to the norms (FusionBench
      ``minimal_fisher_weight``), so parameters no input moves are averaged, not divided by 0.
    * ``normalize``: weigh each model by 1 / (‖F_i‖₂ + ε) (FusionBench
      ``normalize_fisher_weight``), so a model with larger gradients does not dominate.
    * ``seed``: order in which a task's batches are read (which inputs, when it has more than
      ``examples``).
    """

    examples: int = 256
    batch_size: int | None = None
    epsilon: float = 1e-6
    normalize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise FusionError(f"fisher: examples={self.examples} must be an integer ≥ 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise FusionError(f"fisher: batch_size={self.batch_size} must be ≥ 1 (or null)")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise FusionError(f"fisher: epsilon={self.epsilon} must be a finite number > 0")


class FisherSums:
    """Running numerator Σ_i c_i F̃_i θ_i and denominator Σ_i c_i F̃_i of every tensor (float32)."""

    def __init__(self, epsilon: float, normalize: bool) -> None:
        self.epsilon, self.normalize = epsilon, normalize
        self.num: dict[str, Tensor] = {}
        self.den: dict[str, Tensor] = {}
        self.weights: list[float] = []

    def add(self, params: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> None:
        """Fold in one model's weights θ_i and Fisher F_i (same keys)."""
        c = 1.0 / (fisher_norm(fisher) + self.epsilon) if self.normalize else 1.0
        self.weights.append(c)
        for name, f in fisher.items():
            weighted = (f.float() + self.epsilon) * c  # (*shape) c_i F̃_i
            theta = params[name].to(weighted.device, torch.float32)  # (*shape)
            if name in self.num:
                self.num[name].addcmul_(weighted, theta)
                self.den[name].add_(weighted)
            else:
                self.num[name], self.den[name] = weighted * theta, weighted

    def result(self) -> dict[str, Tensor]:
        """θ* = numerator / denominator, float32."""
        return {name: self.num[name] / self.den[name] for name in self.num}


def fisher_norm(fisher: Mapping[str, Tensor]) -> float:
    """‖F‖₂ over every tensor of one model (computed in float64)."""
    return math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))


def fisher_merge(
    params: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    *,
    epsilon: float = 1e-6,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """θ* of the module docstring for given weights and Fishers (one dict per model), float32."""
    sums = FisherSums(epsilon, normalize)
    for p, f in zip(params, fishers, strict=True):
        sums.add(p, f)
    return sums.result()


def task_fisher(
    problem: FusionProblem,
    expert: StateDict,
    task: FusionTask,
    batches: Sequence[Mapping[str, Tensor]],
    defaults: Mapping[str, Tensor],
    device: torch.device | str,
    after_batch: Progress | None = None,
) -> dict[str, Tensor]:
    """Σ over ``batches`` of (∂L_B/∂θ)² (not yet divided by the examples), float32, for every
    fused tensor of ``expert`` on ``task``'s inputs through the body and ``task.head``."""
    leaves = {n: expert[n].detach().to(device).requires_grad_(True) for n in problem.names}
    params = {**defaults, **leaves}
    acc = {n: torch.zeros(t.shape, dtype=torch.float32, device=device) for n, t in leaves.items()}
    for k, raw in enumerate(batches):
        batch = to_device(raw, device)
        logits = task.head(forward(problem.body, params, batch), batch).float()  # (N, C)
        logp = torch.log_softmax(logits, dim=-1)  # (N, C)
        surrogate = (logp.exp().detach().sqrt() * logp).sum()
        if not torch.isfinite(surrogate):
            raise FusionError(
                f"fisher: the model of task {task.name!r} gives non-finite logits on batch {k}; "
                "its weights or inputs hold NaN/Inf (or overflow in their dtype)"
            )
        grads = torch.autograd.grad(surrogate, list(leaves.values()), allow_unused=True)
        for name, g in zip(leaves, grads, strict=True):
            if g is not None:
                acc[name].add_(g.float().square())
        if after_batch is not None:
            after_batch(k, len(batches), float(surrogate.detach()) / batch_size(batch))
    return acc


def _check(problem: FusionProblem) -> None:
    for task in problem.tasks:
        task.require("unlabeled", "fisher")
        if task.num_classes < 2:
            raise FusionError(
                f"fisher: task {task.name!r} has {task.num_classes} output(s); the label-free "
                "Fisher needs a classification head with ≥ 2 classes (regression tasks would "
                "need their labels, which this implementation does not use)"
            )


def run(
    problem: FusionProblem,
    config: FisherConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> StaticResult:
    """Fisher-weighted average of the experts (module docstring)."""
    _check(problem)
    plans = [
        example_batches(t.unlabeled, config.examples, config.seed, config.batch_size)
        for t in problem.tasks
    ]
    total, done = sum(len(chunks) for chunks, _ in plans), 0
    defaults = body_tensors(problem.body, device)
    defaults.update({n: t.to(device) for n, t in problem.base.items() if n in defaults})
    sums = FisherSums(config.epsilon, config.normalize)
    norms: dict[str, float] = {}

    def step(_k: int, _n: int, loss: float) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, loss)

    for task, expert, (chunks, used) in zip(problem.tasks, problem.experts, plans, strict=True):
        fisher = task_fisher(problem, expert, task, chunks, defaults, device, step)
        for f in fisher.values():
            f.div_(used)  # F_i: mean over the examples
        norms[task.name] = fisher_norm(fisher)
        sums.add({n: expert[n] for n in problem.names}, fisher)
        del fisher
    merged = sums.result()
    state = {n: merged[n].to(problem.base[n].device, problem.base[n].dtype) for n in problem.names}
    info = {
        "examples": {t.name: used for t, (_, used) in zip(problem.tasks, plans, strict=True)},
        "fisher_norms": norms,
        "model_weights": dict(zip((t.name for t in problem.tasks), sums.weights, strict=True)),
        "config": asdict(config),
    }
    return StaticResult("fisher", state, None, (), info)


SPECS: tuple[FusionSpec, ...] = (
    FusionSpec(
        name="fisher",
        category="needs-data",
        config=FisherConfig,
        run=run,
        data="each task's inputs (labels from the model's own predictions)",
        paper=PAPER,
        doc="average weighted per parameter by each model's diagonal Fisher information",
    ),
)

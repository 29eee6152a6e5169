"""The differentiable merged model shared by the test-time-adaptation algorithms.

For every fused tensor k (a parameter of the body; AdaMerging's "layer") and task t, with θ0 the
pretrained weights, τ_t = θ_t − θ0 the task vectors (or preprocessed ones, e.g. TIES-trimmed for
AdaMerging++), λ the learnable coefficients and m an optional elementwise mask (Concrete):

    θ^k(λ, m) = θ0^k + Σ_t λ_{t,k} (m^k ⊙ τ_t^k) = θ0^k + m^k ⊙ (τ^k)ᵀ λ_{·,k}

Coefficient layouts: ``task`` — λ of shape (T,), the same for every tensor (task-wise
AdaMerging); ``layer`` — λ of shape (K, T), one row per fused tensor (layer-wise AdaMerging; K =
every fused parameter tensor, as FusionBench's ``num_layers``). ``clamp`` clamps λ to [0, 1]
before merging (the original AdaMerging code). Yang et al. 2024, arXiv 2310.02575; the Concrete
mask: Tang et al. 2023, arXiv 2312.06173.

θ0 and the task vectors are frozen and stored flat, ``(n_k,)`` and ``(T, n_k)`` per tensor, so a
tensor is merged by one matrix–vector product and one add (``torch.mv``, then ``+`` or, with a
mask, ``addcmul``) whatever T is, and the backward pass to λ is one more (∂L/∂λ_{t,k} = ⟨∂L/∂θ^k, τ_t^k⟩).
The body runs with ``torch.func.functional_call``: no copy of the model per step, and the body's
own tensors are never touched (parameters that are not fused come from θ0, buffers from the body,
all moved to the device once). The shared trainer (:func:`train`) and the seeded per-task batch
streams (:class:`Streams`) are the rest of the loop every TTA algorithm runs (algorithms §30.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import functional_call

from mergeforge.errors import FusionError
from mergeforge.fusion.data import (
    Batch,
    FusionProblem,
    StateDict,
    cycle,
    task_vectors,
    to_device,
)
from mergeforge.fusion.losses import Progress, check_finite, entropy
from mergeforge.fusion.results import StaticResult
from mergeforge.methods.rng import derive_seed

Layout = Literal["task", "layer"]
Mask = Mapping[str, Tensor]
"""``{fused tensor name: (n_k,)}``: a flat elementwise mask per fused tensor."""

TTA_DATA = "unlabeled test inputs (test-time adaptation)"


class MergedModel:
    """θ(λ, m) of the module docstring over ``problem``'s body, on ``device`` in ``dtype``.

    ``vectors``: ``{name: (T, *shape)}`` task vectors to merge instead of θ_t − θ0 (for
    preprocessed ones); every fused name must be there with the right shape.

    The body runs in the mode it is in (give it in eval mode: dropout would make the entropy
    noisy; FusionBench switches to train mode, harmless for its CLIP bodies, whose dropout is 0),
    and the task heads must already be on ``device``.
    """

    def __init__(
        self,
        problem: FusionProblem,
        *,
        vectors: Mapping[str, Tensor] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.body = problem.body
        self.tasks = problem.tasks
        self.names = problem.names
        self.device = torch.device(device)
        self.dtype = dtype
        vectors = task_vectors(problem) if vectors is None else vectors
        _check_vectors(problem, vectors)
        T = problem.num_tasks
        self.shapes = {n: tuple(problem.base[n].shape) for n in self.names}
        self.out = {n: (problem.base[n].device, problem.base[n].dtype) for n in self.names}
        self.base = {n: problem.base[n].to(self.device, dtype).reshape(-1) for n in self.names}
        self.vectors = {n: vectors[n].to(self.device, dtype).reshape(T, -1) for n in self.names}
        self.frozen = self._frozen(problem)

    def _frozen(self, problem: FusionProblem) -> dict[str, Tensor]:
        """Every parameter that is not fused (from θ0 where it has it) and every buffer."""
        fused = set(self.names)
        out: dict[str, Tensor] = {}
        for name, p in self.body.named_parameters():
            if name not in fused:
                out[name] = self._cast(problem.base.get(name, p).detach())
        for name, b in self.body.named_buffers():
            out[name] = self._cast(b)
        return out

    def _cast(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    def coefficients(self, layout: Layout, value: float) -> Tensor:
        """A learnable λ filled with ``value``: ``(T,)`` for ``task``, ``(K, T)`` for ``layer``."""
        shape = (self.num_tasks,) if layout == "task" else (self.num_tensors, self.num_tasks)
        return torch.full(
            shape, float(value), device=self.device, dtype=self.dtype
        ).requires_grad_()

    def columns(self, coefficients: Tensor, clamp: bool = False) -> tuple[Tensor, ...]:
        """λ_{·,k} ``(T,)`` for every fused tensor k, clamped to [0, 1] when ``clamp``."""
        lam = coefficients.clamp(0.0, 1.0) if clamp else coefficients
        if lam.dim() == 1:
            return (lam,) * self.num_tensors
        return lam.unbind(0)  # K × (T,)

    def params(
        self, coefficients: Tensor, *, mask: Mask | None = None, clamp: bool = False
    ) -> dict[str, Tensor]:
        """Every tensor the body needs: the merged fused tensors θ(λ, m), then the frozen rest."""
        out = dict(self.frozen)
        for name, lam in zip(self.names, self.columns(coefficients, clamp), strict=True):
            m = None if mask is None else mask[name]
            out[name] = merge_tensor(self.base[name], self.vectors[name], lam, m).view(
                self.shapes[name]
            )
        return out

    def forward(self, params: Mapping[str, Tensor], batch: Batch) -> Any:
        """The body's outputs on ``batch`` with ``params`` in place of its tensors."""
        return functional_call(self.body, dict(params), args=(), kwargs=dict(batch))

    def entropy(self, params: Mapping[str, Tensor], batches: Sequence[Sequence[Batch]]) -> Tensor:
        """Σ_t mean_b H(head_t(body(θ; x_b))): ``batches[t]`` are task t's batches (on device).

        When gradients flow into ``params``, each task is backpropagated on its own into
        detached copies of the merged tensors (one task's activations alive at a time, not T),
        and the returned loss carries the summed gradient back to whatever built ``params``
        (λ, mask logits): its value is the entropy sum, its gradient the same as differentiating
        the sum directly."""
        grad_into = [n for n, p in params.items() if p.requires_grad]
        if not (torch.is_grad_enabled() and grad_into):
            return self._entropy_sum(params, batches)
        leaves = {n: p.detach().requires_grad_(n in grad_into) for n, p in params.items()}
        total = torch.zeros(())
        for task, task_batches in zip(self.tasks, batches, strict=True):
            loss = self._task_entropy(task, leaves, task_batches)
            loss.backward()
            total = total + loss.detach().cpu()
        link = sum(
            (params[n] * leaves[n].grad).sum() for n in grad_into if leaves[n].grad is not None
        )
        link = torch.as_tensor(link)
        return link - link.detach() + total.to(link.device)

    def _entropy_sum(
        self, params: Mapping[str, Tensor], batches: Sequence[Sequence[Batch]]
    ) -> Tensor:
        total = None
        for task, task_batches in zip(self.tasks, batches, strict=True):
            loss = self._task_entropy(task, params, task_batches)
            total = loss if total is None else total + loss
        assert total is not None  # a problem has at least one task
        return total

    def _task_entropy(
        self, task: Any, params: Mapping[str, Tensor], batches: Sequence[Batch]
    ) -> Tensor:
        losses = [entropy(task.head(self.forward(params, b), b)) for b in batches]
        return torch.stack(losses).mean() if len(losses) > 1 else losses[0]

    @torch.no_grad()
    def state(
        self, coefficients: Tensor, *, mask: Mask | None = None, clamp: bool = False
    ) -> StateDict:
        """The merged fused tensors, detached, on θ0's device and in θ0's dtype."""
        params = self.params(coefficients.detach(), mask=mask, clamp=clamp)
        return {n: params[n].to(*self.out[n]) for n in self.names}

    def table(self, coefficients: Tensor, clamp: bool = False) -> dict[str, dict[str, float]]:
        """``{task: {tensor: λ_{t,k}}}`` (clamped when ``clamp``): ``StaticResult.coefficients``."""
        cols = [c.detach().cpu().tolist() for c in self.columns(coefficients, clamp)]
        return {
            task.name: {n: float(col[t]) for n, col in zip(self.names, cols, strict=True)}
            for t, task in enumerate(self.tasks)
        }


def merge_tensor(base: Tensor, vectors: Tensor, lam: Tensor, mask: Tensor | None) -> Tensor:
    """θ0 + m ⊙ τᵀλ for one flat tensor: ``base`` (n,), ``vectors`` (T, n), ``lam`` (T,).

    ``mv`` then ``add`` rather than a fused ``addmv``: rounded exactly as the masked path, so a
    mask of ones gives bit-identical weights (and gradients)."""
    direction = torch.mv(vectors.t(), lam)  # (n,)
    return base + direction if mask is None else torch.addcmul(base, mask, direction)  # (n,)


def _check_vectors(problem: FusionProblem, vectors: Mapping[str, Tensor]) -> None:
    T = problem.num_tasks
    for name in problem.names:
        want = (T, *problem.base[name].shape)
        got = vectors.get(name)
        if got is None or tuple(got.shape) != want:
            have = "no tensor" if got is None else f"shape {tuple(got.shape)}"
            raise FusionError(
                f"the task vectors have {have} for {name!r}; the merged model needs {want} "
                "(one task vector per task, stacked)"
            )


class Streams:
    """One endless, seeded, shuffled stream of unlabeled batches per task (``data.cycle``, seeded
    from ``(seed, task name)``), each batch moved to ``device``. ``FusionError`` up front when a
    task has no unlabeled batches."""

    def __init__(
        self, problem: FusionProblem, seed: int, device: torch.device | str, algorithm: str
    ) -> None:
        for task in problem.tasks:
            task.require("unlabeled", algorithm)
        self.device = device
        self._iters = [cycle(t.unlabeled, derive_seed(seed, t.name)) for t in problem.tasks]

    def draw(self, count: int = 1) -> list[list[dict[str, Tensor]]]:
        """``count`` batches of every task: ``out[t][b]``."""
        return [[to_device(next(it), self.device) for _ in range(count)] for it in self._iters]


def train(
    tensors: Sequence[Tensor],
    objective: Callable[[], Tensor],
    *,
    lr: float,
    steps: int,
    algorithm: str,
    lower: str,
    progress: Progress | None = None,
    first: int = 1,
    total: int | None = None,
) -> list[float]:
    """Adam on ``tensors`` for ``steps`` steps of ``objective()`` (which draws its own batches);
    returns the loss of every step. A non-finite loss raises ``FusionError`` naming the step and
    ``lower``. ``first``/``total`` number the steps for ``progress`` when this is one phase of a
    longer run."""
    optimizer = torch.optim.Adam(list(tensors), lr=lr)
    history: list[float] = []
    for step in range(first, first + steps):
        loss = objective()
        history.append(check_finite(loss.detach(), step, algorithm, lower))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, total if total is not None else steps, history[-1])
    return history


def static_result(
    algorithm: str,
    model: MergedModel,
    coefficients: Tensor,
    *,
    clamp: bool,
    mask: Mask | None = None,
    exportable: bool = True,
    history: Sequence[float] = (),
    info: Mapping[str, Any] | None = None,
) -> StaticResult:
    """The ``StaticResult`` of a run: merged state, and the coefficient table when the result is
    θ0 + Σ_t λ_{t,k} τ_t^k on the raw task vectors (``exportable``: no mask, no preprocessing);
    otherwise the table goes to ``info["coefficients"]`` only."""
    table = model.table(coefficients, clamp)
    extra = {"data": TTA_DATA, "coefficients": table, **(info or {})}
    if history:
        extra["final_loss"] = history[-1]
    return StaticResult(
        algorithm,
        model.state(coefficients, mask=mask, clamp=clamp),
        table if exportable and mask is None else None,
        tuple(history),
        extra,
    )


def is_number(x: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: object, low: int) -> bool:
    """An int (not a bool) ≥ ``low``."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def check_fields(algorithm: str, config: object, rules: Sequence[tuple[str, bool, str]]) -> None:
    """``FusionError`` listing every ``(field, ok, allowed)`` rule that fails, with the value."""
    bad = [
        f"`{field}` = {getattr(config, field)!r} (allowed: {allowed})"
        for field, ok, allowed in rules
        if not ok
    ]
    if bad:
        raise FusionError(f"{algorithm}: invalid parameter(s): " + "; ".join(bad))

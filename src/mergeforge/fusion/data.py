"""What every fusion algorithm consumes: a shared body, its weights per model, and task data.

A **fusion problem** is the part the models share (the *body*: an ``nn.Module`` of the common
architecture, e.g. a MiniLM encoder), the pretrained weights θ0 and each task's fine-tuned weights
θ_t of that body (``{parameter name: tensor}``, names as in ``body.named_parameters()``), and per
task its data and head:

* ``head(outputs, batch) -> logits (N, C)`` turns the body's outputs on a batch into that task's
  class logits (FusionBench's protocol: each task keeps its own head, only the body is fused);
* ``unlabeled``: input batches only (test-time adaptation of AdaMerging / Concrete / WEMoE,
  activations for RegMean, inputs for Fisher, which labels with the model's own predictions);
* ``labelled``: ``(batch, labels)`` pairs for what needs labels (Twin-Merging's routing set,
  validation).

Batches are ``{name: tensor}`` keyword inputs of the body (``input_ids``, ``attention_mask``, ...),
first dimension N. The bench's pools and a user's own files both produce these
(``mergeforge.bench``); algorithms never read files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mergeforge.errors import FusionError

Batch = Mapping[str, Tensor]
"""Keyword inputs of the body for one batch; every tensor has the batch size N as dimension 0."""

Head = Callable[[Any, Batch], Tensor]
"""``head(body outputs, batch) -> logits (N, C)`` of one task."""

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class FusionTask:
    """One task: its head and its data (see the module docstring)."""

    name: str
    head: Head
    num_classes: int
    unlabeled: tuple[Batch, ...] = ()
    labelled: tuple[tuple[Batch, Tensor], ...] = ()

    def require(self, what: str, algorithm: str) -> None:
        """``FusionError`` when this task lacks the ``unlabeled``/``labelled`` data ``algorithm``
        needs."""
        if not getattr(self, what):
            raise FusionError(
                f"task {self.name!r} has no {what} batches, and {algorithm} needs them: give the "
                f"task {'inputs (a data file with a text column)' if what == 'unlabeled' else 'a labelled file (text and label columns)'}"
            )


@dataclass(frozen=True)
class FusionProblem:
    """The body, θ0, every task's θ_t (same order as ``tasks``) and the tasks."""

    body: nn.Module
    base: StateDict
    experts: tuple[StateDict, ...]
    tasks: tuple[FusionTask, ...]
    names: tuple[str, ...] = field(default=())
    """Parameter names that are fused (default: every floating-point parameter of ``body``)."""

    def __post_init__(self) -> None:
        if not self.names:
            names = tuple(n for n, p in self.body.named_parameters() if p.is_floating_point())
            object.__setattr__(self, "names", names)
        check_problem(self)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


def check_problem(problem: FusionProblem) -> None:
    """Every task has an expert, and every expert has every fused tensor with θ0's shape."""
    if len(problem.experts) != len(problem.tasks) or not problem.tasks:
        raise FusionError(
            f"a fusion problem needs one fine-tuned model per task and at least one task; got "
            f"{len(problem.experts)} model(s) for {len(problem.tasks)} task(s)"
        )
    for name in problem.names:
        if name not in problem.base:
            raise FusionError(
                f"the pretrained weights have no tensor {name!r} that the body has; the base "
                "model is not of the body's architecture"
            )
        shape = tuple(problem.base[name].shape)
        for task, expert in zip(problem.tasks, problem.experts, strict=True):
            got = expert.get(name)
            if got is None or tuple(got.shape) != shape:
                what = "has no tensor" if got is None else f"has shape {tuple(got.shape)} for"
                raise FusionError(
                    f"the model of task {task.name!r} {what} {name!r} (pretrained: {shape}); "
                    "every model must be fine-tuned from the same base architecture"
                )


def task_vectors(problem: FusionProblem) -> dict[str, Tensor]:
    """``{name: (T, *shape)}``: τ_t = θ_t − θ0 of every fused tensor, stacked over tasks."""
    return {
        n: torch.stack([e[n].float() - problem.base[n].float() for e in problem.experts])
        for n in problem.names
    }


def to_device(batch: Batch, device: torch.device | str) -> dict[str, Tensor]:
    """The batch with every tensor moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def batch_size(batch: Batch) -> int:
    """N, the size of dimension 0 shared by the batch's tensors."""
    return int(next(iter(batch.values())).shape[0])


def cycle(batches: Sequence[Batch], seed: int) -> Iterator[Batch]:
    """Endless stream of ``batches``, reshuffled every pass by a private generator seeded with
    ``seed`` (never the global RNG), so a run is reproducible."""
    if not batches:
        raise FusionError("cannot draw batches from an empty list; the task has no data")
    gen = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[i]


def mean_hidden(outputs: Any, batch: Batch) -> Tensor:
    """``(N, d)``: the mean of the last hidden state over non-padding tokens (or over all tokens
    when the batch has no ``attention_mask``); the features Twin-Merging's router reads."""
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state  # (N, L, d)
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (N, L, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

"""Activation statistics of a body's linear layers, gathered by forward hooks.

RegMean (Jin et al. 2023, arXiv 2212.09849) and RegMean++ (arXiv 2508.03121) need, for every
``nn.Linear`` l of the body, the Gram matrix of its inputs over a task's data:

    G^l = Σ_rows x xᵀ = Xᵀ X,   X = the layer's inputs with batch × sequence flattened into rows

together with the number of rows n (RegMean uses the running mean G / n, as FusionBench does).
:func:`collect_grams` runs the body with given weights (``torch.func.functional_call``, the body's
own tensors are never touched) over batches, with one forward hook per chosen module; the hooks
are removed in a ``finally`` whatever happens.

**Padding.** When the batch has an ``attention_mask`` of shape ``(N, L)`` and a layer's input is
``(N, L, ..., d)``, the rows of padding positions (mask 0) are left out: their activations never
reach a non-padding output, so they say nothing about the task, and counting them would let the
amount of padding in a batch weigh the Gram. Inputs of any other shape (e.g. a pooler's
``(N, d)`` first-token input) count every row. ``include_padding=True`` counts padding rows too,
as FusionBench (which ignores the mask) does.

:func:`example_batches` picks the batches a statistics pass reads: a seeded shuffle of the task's
batches, optionally split into smaller chunks, cut so that exactly ``examples`` inputs are used
(or all of them when the task has fewer).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mergeforge.errors import FusionError
from mergeforge.fusion.data import Batch, batch_size, to_device


@dataclass
class Gram:
    """``total`` = Σ x xᵀ over ``rows`` input rows of one linear layer (float32, ``(d_in, d_in)``)."""

    total: Tensor
    rows: int

    def mean(self) -> Tensor:
        """``XᵀX / n``: FusionBench's running-mean Gram (zeros when no row was seen)."""
        return self.total / max(self.rows, 1)  # (d_in, d_in)


def weight_name(module: str) -> str:
    """The parameter name of a module's weight (``""`` is the body itself)."""
    return f"{module}.weight" if module else "weight"


def linear_modules(body: nn.Module, names: Collection[str] | None = None) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``body`` by module name, in ``named_modules`` order; with ``names``,
    only those whose weight is among them (the fused tensors)."""
    return {
        name: module
        for name, module in body.named_modules()
        if isinstance(module, nn.Linear) and (names is None or weight_name(name) in names)
    }


def body_tensors(body: nn.Module, device: torch.device | str) -> dict[str, Tensor]:
    """Every parameter and buffer of ``body`` (detached, on ``device``): the defaults that the
    values given to :func:`forward` override."""
    out = {n: p.detach().to(device) for n, p in body.named_parameters()}
    out.update({n: b.to(device) for n, b in body.named_buffers()})
    return out


def forward(body: nn.Module, params: Mapping[str, Tensor], batch: Batch) -> Any:
    """The body's outputs on ``batch`` with ``params`` in place of its own tensors."""
    return functional_call(body, dict(params), args=(), kwargs=dict(batch))


class _Stop(Exception):
    """Raised by a hook once every call a pass needs has happened (the rest is not run)."""


@contextmanager
def _hooked(body: nn.Module, modules: Iterable[str], hook: Any) -> Any:
    """Register ``hook(name, module_input)`` on the named modules; always removed on exit."""
    table = dict(body.named_modules())
    handles = []
    try:
        for name in modules:
            if name not in table:
                raise FusionError(f"the body has no module {name!r} to collect activations from")
            handles.append(
                table[name].register_forward_hook(
                    lambda _m, args, kwargs, _out, _n=name: hook(_n, _first_input(args, kwargs)),
                    with_kwargs=True,
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """A linear layer's input, given positionally or by keyword (``linear(input=x)``)."""
    return args[0] if args else next(iter(kwargs.values()))


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """``(rows, d)``: the input flattened over its leading dimensions, padding rows dropped when
    ``mask`` (``(N, L)``) matches the input's first two dimensions."""
    x = x.detach()
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]  # (non-padding positions, ..., d)
    return x.reshape(-1, x.shape[-1])  # (rows, d)


def collect_grams(
    body: nn.Module,
    params: Mapping[str, Tensor],
    batches: Sequence[Batch],
    modules: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    include_padding: bool = False,
    stop_after_calls: int | None = None,
    on_batch: Any = None,
) -> dict[str, Gram]:
    """``{module: Gram}`` of the inputs of ``modules`` while running ``body`` with ``params`` over
    ``batches`` (no gradients). ``stop_after_calls``: end each forward pass once the hooked
    modules were called that many times (the rest of the body is not needed). ``on_batch()`` is
    called after every batch (progress)."""
    grams: dict[str, Gram] = {}
    calls = 0
    mask: Tensor | None = None

    def hook(name: str, x: Tensor) -> None:
        nonlocal calls
        rows = _rows(x, None if include_padding else mask).float()  # (rows, d_in)
        gram = grams.setdefault(name, Gram(rows.new_zeros(rows.shape[1], rows.shape[1]), 0))
        gram.total.addmm_(rows.T, rows)  # (d_in, d_in)
        gram.rows += rows.shape[0]
        calls += 1
        if stop_after_calls is not None and calls >= stop_after_calls:
            raise _Stop

    with torch.no_grad(), _hooked(body, modules, hook):
        for batch in batches:
            batch = to_device(batch, device)
            mask, calls = batch.get("attention_mask"), 0
            with suppress(_Stop):
                forward(body, params, batch)
            if on_batch is not None:
                on_batch()
    for name, gram in grams.items():
        if not torch.isfinite(gram.total).all():
            raise FusionError(
                f"the inputs of layer {name!r} hold NaN/Inf on this task's data; the model's "
                "weights or the inputs are not finite"
            )
    return grams


def call_order(
    body: nn.Module, params: Mapping[str, Tensor], batch: Batch, modules: Sequence[str]
) -> list[str]:
    """The hooked ``modules`` in the order they are called in one forward pass on ``batch``
    (a module called k times appears k times)."""
    seen: list[str] = []
    with torch.no_grad(), _hooked(body, modules, lambda name, _x: seen.append(name)):
        forward(body, params, batch)
    return seen


def _split(batch: Batch, size: int | None) -> list[dict[str, Tensor]]:
    """The batch cut along dimension 0 into chunks of at most ``size`` rows."""
    n = batch_size(batch)
    step = n if size is None else size
    return [{k: v[i : i + step] for k, v in batch.items()} for i in range(0, n, step)]


def example_batches(
    batches: Sequence[Batch], examples: int, seed: int, size: int | None = None
) -> tuple[list[dict[str, Tensor]], int]:
    """``(chunks, n)``: the batches in a seeded shuffled order, each split into chunks of at most
    ``size`` inputs (``None``: as given), the last one cut so that ``n = min(examples, all
    inputs)`` inputs are used."""
    gen = torch.Generator().manual_seed(seed)
    chunks: list[dict[str, Tensor]] = []
    used = 0
    for i in torch.randperm(len(batches), generator=gen).tolist():
        for chunk in _split(batches[i], size):
            take = min(batch_size(chunk), examples - used)
            if take <= 0:
                return chunks, used
            chunks.append({k: v[:take] for k, v in chunk.items()})
            used += take
    return chunks, used

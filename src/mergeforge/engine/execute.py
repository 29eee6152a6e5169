"""Stream a plan: read ahead on a thread, compute on the main thread, hand results to a sink.

Memory is bounded by a byte budget: a tensor's inputs are read only when its estimated working set
(raw inputs, fp32 copies, scratch, output) fits beside the tensors already in flight. A tensor
larger than the budget runs alone (the planner refuses budgets below the largest tensor).
Randomness is drawn from a generator seeded from (seed, tensor name), so the order of execution,
chunking or threading never changes a result.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mergeforge.engine.plan import DTYPES, MergePlan, TensorPlan
from mergeforge.errors import MethodError, NonFiniteError
from mergeforge.io import arch
from mergeforge.methods import Layer, lines_scale, seeded_generator

Sink = Callable[[TensorPlan, torch.Tensor], None]
ArtifactHook = Callable[
    [TensorPlan, list[torch.Tensor], torch.Tensor | None, torch.Tensor, dict | None], None
]
"""Called with (tensor plan, fp32 inputs, fp32 base, fp32 merged, artifacts or None) for every
merged tensor when the method has an ``ArtifactSpec``."""


@dataclass(frozen=True)
class ExecOptions:
    """How to run a plan: ``memory_budget`` bounds the bytes of tensors in flight (``None``: no
    byte bound); at most ``in_flight`` tensors are held at once (one computing, the rest read
    ahead), so reading overlaps computing without holding more than needed."""

    device: str = "cpu"
    seed: int = 0
    memory_budget: int | None = None
    in_flight: int = 2


class ByteBudget:
    """A semaphore over bytes and items; one oversized request is admitted when nothing else is."""

    def __init__(self, limit: int | None, max_items: int) -> None:
        self.limit = limit
        self.max_items = max_items
        self.used = 0
        self.items = 0
        self.cond = threading.Condition()

    def _full(self, n: int) -> bool:
        if not self.items:
            return False
        over_bytes = self.limit is not None and self.used + n > self.limit
        return over_bytes or self.items >= self.max_items

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self.cond:
            while self._full(n):
                if stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.used += n
            self.items += 1
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.items -= 1
            self.cond.notify_all()


def run_plan(
    plan: MergePlan,
    sink: Sink,
    options: ExecOptions,
    on_done: Callable[[TensorPlan], None] | None = None,
    artifact_hook: ArtifactHook | None = None,
) -> None:
    """Compute every tensor of ``plan`` and pass it to ``sink`` in plan order."""
    budget = ByteBudget(options.memory_budget, max(options.in_flight, 1))
    for tp, raw in _prefetch(plan, budget):
        try:
            out = compute_tensor(plan, tp, raw, options, artifact_hook)
            del raw
            sink(tp, out)
        finally:
            budget.release(tp.work_bytes())
        if on_done is not None:
            on_done(tp)


def _prefetch(
    plan: MergePlan, budget: ByteBudget
) -> Iterator[tuple[TensorPlan, list[torch.Tensor]]]:
    """Read the inputs of upcoming tensors on a background thread, in plan order (the budget
    decides how far ahead)."""
    q: queue.Queue = queue.Queue()
    stop = threading.Event()

    def reader() -> None:
        try:
            for tp in plan.tensors:
                if not budget.acquire(tp.work_bytes(), stop):
                    return
                if stop.is_set():
                    return
                q.put((tp, [plan.checkpoints[s.model].read(s.info.name) for s in tp.sources()]))
            q.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)

    thread = threading.Thread(target=reader, name="mergeforge-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def compute_tensor(
    plan: MergePlan,
    tp: TensorPlan,
    raw: list[torch.Tensor],
    options: ExecOptions,
    artifact_hook: ArtifactHook | None = None,
) -> torch.Tensor:
    """One output tensor from its raw inputs (base first, as ``TensorPlan.sources`` orders them)."""
    if tp.op == "copy":
        return raw[0]
    xs = prepare_inputs(plan, tp, raw, options)
    base = xs[0] if tp.base is not None else None
    tensors = xs[1:] if tp.base is not None else xs
    kwargs = dict(tp.params)
    kwargs.update(engine_kwargs(plan, tp, raw))
    if plan.method.stochastic:
        kwargs["generator"] = seeded_generator(options.seed, tp.name)
    arts_spec = plan.method.artifacts
    with_arts = artifact_hook is not None and arts_spec is not None and arts_spec.enabled(tp.params)
    if with_arts:
        kwargs["artifacts"] = True
    try:
        out = plan.method.fn(tensors, base, **kwargs)
    except MethodError as exc:  # say which tensor; the method cannot know its name
        raise MethodError(f"tensor {tp.name!r}: {exc}") from None
    arts = None
    if with_arts:
        out, arts = out
    if plan.recipe.lines is not None and base is not None:
        out = base + lines_scale(Layer(arch.layer_index(tp.name), plan.num_layers),
                                 *plan.recipe.lines) * (out - base)  # fmt: skip
    if artifact_hook is not None and arts_spec is not None:
        artifact_hook(tp, tensors, base, out, arts)
    if tuple(out.shape) != tp.shape:
        raise MethodError(
            f"method {plan.method.name!r} returned shape {list(out.shape)} for tensor "
            f"{tp.name!r}, expected {list(tp.shape)} (a bug in the method)"
        )
    return out.to(device="cpu", dtype=tp.dtype).contiguous()


def engine_kwargs(plan: MergePlan, tp: TensorPlan, raw: list[torch.Tensor]) -> dict[str, object]:
    """The engine-supplied keywords the method asks for (see ``methods.spec``)."""
    wanted = plan.method.engine_kwargs
    out: dict[str, object] = {}
    if "tie_break" in wanted:
        out["tie_break"] = tie_rule(plan, raw)
    if "layer" in wanted:
        out["layer"] = Layer(arch.layer_index(tp.name), plan.num_layers)
    if "name" in wanted:
        out["name"] = tp.name
    return out


def tie_rule(plan: MergePlan, raw: list[torch.Tensor]) -> str:
    """How a top-k trim breaks ties at its cut: mergekit's sort order where mergekit computes
    the same |δ| values (fp32 inputs, fp32 arithmetic), so results are bit-identical; the lowest
    indices otherwise (16-bit merges, where mergekit's arithmetic differs anyway; no sort)."""
    fp32 = all(x.dtype == torch.float32 for x in raw)
    parity = fp32 and plan.recipe.dtype in (None, "float32")
    return "mergekit" if parity and "index_tie_break" not in plan.recipe.opt_ins else "index"


def prepare_inputs(
    plan: MergePlan, tp: TensorPlan, raw: list[torch.Tensor], options: ExecOptions
) -> list[torch.Tensor]:
    """fp32 inputs on the compute device, in ``tp.sources()`` order, checked for NaN/Inf."""
    load_dtype = DTYPES.get(plan.recipe.dtype or "")
    check = "allow_nonfinite" not in plan.recipe.opt_ins
    return [
        _prepare(x, s, tp, load_dtype, options.device, check)
        for x, s in zip(raw, tp.sources(), strict=True)
    ]


def _prepare(x, src, tp: TensorPlan, load_dtype, device: str, check: bool) -> torch.Tensor:
    """Crop (opt-in), round to the recipe's ``dtype`` like mergekit's loader, then fp32."""
    if tp.rows is not None and x.shape[0] != tp.rows:
        x = x[: tp.rows]
    if load_dtype is not None and x.dtype != load_dtype:
        x = x.to(load_dtype)
    x = x.to(device=device, dtype=torch.float32, non_blocking=True)
    if check and not torch.isfinite(x.sum()):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise NonFiniteError(
                f"tensor {src.info.name!r} of model {src.model!r} ({src.info.file}) holds {bad} "
                "NaN/Inf value(s); the checkpoint is broken. Fix or replace it, or opt in to "
                "merging anyway with `mergeforge: {allow_nonfinite: true}` in the recipe"
            )
    return x

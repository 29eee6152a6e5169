"""`merge_continual`: fold the models of a continual method in one at a time, in constant memory.

A continual method (``MethodSpec.continual``, e.g. OPCM) sees the models in recipe order. The
running merge ``θ^(t)`` lives on disk between steps (float32 safetensors in a work directory inside
the atomic output directory); step ``t`` is one streaming pass that, tensor by tensor, reads the
base, the running merge and the incoming model, computes the method's per-tensor step and writes
the new running merge. At most those three input tensors of one name (plus the step's output and
the method's scratch) are in memory at once, whatever the number of models.

Whole-model statistics are accumulated during the pass: the incoming task-vector norm ``n_t``
(and ``n_1`` on the first pass) and the norm ``m`` of the new merged task vector. The global
rescale ``θ0 + (θ − θ0) · n̄ / m`` is applied lazily, when the running merge is next read (by the
next step or the final pass), so each step is one pass. A last pass writes the output model in
the output dtype; with ``save_steps`` every ``θ^(t)`` also goes to ``OUT/steps/step-<t>/`` as a
loadable model directory (``t`` = models folded in so far, 1-based: ``step-1`` is the first model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergeforge.config import Recipe, load_recipe
from mergeforge.engine.execute import ExecOptions, prepare_inputs
from mergeforge.engine.output import (
    HashInputs,
    MergeResult,
    check_device,
    check_output_dir,
    write_card,
    write_side_files,
)
from mergeforge.engine.plan import MergePlan, Source, TensorPlan, build_plan
from mergeforge.errors import MethodError, PlanError
from mergeforge.io import Checkpoint, ShardedWriter, atomic_output_dir, open_checkpoint
from mergeforge.methods.opcm import rescale_factor

SHARD_SIZE = 5 * 10**9
WORK_DIR = ".continual-work"


def merge_continual(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    save_steps: bool = False,
    shard_size: int = SHARD_SIZE,
) -> MergeResult:
    """Merge ``recipe`` (a continual method) into ``out_dir``, folding its models in one by one."""
    t0 = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    plan = build_plan(recipe)
    try:
        _check_continual(plan)
        check_device(device)
        with atomic_output_dir(out, overwrite) as tmp:
            hashes = HashInputs(plan)
            options = ExecOptions(device=device, seed=seed)
            with tqdm(total=_passes(plan) * len(plan.tensors), desc=f"{plan.method.name}",
                      unit="tensor", disable=not progress, dynamic_ncols=True) as bar:  # fmt: skip
                fold = _Fold(plan, options, tmp, save_steps, bar, shard_size)
                fold.run()
            write_side_files(plan, tmp)
            write_card(plan, tmp, hashes.result())
            files = tuple(sorted(p.name for p in tmp.iterdir()))
    finally:
        plan.close()
    return MergeResult(
        out, files, len(plan.tensors), fold.bytes_read, fold.bytes_written,
        time.perf_counter() - t0,
    )  # fmt: skip


def _check_continual(plan: MergePlan) -> None:
    spec = plan.method
    if not spec.continual:
        raise MethodError(
            f"merge_method {spec.name!r} is not a continual method; run it with `merge` "
            "(merge_continual folds models one at a time for methods such as opcm)"
        )
    if plan.recipe.slices:
        raise PlanError(
            f"cannot merge {plan.recipe.path or 'the recipe'}",
            [
                f"{spec.name} folds whole models in recipe order: list them under `models:` "
                "(one base_model), not `slices:`"
            ],
        )


def _num_models(plan: MergePlan) -> int:
    return max((len(t.inputs) for t in plan.tensors if t.op == "merge"), default=0)


def _passes(plan: MergePlan) -> int:
    """Streaming passes: one per step t = 2..T, plus the final write."""
    return max(_num_models(plan) - 1, 0) + 1


@dataclass(frozen=True)
class _Running:
    """The running merge ``θ^(t)``: stored values (``store``; ``None``: the first model itself,
    read from its own checkpoint) and the rescale ``n̄ / m`` still to apply (``None``: none)."""

    store: Checkpoint | None
    scale: float | None
    lam: float


class _Fold:
    """The passes of one continual merge, with the whole-model norms between them."""

    def __init__(
        self,
        plan: MergePlan,
        options: ExecOptions,
        tmp: Path,
        save_steps: bool,
        bar: tqdm,
        shard_size: int = SHARD_SIZE,
    ) -> None:
        self.plan = plan
        self.options = options
        self.tmp = tmp
        self.work = tmp / WORK_DIR
        self.steps = tmp / "steps" if save_steps else None
        self.bar = bar
        self.shard_size = shard_size
        self.norms: list[float] = []
        self.bytes_read = 0
        self.bytes_written = 0
        self.merged = [t for t in plan.tensors if t.op == "merge"]
        self.running_entries = [(t.name, torch.float32, t.shape) for t in self.merged]
        self.out_entries = [(t.name, t.dtype, t.shape) for t in plan.tensors]

    def run(self) -> None:
        """Steps 2..T, then the final pass; the work directory is removed afterwards."""
        self.work.mkdir()
        running = _Running(None, None, 1.0)
        for i in range(1, _num_models(self.plan)):
            running = self._step(i, running)
            for done in (0, i) if i == 1 else (i,):  # folded in: never read again
                self._release_model(done)
        with ShardedWriter(self.tmp, self.out_entries, self.shard_size, metadata=_meta()) as out:
            step = self._step_writer(_num_models(self.plan))
            with _aborting(step):
                for tp in self.plan.tensors:
                    self._final_one(tp, running, out, step)
            self._finish_step(step)
        self.bytes_written += sum(t.out_bytes() for t in self.plan.tensors)
        _close(running)
        shutil.rmtree(self.work)

    # one step ---------------------------------------------------------------------------------
    def _step(self, i: int, running: _Running) -> _Running:
        """Fold model ``i`` (0-based, ``i ≥ 1``) into ``θ^(i)``: one pass, returns ``θ^(i+1)``."""
        dest = self.work / f"run-{i % 2}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        sums = [0.0, 0.0, 0.0]  # ‖θ^(1) − θ0‖² (first pass only), ‖τ_new‖², ‖out − θ0‖²
        step = self._step_writer(i)
        with ShardedWriter(dest, self.running_entries, self.shard_size) as writer, _aborting(step):
            for tp in self.plan.tensors:
                if tp.op == "merge":
                    self._step_one(tp, i, running, writer, step, sums)
                elif step is not None:
                    step.write(tp.name, self._read(tp.sources()[0]))
                self.bar.update(1)
        self._finish_step(step)
        self.bytes_written += sum(4 * math.prod(t.shape) for t in self.merged)
        _close(running)
        if i == 1:
            self.norms.append(math.sqrt(sums[0]))
        self.norms.append(math.sqrt(sums[1]))
        lam, scale = rescale_factor(self.norms, math.sqrt(sums[2]))
        return _Running(open_checkpoint(dest), scale, lam)

    def _step_one(
        self, tp: TensorPlan, i: int, running: _Running, writer: ShardedWriter,
        step: ShardedWriter | None, sums: list[float],
    ) -> None:  # fmt: skip
        """One tensor of step ``i``: base, running and incoming in, new running out."""
        base = self._load(tp, tp.base)
        theta = self._running(tp, base, running)
        if step is not None:
            step.write(tp.name, theta.to(device="cpu", dtype=tp.dtype))
        incoming = self._load(tp, tp.inputs[i])
        if i == 1:
            sums[0] += _sq_dist(theta, base)
        sums[1] += _sq_dist(incoming, base)
        params = {**tp.params, "merged": theta, "lambda_prev": running.lam, "name": tp.name}
        try:
            out = self.plan.method.fn([incoming], base, **params)
        except MethodError as exc:
            raise MethodError(f"tensor {tp.name!r}: {exc}") from None
        del theta, incoming
        sums[2] += _sq_dist(out, base)
        writer.write(tp.name, out.to("cpu"))

    def _final_one(
        self, tp: TensorPlan, running: _Running, out: ShardedWriter, step: ShardedWriter | None
    ) -> None:
        """One output tensor: ``θ^(T)`` rescaled, in the output dtype (or a copied tensor)."""
        if tp.op == "copy":
            value = self._read(tp.sources()[0])
        else:
            base = self._load(tp, tp.base)
            value = self._running(tp, base, running).to(device="cpu", dtype=tp.dtype)
        out.write(tp.name, value)
        if step is not None:
            step.write(tp.name, value)
        self.bar.update(1)

    # reading ----------------------------------------------------------------------------------
    def _read(self, src: Source | None) -> torch.Tensor:
        assert src is not None  # base="required": the planner guarantees a base
        self.bytes_read += src.info.nbytes
        return self.plan.checkpoints[src.model].read(src.info.name)

    def _load(self, tp: TensorPlan, src: Source | None) -> torch.Tensor:
        """``src``'s tensor as the engine prepares inputs: cropped, rounded, fp32, checked."""
        raw = self._read(src)
        one = dataclasses.replace(tp, base=None, inputs=(src,))
        return prepare_inputs(self.plan, one, [raw], self.options)[0]

    def _running(self, tp: TensorPlan, base: torch.Tensor, running: _Running) -> torch.Tensor:
        """``θ^(t)`` of one tensor: the stored value, rescaled lazily ``θ0 + (θ − θ0) · n̄/m``."""
        if running.store is None:
            return self._load(tp, tp.inputs[0])
        stored = running.store.read(tp.name).to(self.options.device)  # fp32
        self.bytes_read += stored.numel() * 4
        if running.scale is None:
            return stored
        return base + (stored - base) * running.scale

    def _release_model(self, i: int) -> None:
        """Close model ``i``'s files once no later step reads it (keeps open files bounded)."""
        if not self.merged:
            return
        label = self.merged[0].inputs[i].model
        later = {s.model for s in self.merged[0].inputs[i + 1 :]}
        if label not in later and label != self.plan.base:
            self.plan.checkpoints[label].close()

    # saved steps ------------------------------------------------------------------------------
    def _step_writer(self, t: int) -> ShardedWriter | None:
        """A writer for ``steps/step-<t>/`` (``θ^(t)``), or ``None`` without ``save_steps``."""
        if self.steps is None:
            return None
        path = self.steps / f"step-{t}"
        path.mkdir(parents=True)
        return ShardedWriter(path, self.out_entries, self.shard_size, metadata=_meta())

    def _finish_step(self, step: ShardedWriter | None) -> None:
        if step is None:
            return
        step.close()
        write_side_files(self.plan, step.directory)
        self.bytes_written += sum(t.out_bytes() for t in self.plan.tensors)


@contextlib.contextmanager
def _aborting(step: ShardedWriter | None) -> Iterator[None]:
    """Close a step's writer without its checks when the pass fails (the output is discarded)."""
    try:
        yield
    except BaseException:
        if step is not None:
            step.abort()
        raise


def _meta() -> dict[str, str]:
    from mergeforge import __version__

    return {"mergeforge": __version__}


def _close(running: _Running) -> None:
    if running.store is not None:
        running.store.close()


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖²`` (a float32 norm, as FusionBench's ``get_task_vector_norm``), squared."""
    return float(torch.linalg.vector_norm(a - b)) ** 2

"""`merge`: plan, then stream into a temporary sibling of OUT_DIR, then rename into place.

The output directory gets the merged weights (sharded safetensors + index), ``config.json`` from
the base (or first) model with the output dtype, tokenizer and generation files from the base or
``tokenizer_source``, and a ``README.md`` model card (recipe, version, method reference, sha256 of
every input file, opt-ins that changed behaviour). A failure, Ctrl-C or SIGTERM leaves no output.

Variants: reversible methods also write ``artifacts/`` (``engine.artifacts``); factor-space merges
of LoRA adapters write a PEFT adapter (``engine.factor_space``); continual methods are handed to
``engine.continual.merge_continual``.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from mergeforge import __version__
from mergeforge.config import Recipe, load_recipe
from mergeforge.engine.artifacts import ArtifactSaver, wants_artifacts
from mergeforge.engine.continual import merge_continual
from mergeforge.engine.execute import ExecOptions, run_plan
from mergeforge.engine.factor_space import ADAPTER_FILE, adapter_output_config, factor_mode
from mergeforge.engine.global_pass import with_global_stats
from mergeforge.engine.output import (
    HashInputs,
    MergeResult,
    check_device,
    check_output_dir,
    write_card,
    write_side_files,
)
from mergeforge.engine.pcb_pass import with_pcb_stats
from mergeforge.engine.plan import MergePlan, build_plan
from mergeforge.errors import OutputError, PlanError
from mergeforge.io import ShardedWriter, atomic_output_dir, write_json
from mergeforge.methods import find_method


def merge(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    memory_budget: int | None = None,
    shard_size: int = 5 * 10**9,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    save_steps: bool = False,
) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir`` (a Hugging Face model directory).

    Continual methods (``opcm``) run through ``merge_continual`` (``save_steps``: also write the
    running merge after each model to ``OUT/steps/step-<t>/``)."""
    t0 = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    spec = find_method(recipe.merge_method)
    if spec is not None and spec.continual:
        return merge_continual(recipe, out_dir, device=device, seed=seed, overwrite=overwrite,
                               progress=progress, save_steps=save_steps, shard_size=shard_size)  # fmt: skip
    if save_steps:
        raise OutputError(
            f"--save-steps writes the running merge of a continual method (opcm); "
            f"{recipe.merge_method!r} merges all models at once. Drop --save-steps"
        )
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    plan = build_plan(recipe)
    try:
        _check_budget(plan, memory_budget)
        check_device(device)
        with atomic_output_dir(out, overwrite) as tmp:
            hashes = HashInputs(plan)
            entries = [(t.name, t.dtype, t.shape) for t in plan.tensors]
            budget = plan.default_budget() if memory_budget is None else memory_budget
            options = ExecOptions(device=device, seed=seed, memory_budget=budget)
            plan = with_pcb_stats(with_global_stats(plan, options), options)
            meta = {"mergeforge": __version__}
            factors = factor_mode(plan.recipe)
            size = 2**62 if factors else shard_size  # an adapter is one file
            writer = ShardedWriter(tmp, entries, size, metadata=meta)
            saver = _artifact_saver(plan, tmp, shard_size)
            hook = saver.add if saver is not None else None
            with writer, _progress(plan, progress) as done:
                run_plan(plan, lambda tp, x: writer.write(tp.name, x), options, done, hook)
            errors = _finish_artifacts(plan, saver)
            if factors:
                _finish_adapter(plan, tmp)
            write_side_files(plan, tmp)
            write_card(plan, tmp, hashes.result(), errors)
            files = tuple(sorted(p.name for p in tmp.iterdir()))
    finally:
        plan.close()
    return MergeResult(
        out, files, len(plan.tensors), plan.bytes_read, plan.bytes_written,
        time.perf_counter() - t0, errors,
    )  # fmt: skip


def _finish_adapter(plan: MergePlan, tmp: Path) -> None:
    """Factor-space merges write a PEFT adapter: rename the weights, add adapter_config.json."""
    (tmp / "model.safetensors").rename(tmp / ADAPTER_FILE)
    base = plan.paths.get(plan.base) if plan.base else None
    write_json(
        tmp / "adapter_config.json", adapter_output_config(plan.checkpoints, plan.models, base)
    )


def _artifact_saver(plan: MergePlan, tmp: Path, shard_size: int) -> ArtifactSaver | None:
    if not any(wants_artifacts(plan, t) for t in plan.tensors):
        return None
    return ArtifactSaver(plan, tmp, shard_size)


def _finish_artifacts(
    plan: MergePlan, saver: ArtifactSaver | None
) -> tuple[tuple[str, float], ...]:
    if saver is None:
        return ()
    saver.finish()
    return tuple(zip(plan.models, saver.rel_errors(), strict=True))


def _check_budget(plan: MergePlan, budget: int | None) -> None:
    if budget is None:
        return
    need = plan.largest_tensor_bytes
    if budget < need:
        big = max(plan.tensors, key=lambda t: t.work_bytes())
        raise PlanError(
            "memory budget too small",
            [
                f"--memory-budget {budget / 2**20:.0f} MiB is below the "
                f"{need / 2**20:.0f} MiB needed to merge tensor {big.name!r} (its inputs, fp32 "
                f"copies and scratch); raise the budget to at least {need / 2**20:.0f} MiB"
            ],
        )


class _progress:
    """A tqdm bar over bytes written, counting tensors in the postfix."""

    def __init__(self, plan: MergePlan, enabled: bool) -> None:
        self.plan = plan
        self.enabled = enabled

    def __enter__(self):
        n = len(self.plan.tensors)
        self.bar = tqdm(
            total=self.plan.bytes_written, unit="B", unit_scale=True, unit_divisor=1024,
            desc="merging", disable=not self.enabled, dynamic_ncols=True,
        )  # fmt: skip
        self.count = 0

        def done(tp) -> None:
            self.count += 1
            self.bar.update(tp.out_bytes())
            if self.count % 16 == 0 or self.count == n:
                self.bar.set_postfix_str(f"{self.count}/{n} tensors", refresh=False)

        return done

    def __exit__(self, *exc) -> None:
        self.bar.close()


def plan_recipe(recipe: Recipe | str | Path) -> MergePlan:
    """Load (if needed) and plan a recipe; the caller must ``close()`` the plan."""
    return build_plan(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))

"""`merge`: plan, then stream into a temporary sibling of OUT_DIR, then rename into place.

The output directory gets the merged weights (sharded safetensors + index), ``config.json`` from
the base (or first) model with the output dtype, tokenizer and generation files from the base or
``tokenizer_source``, and a ``README.md`` model card (recipe, version, method reference, sha256 of
every input file, opt-ins that changed behaviour). A failure, Ctrl-C or SIGTERM leaves no output.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergeforge import __version__
from mergeforge.config import OPT_INS, Recipe, load_recipe
from mergeforge.engine.artifacts import ArtifactSaver, wants_artifacts
from mergeforge.engine.execute import ExecOptions, run_plan
from mergeforge.engine.factor_space import ADAPTER_FILE, adapter_output_config, factor_mode
from mergeforge.engine.global_pass import with_global_stats
from mergeforge.engine.models import resolve_path
from mergeforge.engine.pcb_pass import with_pcb_stats
from mergeforge.engine.plan import MergePlan, build_plan
from mergeforge.errors import OutputError, PlanError
from mergeforge.io import (
    ShardedWriter,
    arch,
    atomic_output_dir,
    copy_side_files,
    render_model_card,
    sha256_file,
    write_json,
)


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote and how long it took."""

    out_dir: Path
    files: tuple[str, ...]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    rel_errors: tuple[tuple[str, float], ...] = ()
    """Reversible merges: each input's relative reconstruction error (``mergeforge recover``)."""


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
) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir`` (a Hugging Face model directory)."""
    t0 = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    plan = build_plan(recipe)
    try:
        _check_budget(plan, memory_budget)
        _check_device(device)
        with atomic_output_dir(out, overwrite) as tmp:
            hashes = _HashInputs(plan)
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
            _write_side_files(plan, tmp)
            _write_card(plan, tmp, hashes.result(), errors)
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


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OutputError(
            f"--device {device}: CUDA is not available on this machine (torch "
            f"{torch.__version__}); use --device cpu"
        )
    if not (device == "cpu" or device.startswith("cuda")):
        raise OutputError(f"--device {device!r} is not supported; use cpu or cuda[:N]")


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


class _HashInputs:
    """sha256 of every input file, computed on a background thread during the merge."""

    def __init__(self, plan: MergePlan) -> None:
        files = sorted({f for ck in plan.checkpoints.values() for f in ck.files})
        self.hashes: dict[Path, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(files,), daemon=True)
        self.thread.start()

    def _run(self, files: list[Path]) -> None:
        try:
            for f in files:
                self.hashes[f] = sha256_file(f)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self) -> dict[Path, str]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.hashes


def _output_config(plan: MergePlan) -> dict | None:
    ref = plan.checkpoints[plan.reference]
    if ref.config is None:
        return None
    cfg = copy.deepcopy(ref.config)
    if plan.recipe.slices and plan.num_layers is not None:  # layer stacking changes the depth
        arch.set_num_layers(cfg, plan.num_layers)
    wanted = plan.recipe.out_dtype or plan.recipe.dtype
    if wanted:  # as mergekit: recorded only when the recipe sets a dtype
        cfg["dtype"] = wanted
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = wanted
    return cfg


def _write_side_files(plan: MergePlan, tmp: Path) -> None:
    cfg = _output_config(plan)
    if cfg is not None:
        write_json(tmp / "config.json", cfg)
    src = _tokenizer_dir(plan)
    if src is not None:
        copy_side_files(src, tmp)


def _tokenizer_dir(plan: MergePlan) -> Path | None:
    label = plan.recipe.tokenizer_source
    if label in (None, "base"):
        path = plan.paths.get(plan.reference)
    else:
        path, problem = resolve_path(label, plan.recipe.path.parent if plan.recipe.path else None)
        if problem:
            raise PlanError("tokenizer_source", [problem])
    if path is None:
        return None
    return path if path.is_dir() else path.parent


def _write_card(
    plan: MergePlan,
    tmp: Path,
    hashes: dict[Path, str],
    rel_errors: tuple[tuple[str, float], ...] = (),
) -> None:
    spec = plan.method
    opt_ins = [f"{o}: {OPT_INS[o]}" for o in plan.opt_ins_used]
    if plan.recipe.lines is not None:
        a, b = plan.recipe.lines
        opt_ins.append(f"lines: LiNeS post-scaling, out = b + ({a:g} + {b:g}·ℓ/(L−1))·(merged − b)")
    text = render_model_card(
        recipe_yaml=plan.recipe.text or f"merge_method: {spec.name}\n",
        version=__version__,
        methods=[(spec.name, spec.paper)],
        inputs=[(str(f), h) for f, h in sorted(hashes.items())],
        opt_ins=opt_ins,
        base_model=plan.base,
        reversible=[(m, f"{e:.3g}") for m, e in rel_errors],
    )
    (tmp / "README.md").write_text(text, encoding="utf-8")


def plan_recipe(recipe: Recipe | str | Path) -> MergePlan:
    """Load (if needed) and plan a recipe; the caller must ``close()`` the plan."""
    return build_plan(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early when ``out`` cannot become the output directory."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file; give a directory path")
    if out.exists() and not overwrite:
        raise OutputError(
            f"output directory {out} already exists; pass --overwrite to replace it or choose "
            "another directory"
        )

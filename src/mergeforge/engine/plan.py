"""Plan a merge: resolve every output tensor before a single tensor byte is read.

``build_plan`` opens every checkpoint's index (headers only), checks the method and its parameters,
matches tensors across models (names, shapes, dtypes, tied weights, vocabulary sizes), resolves the
parameters of every tensor (gradients by layer position, filters by name), and estimates peak memory
and bytes to read and write. All problems are collected and raised as one ``PlanError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mergeforge.config import Recipe
from mergeforge.engine.factor_space import factor_mode, open_factor_models
from mergeforge.engine.layout import Job, jobs_for, make_groups, output_layers
from mergeforge.engine.models import open_models
from mergeforge.engine.params import check_params, resolve_params
from mergeforge.errors import PlanError
from mergeforge.io import Checkpoint, TensorInfo, arch
from mergeforge.methods import REGISTRY, MethodSpec, find_method, method_names

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
SCRATCH_TENSORS = 3  # fp32 tensor-sized buffers a method needs besides its inputs (estimate)
MAX_LISTED = 8
MIN_DEFAULT_BUDGET = 512 * 2**20
RUNTIME_OVERHEAD = 300 * 2**20  # interpreter, torch and its allocator, measured order of size


@dataclass(frozen=True)
class Source:
    """One input tensor: which model, which tensor name in it, and where its bytes are."""

    model: str
    info: TensorInfo
    note: str = ""


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made: merged from sources, or copied from one."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    op: Literal["merge", "copy"]
    inputs: tuple[Source, ...]
    base: Source | None
    params: Mapping[str, object] = field(default_factory=dict)
    rows: int | None = None  # crop inputs to this many rows (opt-in truncate_embeddings)
    note: str = ""

    def sources(self) -> tuple[Source, ...]:
        """Every input tensor read for this output, base first."""
        return ((self.base,) if self.base else ()) + self.inputs

    def in_bytes(self) -> int:
        """Bytes read from disk for this tensor."""
        return sum(s.info.nbytes for s in self.sources())

    def out_bytes(self) -> int:
        """Bytes written for this tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    def work_bytes(self) -> int:
        """Estimated memory while this tensor is in flight: raw inputs, their fp32 copies (none
        for fp32 inputs), method scratch and the output."""
        numel = 1
        for d in self.shape:
            numel *= d
        if self.op == "copy":
            return self.in_bytes()
        converted = sum(1 for s in self.sources() if s.info.dtype != torch.float32 or self.rows)
        return self.in_bytes() + 4 * numel * (converted + SCRATCH_TENSORS) + self.out_bytes()


@dataclass(frozen=True)
class MergePlan:
    """The whole merge, resolved: what the executor runs and what `mergeforge plan` prints."""

    recipe: Recipe
    method: MethodSpec
    base: str | None
    models: tuple[str, ...]
    checkpoints: Mapping[str, Checkpoint]
    paths: Mapping[str, Path]
    tensors: tuple[TensorPlan, ...]
    reference: str
    num_layers: int | None
    opt_ins_used: tuple[str, ...]

    @property
    def bytes_read(self) -> int:
        return sum(t.in_bytes() for t in self.tensors)

    @property
    def bytes_written(self) -> int:
        return sum(t.out_bytes() for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.work_bytes() for t in self.tensors), default=0)

    def default_budget(self) -> int:
        """Bytes in flight when ``--memory-budget`` is not given: room for the largest tensor
        (so the big ones never overlap), at least ``MIN_DEFAULT_BUDGET`` (small tensors overlap)."""
        return max(self.largest_tensor_bytes, MIN_DEFAULT_BUDGET)

    def peak_bytes(self, budget: int | None = None) -> int:
        """Estimated peak memory: the tensors in flight (at most two, together within the budget
        unless one alone exceeds it) plus a fixed overhead for the interpreter and torch."""
        limit = self.default_budget() if budget is None else budget
        sizes = [*sorted((t.work_bytes() for t in self.tensors), reverse=True), 0, 0]
        return max(sizes[0], min(limit, sizes[0] + sizes[1])) + RUNTIME_OVERHEAD

    def close(self) -> None:
        """Close every checkpoint file handle."""
        for ck in {id(c): c for c in self.checkpoints.values()}.values():
            ck.close()


def build_plan(recipe: Recipe) -> MergePlan:
    """Resolve the recipe into a ``MergePlan`` or raise ``PlanError`` listing every problem."""
    problems: list[str] = []
    spec = find_method(recipe.merge_method)
    if spec is None:
        known = ", ".join(method_names())
        raise PlanError(
            _what(recipe), [f"unknown merge_method {recipe.merge_method!r}; known methods: {known}"]
        )
    if factor_mode(recipe):
        ckpts, paths, open_problems = open_factor_models(recipe, recipe.model_paths())
        if not spec.factor_space:
            open_problems.insert(0, _not_factor_space(spec))
        elif spec.base == "unused" and recipe.base_model:
            open_problems.insert(0, f"{spec.name} takes no base model; in factor space it would "
                                 "average in zero factors. Remove `base_model:`")  # fmt: skip
    else:
        ckpts, paths, open_problems = open_models(recipe, recipe.model_paths())
    problems += open_problems
    groups = make_groups(recipe, spec, paths, problems)
    for g in groups:
        pairs = [(m.model, m.parameters) for m in g.inputs]
        problems += check_params(spec, {**recipe.parameters, **g.params}, pairs)
    if recipe.lines is not None and any(g.base is None for g in groups):
        problems.append(
            "`mergeforge.lines` scales the merged task vector (merged − base), so it needs "
            "`base_model:`; add one or remove `lines`"
        )
    problems = list(dict.fromkeys(problems))  # the same problem once, even if every slice has it
    if problems or any(lb not in ckpts for g in groups for lb in g.labels):
        raise PlanError(_what(recipe), problems)
    jobs = jobs_for(recipe, groups, ckpts, problems)
    tensors = [t for job in jobs if (t := _plan_job(recipe, spec, job, ckpts, problems))]
    _trim_listing(problems)
    if problems:
        raise PlanError(_what(recipe), problems)
    inputs = tuple(dict.fromkeys(m.model for g in groups for m in g.inputs))
    reference = groups[0].labels[0]
    n_layers = output_layers(recipe, groups) or arch.num_layers(ckpts[reference].config)
    used = tuple(sorted(recipe.opt_ins))
    return MergePlan(recipe, spec, groups[0].base, inputs, ckpts, paths, tuple(tensors),
                     reference, n_layers, used)  # fmt: skip


def _not_factor_space(spec: MethodSpec) -> str:
    ok = ", ".join(s.name for s in REGISTRY if s.factor_space)
    return (
        f"method {spec.name!r} cannot merge LoRA factors (`factor_space: true`); methods that can: "
        f"{ok}. Or merge the adapters in weight space (drop `factor_space`)"
    )


def _what(recipe: Recipe) -> str:
    return f"cannot merge {recipe.path}" if recipe.path else "cannot merge"


def _plan_job(recipe, spec, job: Job, ckpts, problems: list[str]) -> TensorPlan | None:
    g = job.group
    sources = {}
    for lb in g.labels:
        src = _find_source(job.reads[lb], lb, ckpts[lb], problems)
        if src is not None:
            sources[lb] = src
    if len(sources) != len(g.labels):
        return None
    labels = [m.model for m in g.inputs]
    plan = _plan_one(recipe, job.name, sources, g.base, labels, problems)
    if plan is None or plan.op != "merge":
        return plan
    params, rp = resolve_params(spec, job.global_levels, job.model_levels, job.name, job.t)
    problems.extend(rp[:1])
    if spec.check is not None and not rp:
        problems.extend(f"tensor {job.name!r}: {p}" for p in spec.check(params)[:1])
    return dataclasses.replace(plan, params=params)


def _find_source(name: str, label: str, ck: Checkpoint, problems: list[str]) -> Source | None:
    if name in ck.tensors:
        return Source(label, ck.tensors[name])
    tied = arch.tied_source(name, ck.tensors)
    if tied and arch.ties_word_embeddings(ck.config):
        return Source(label, ck.tensors[tied], note=f"tied to {tied}")
    problems.append(
        f"tensor {name!r} is missing from model {label!r} ({ck.root}); every model must have "
        "every tensor of the reference model"
    )
    return None


def _plan_one(recipe, name, sources, base, labels, problems) -> TensorPlan | None:
    first = sources[base] if base else sources[labels[0]]
    info = first.info
    if not info.dtype.is_floating_point:
        return TensorPlan(name, info.shape, info.dtype, "copy", (), first,
                          note=f"non-float tensor copied from {first.model}")  # fmt: skip
    rows = _check_shapes(recipe, name, sources, problems)
    if rows is False:
        return None
    shape = info.shape if rows is None else (rows, *info.shape[1:])
    want = recipe.out_dtype or recipe.dtype
    dtype = DTYPES[want] if want else info.dtype
    for s in sources.values():
        if not s.info.dtype.is_floating_point:
            problems.append(f"tensor {name!r}: float in one model, {s.info.dtype} in {s.model!r}")
            return None
    note = "truncate_embeddings" if rows is not None else ""
    inputs = tuple(sources[lb] for lb in labels)
    base_src = sources[base] if base else None
    return TensorPlan(name, shape, dtype, "merge", inputs, base_src, {}, rows, note)


def _check_shapes(recipe, name, sources, problems) -> int | bool | None:
    """None when all shapes agree; the row count to crop to (opt-in); False on a problem."""
    shapes = {lb: s.info.shape for lb, s in sources.items()}
    if len(set(shapes.values())) == 1:
        return None
    listing = ", ".join(f"{lb}: {list(sh)}" for lb, sh in shapes.items())
    same_tail = len({sh[1:] for sh in shapes.values()}) == 1
    if arch.is_vocab_tensor(name) and same_tail:
        if "truncate_embeddings" in recipe.opt_ins:
            return min(sh[0] for sh in shapes.values())
        problems.append(
            f"tensor {name!r}: vocabulary sizes differ ({listing}); the models use different "
            "tokenizers. Merge models with the same vocabulary, or opt in to mergekit's "
            "behaviour (keep the first rows common to all) with `mergeforge: "
            "{truncate_embeddings: true}` in the recipe"
        )
        return False
    problems.append(f"tensor {name!r}: shapes differ between models ({listing})")
    return False


def _trim_listing(problems: list[str]) -> None:
    """Keep long problem lists readable: at most MAX_LISTED of each kind of message."""
    if len(problems) <= 3 * MAX_LISTED:
        return
    extra = len(problems) - 3 * MAX_LISTED
    del problems[3 * MAX_LISTED :]
    problems.append(f"... and {extra} more problems of the same kinds")

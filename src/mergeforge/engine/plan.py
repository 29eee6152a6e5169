"""Plan a merge: resolve every output tensor before a single tensor byte is read.

``build_plan`` opens every checkpoint's index (headers only), checks the method and its parameters,
matches tensors across models (names, shapes, dtypes, tied weights, vocabulary sizes), resolves the
parameters of every tensor (gradients by layer position, filters by name), and estimates peak memory
and bytes to read and write. All problems are collected and raised as one ``PlanError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mergeforge.config import ModelEntry, Params, Recipe
from mergeforge.engine.models import open_models, same_model
from mergeforge.engine.params import check_params, resolve_params
from mergeforge.errors import PlanError
from mergeforge.io import Checkpoint, TensorInfo, arch
from mergeforge.methods import MethodSpec, find_method, method_names

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
    if recipe.slices:
        problems.append(
            "`slices:` recipes (layer stacking) are not supported yet; use `models:` "
            "(the same layers of every model)"
        )
    ckpts, paths, open_problems = open_models(recipe, recipe.model_paths())
    problems += open_problems
    base, inputs = _split_base(recipe, spec, paths, problems)
    problems += check_params(spec, recipe.parameters, [(m.model, m.parameters) for m in inputs])
    if problems or any(m.model not in ckpts for m in inputs) or (base and base not in ckpts):
        raise PlanError(_what(recipe), problems)
    labels = tuple(m.model for m in inputs)
    reference = base or labels[0]
    tensors, n_layers = _plan_tensors(recipe, spec, base, inputs, ckpts, reference, problems)
    if problems:
        raise PlanError(_what(recipe), problems)
    used = tuple(sorted(recipe.opt_ins))
    return MergePlan(
        recipe, spec, base, labels, ckpts, paths, tuple(tensors), reference, n_layers, used
    )


def _what(recipe: Recipe) -> str:
    return f"cannot merge {recipe.path}" if recipe.path else "cannot merge"


def _split_base(recipe: Recipe, spec: MethodSpec, paths: Mapping[str, Path], problems: list[str]):
    """Separate the base model from the other inputs, as mergekit 0.1.5 does.

    A ``models:`` entry naming the base model is the base (its parameters are not used); for a
    method that does not use a base (``linear``) the base is one more ordinary input.
    """
    base = recipe.base_model
    if spec.base == "unused":
        # mergekit adds an unlisted base as an ordinary last input (it then needs a weight too)
        inputs = list(recipe.models)
        listed = any(m.model == base or same_model(paths.get(m.model), paths.get(base or ""))
                     for m in inputs)  # fmt: skip
        if base and not listed:
            inputs.append(ModelEntry(base))
        base = None
    else:
        inputs = [
            m
            for m in recipe.models
            if not (base and (m.model == base or same_model(paths.get(m.model), paths.get(base))))
        ]
    if spec.base == "required" and not base:
        problems.append(
            f"method {spec.name!r} needs a `base_model:` (the model the others were fine-tuned from)"
        )
    if len(inputs) < spec.min_models:
        problems.append(
            f"method {spec.name!r} needs at least {spec.min_models} model(s) besides the base, "
            f"got {len(inputs)}"
        )
    if spec.max_models is not None and len(inputs) > spec.max_models:
        problems.append(
            f"method {spec.name!r} takes at most {spec.max_models} model(s) besides the base, "
            f"got {len(inputs)}"
        )
    return base, inputs


def _plan_tensors(recipe, spec, base, inputs, ckpts, reference, problems):
    labels = [m.model for m in inputs]
    all_labels = ([base] if base else []) + labels
    ref = ckpts[reference]
    n_layers = arch.num_layers(ref.config) or _infer_layers(ref)
    names = _output_names(ref, [ckpts[lb] for lb in all_labels], all_labels, problems)
    global_levels: list[Params] = [recipe.parameters]
    model_levels = [[m.parameters, recipe.parameters] for m in inputs]
    out: list[TensorPlan] = []
    for name in names:
        sources = {}
        for lb in all_labels:
            src = _find_source(name, lb, ckpts[lb], problems)
            if src is not None:
                sources[lb] = src
        if len(sources) != len(all_labels):
            continue
        plan = _plan_one(recipe, spec, name, sources, base, labels, n_layers, problems)
        if plan is not None:
            params, rp = resolve_params(
                spec, global_levels, model_levels, name, _position(name, n_layers)
            )
            problems.extend(rp[:1])
            out.append(_with_params(plan, params))
    _trim_listing(problems)
    return out, n_layers


def _with_params(plan: TensorPlan, params: dict) -> TensorPlan:
    if plan.op != "merge":
        return plan
    return TensorPlan(
        plan.name, plan.shape, plan.dtype, plan.op, plan.inputs, plan.base, params,
        plan.rows, plan.note,
    )  # fmt: skip


def _position(name: str, n_layers: int | None) -> float:
    """Layer position t in [0, 1] for gradients: layer i of n → i/(n−1); other tensors → 0."""
    i = arch.layer_index(name)
    if i is None or not n_layers:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def _infer_layers(ck: Checkpoint) -> int | None:
    idx = [i for n in ck.tensors if (i := arch.layer_index(n)) is not None]
    return max(idx) + 1 if idx else None


def _output_names(ref: Checkpoint, ckpts, labels, problems: list[str]) -> list[str]:
    """Reference tensor names, plus tensors other models have that the reference ties away."""
    names = list(ref.tensors)
    seen = set(names)
    for ck, lb in zip(ckpts, labels, strict=True):
        for n in ck.tensors:
            if n in seen:
                continue
            if arch.tied_source(n, ref.tensors) and arch.ties_word_embeddings(ref.config):
                names.append(n)
                seen.add(n)
            else:
                problems.append(
                    f"tensor {n!r} is in model {lb!r} ({ck.tensors[n].file.name}) but not in "
                    f"the reference model; the models must have the same architecture"
                )
    return names


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


def _plan_one(recipe, spec, name, sources, base, labels, n_layers, problems) -> TensorPlan | None:
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

"""Which input tensors make which output tensor: ``models:`` recipes and ``slices:`` recipes.

A recipe becomes *groups* (one per output slice; a ``models:`` recipe is one group covering every
layer) and each group becomes *jobs*, one per output tensor: its name, the tensor name to read in
each model, the base, the inputs, the layer position ``t`` for gradients and the parameter levels.

``slices:`` (mergekit's layer stacking): the output layers are the slices' layers in order; output
layer j of a slice is made from layer ``start + j`` of each of its sources and gets
``t = j/(L−1)`` (``t = 1`` for a one-layer slice). Tensors before the layers (embeddings) come from
the first slice's models, tensors after them (final norm, heads; see ``arch.is_post_layer``) from
the last slice's, both at ``t = 0``, as mergekit 0.1.5 does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeforge.config import ModelEntry, Params, Recipe
from mergeforge.engine.models import same_model
from mergeforge.io import Checkpoint, arch
from mergeforge.methods import MethodSpec


@dataclass(frozen=True)
class Group:
    """One output slice: its base, its non-base inputs, their layer ranges and its parameters."""

    base: str | None
    inputs: tuple[ModelEntry, ...]
    params: Params
    ranges: Mapping[str, tuple[int, int]] | None = None  # None: every layer, names unchanged

    @property
    def labels(self) -> tuple[str, ...]:
        return ((self.base,) if self.base else ()) + tuple(m.model for m in self.inputs)


@dataclass(frozen=True)
class Job:
    """One output tensor before its inputs are checked: names to read, position, parameters."""

    name: str
    reads: Mapping[str, str]  # model label -> tensor name in that model
    group: Group
    t: float
    global_levels: tuple[Params, ...]
    model_levels: tuple[tuple[Params, ...], ...]


def make_groups(
    recipe: Recipe, spec: MethodSpec, paths: Mapping[str, Path], problems: list[str]
) -> list[Group]:
    """The recipe's groups, with the base separated from the inputs (mergekit 0.1.5 rules)."""
    if not recipe.slices:
        return [_group(spec, recipe.base_model, recipe.models, {}, None, paths, problems, "")]
    groups = []
    for i, sl in enumerate(recipe.slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) > 1:
            problems.append(
                f"slices[{i}]: every source must cover the same number of layers, got "
                + ", ".join(f"{s.model} {list(s.layer_range)}" for s in sl.sources)
            )
        entries = tuple(ModelEntry(s.model, s.parameters) for s in sl.sources)
        ranges = {s.model: s.layer_range for s in sl.sources}
        base = sl.base_model or recipe.base_model
        where = f"slices[{i}]: "
        groups.append(_group(spec, base, entries, sl.parameters, ranges, paths, problems, where))
    return groups


def _is(paths: Mapping[str, Path], a: str, b: str | None) -> bool:
    return b is not None and (a == b or same_model(paths.get(a), paths.get(b)))


def _group(spec, base, entries, params, ranges, paths, problems, where) -> Group:
    """Split one group's base from its inputs. A listed base is the base (its parameters unused);
    for a method that does not use a base, an unlisted base becomes the last ordinary input."""
    listed = next((m for m in entries if _is(paths, m.model, base)), None)
    if base and ranges is not None and base not in ranges:  # an unlisted base spans the slice
        ranges = {**ranges, base: ranges[listed.model] if listed else _common(ranges)}
    if spec.base == "unused":
        inputs = list(entries) + ([ModelEntry(base)] if base and listed is None else [])
        base = None
    else:
        inputs = [m for m in entries if not _is(paths, m.model, base)]
    if spec.base == "required" and not base:
        problems.append(
            f"{where}method {spec.name!r} needs a `base_model:` (the model the others were "
            "fine-tuned from)"
        )
    n = len(inputs)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        most = "" if spec.max_models is None else f" and at most {spec.max_models}"
        problems.append(
            f"{where}method {spec.name!r} takes at least {spec.min_models}{most} model(s) besides "
            f"the base, got {n}"
        )
    return Group(base, tuple(inputs), params, ranges)


def _common(ranges: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    return next(iter(ranges.values()))


def jobs_for(recipe: Recipe, groups: Sequence[Group], ckpts: Mapping[str, Checkpoint],
             problems: list[str]) -> list[Job]:  # fmt: skip
    """Every output tensor's job, in output order."""
    if not recipe.slices:
        return _model_jobs(recipe, groups[0], ckpts, problems)
    return _slice_jobs(recipe, groups, ckpts, problems)


def _levels(recipe: Recipe, g: Group) -> tuple[tuple[Params, ...], tuple[tuple[Params, ...], ...]]:
    glob = (g.params, recipe.parameters)
    return glob, tuple((m.parameters, *glob) for m in g.inputs)


def _model_jobs(recipe, g: Group, ckpts, problems) -> list[Job]:
    ref = ckpts[g.labels[0]]
    n_layers = arch.num_layers(ref.config) or infer_layers(ref)
    glob, per_model = _levels(recipe, g)
    names = _output_names(ref, [ckpts[lb] for lb in g.labels], g.labels, problems)
    return [
        Job(n, {lb: n for lb in g.labels}, g, _position(n, n_layers), glob, per_model)
        for n in names
    ]


def _slice_jobs(recipe, groups, ckpts, problems) -> list[Job]:
    first, last = groups[0], groups[-1]
    ref = ckpts[first.labels[0]]
    outside = [n for n in ref.tensors if arch.layer_index(n) is None]
    jobs = [_same_name_job(recipe, first, n) for n in outside if not arch.is_post_layer(n)]
    out_layer = 0
    for i, g in enumerate(groups):
        if not _ranges_fit(g, ckpts, i, problems):
            continue
        start, end = g.ranges[g.labels[0]]  # type: ignore[index]
        template = [n for n in ckpts[g.labels[0]].tensors if arch.layer_index(n) == start]
        length = end - start
        glob, per_model = _levels(recipe, g)
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0
            for n in template:
                reads = {lb: arch.rename_layer(n, g.ranges[lb][0] + j) for lb in g.labels}  # type: ignore[index]
                jobs.append(Job(arch.rename_layer(n, out_layer), reads, g, t, glob, per_model))
            out_layer += 1
    jobs += [_same_name_job(recipe, last, n) for n in outside if arch.is_post_layer(n)]
    return jobs


def _same_name_job(recipe: Recipe, g: Group, name: str) -> Job:
    glob, per_model = _levels(recipe, g)
    return Job(name, {lb: name for lb in g.labels}, g, 0.0, glob, per_model)


def _ranges_fit(g: Group, ckpts, i: int, problems: list[str]) -> bool:
    ok = True
    for lb in g.labels:
        start, end = g.ranges[lb]  # type: ignore[index]
        n = arch.num_layers(ckpts[lb].config) or infer_layers(ckpts[lb]) or 0
        if end > n:
            problems.append(
                f"slices[{i}]: layer_range [{start}, {end}] of model {lb!r} points past its last "
                f"layer (it has {n} layers, so end must be at most {n})"
            )
            ok = False
    return ok


def output_layers(recipe: Recipe, groups: Sequence[Group]) -> int | None:
    """Number of layers of the output of a ``slices:`` recipe (``None`` for ``models:``)."""
    if not recipe.slices:
        return None
    return sum(g.ranges[g.labels[0]][1] - g.ranges[g.labels[0]][0] for g in groups)  # type: ignore[index]


def _position(name: str, n_layers: int | None) -> float:
    """Layer position t in [0, 1] for gradients: layer i of n → i/(n−1); other tensors → 0."""
    i = arch.layer_index(name)
    if i is None or not n_layers:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def infer_layers(ck: Checkpoint) -> int | None:
    """Number of layers from the tensor names (max layer index + 1)."""
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

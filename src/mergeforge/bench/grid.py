"""Hyperparameter grids of the benchmark, which methods apply to a pool, and their recipes.

Each method gets a *small* grid of recipe parameters (the benchmark evaluates every point on every
task's validation split, and evaluation dominates its run time): the knob the papers tune (λ, the
task-vector weight, density, α) at two or three values around the values the papers and
FusionBench report; methods without a knob run once. Per-model parameters (``weight``,
``density``, ...) are given to every model alike (the tasks are symmetric).

Sources of the values: task arithmetic λ ∈ [0.1, 1] with 0.3 typical for 8 tasks (Ilharco et al.
2023, FusionBench); TIES density 0.2, λ near 1 for the disjoint mean (Yadav et al. 2023); DARE keep
rate 0.5 on small models (Yu et al. 2024); Breadcrumbs β = 0.9, γ = 0.01 (Davari & Belilovsky
2024); DELLA d = 0.5, ε = 0.15; PCB ratio 0.1; LiNeS β ∈ [0.1, 1]; TSV α = 1, Iso-C/CTS α ∈
{1, 1.5}; Consensus / TALL masks λ_t = 0.6, k = 2; KnOTS-TIES density 0.2, α ≈ 0.6; OPCM α = 0.5.

Cheap grids: where a method's output is θ0 + s·Δ with Δ independent of its knob s (``SCALE_AXES``:
task arithmetic's weight, TIES' λ, Iso-C's α, ...), the runner merges once per group of points
that differ only in s and derives the others as θ0 + (s / s_ref)·(θ_ref − θ0) — equal to merging
them to float32 rounding (checked for every such method in ``tests/bench/test_grid_scale.py``).
So those grids are wider: a point costs one validation pass, not a merge. Recipes opt in to
``index_tie_break`` (ties at a top-k magnitude cut broken by lowest index: no full sort of the
30522 × 384 embedding matrix; mergekit's sort order matters only for mergekit bit-parity).
"""

from __future__ import annotations

from collections.abc import Mapping

from mergeforge.bench.pool import Pool
from mergeforge.errors import MethodError
from mergeforge.fusion.registry import FUSION_REGISTRY, find_fusion
from mergeforge.fusion.spec import FusionSpec
from mergeforge.methods.registry import REGISTRY, find_method
from mergeforge.methods.spec import MethodSpec

Params = dict[str, object]


def _points(**axes: tuple[object, ...]) -> tuple[Params, ...]:
    """The cartesian product of the axes, in order (the last axis varies fastest)."""
    out: list[Params] = [{}]
    for name, values in axes.items():
        out = [{**p, name: v} for p in out for v in values]
    return tuple(out)


# Recipe parameters per grid point (merged with FIXED[method]); a method missing here runs once
# with its defaults (and FIXED).
GRIDS: dict[str, tuple[Params, ...]] = {
    "task_arithmetic": _points(weight=(0.2, 0.3, 0.5, 0.7, 1.0)),
    "ties": _points(lambda_=(0.6, 1.0, 1.4)),
    "dare_linear": _points(weight=(0.3, 0.5, 0.7)),
    "dare_ties": _points(weight=(0.3, 0.5, 0.7)),
    "breadcrumbs": _points(weight=(0.3, 0.5, 0.7)),
    "breadcrumbs_ties": _points(weight=(0.3, 0.5, 0.7)),
    "della": _points(lambda_=(0.6, 1.0, 1.4)),
    "della_linear": _points(weight=(0.3, 0.5, 0.7)),
    "sce": _points(select_topk=(0.1, 1.0)),
    "magmax": _points(lambda_=(0.5, 1.0, 1.5)),
    "pcb": _points(lambda_=(0.5, 1.0, 1.5)),
    "lines": _points(beta=(0.5, 1.0)),
    "iso_c": _points(alpha=(1.0, 1.5, 2.0)),
    "iso_cts": _points(alpha=(1.0, 1.5, 2.0)),
    "consensus": _points(lambda_=(0.3, 0.5)),
    "tall_masks": _points(lambda_=(0.3, 0.5)),
    "knots": _points(alpha=(0.6, 1.0, 1.4)),
}

# The knob s of methods whose output is θ0 + s·Δ (Δ independent of s), by recipe name.
SCALE_AXES: dict[str, str] = {
    "task_arithmetic": "weight",
    "ties": "lambda",
    "dare_linear": "weight",
    "dare_ties": "weight",
    "breadcrumbs": "weight",
    "breadcrumbs_ties": "weight",
    "della": "lambda",
    "della_linear": "weight",
    "magmax": "lambda",
    "pcb": "lambda",
    "iso_c": "alpha",
    "iso_cts": "alpha",
    "knots": "alpha",
}

# Parameters every grid point of a method gets (the paper's setting of the knobs not tuned).
FIXED: dict[str, Params] = {
    "linear": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
    "della_linear": {"density": 0.5, "epsilon": 0.15},
    "multislerp": {"weight": 1.0},
    "pcb": {"ratio": 0.1},
    "lines": {"weight": 1.0},
    "tsv": {"alpha": 1.0},
    "tall_masks": {"save_masks": False},
    "knots": {"inner": "ties", "density": 0.2},
    "opcm": {"alpha": 0.5},
}

# Fusion algorithms (``mergeforge.fusion``) run once, with the papers' settings shortened to fit a
# 2-core CPU: test-time adaptation for 40 steps of one batch of 8 per task (papers: 500-1000 steps
# of 16) at a 10x larger learning rate so that the coefficients move about as far; 128 examples
# per task for Fisher / RegMean (papers: 256+). Recorded in every record's params.
FUSION_FIXED: dict[str, Params] = {
    "fisher": {"examples": 128},
    "regmean": {"examples": 128},
    "regmean_pp": {"examples": 128},
    "adamerging": {"steps": 40, "lr": 0.01},
    "adamerging_pp": {"steps": 40, "lr": 0.01},
    "concrete_ta": {"steps": 40, "lr": 0.01},
    "concrete_adamerging": {
        "steps": 20,
        "lr": 0.01,
        "adamerging_steps": 20,
        "adamerging_lr": 0.01,
    },
    "wemoe": {"steps": 40, "lr": 0.001},
    "e_wemoe": {"steps": 40, "lr": 0.001},
    "smile": {"gate_k": 16, "k": 32},
    "twin_merging": {"epochs": 30, "lr": 0.002},
}

# Examples per batch of the data fusion algorithms read (test-time adaptation: per task per step).
FUSION_BATCH = 8

# Methods that do not combine several fine-tunes of one base into one model.
NOT_MULTI_TASK: dict[str, str] = {
    "passthrough": "it copies one model (or stacks layers with `slices:`); it does not combine "
    "several fine-tunes",
}


def grid_for(method: str) -> list[Params]:
    """The recipe-parameter dicts a method is tried with (``lambda_`` is written ``lambda``)."""
    if find_fusion(method) is not None:
        return [dict(FUSION_FIXED.get(method, {}))]
    fixed = FIXED.get(method, {})
    points = GRIDS.get(method, ({},))
    out = []
    for p in points:
        merged = {**fixed, **p}
        out.append({("lambda" if k == "lambda_" else k): v for k, v in merged.items()})
    return out


def scale_groups(method: str, grid: list[Params]) -> list[tuple[int, list[tuple[int, float]]]]:
    """``[(reference index, [(point index, s / s_ref), ...]), ...]``: grid points grouped so that
    each group is merged once (at its first point) and its other points derived by scaling
    (``SCALE_AXES``); a method without a scale axis gets one group per point."""
    axis = SCALE_AXES.get(method)
    groups: dict[str, tuple[int, list[tuple[int, float]]]] = {}
    out: list[tuple[int, list[tuple[int, float]]]] = []
    for i, p in enumerate(grid):
        s = p.get(axis) if axis else None
        if not isinstance(s, (int, float)) or s == 0:
            out.append((i, [(i, 1.0)]))
            continue
        key = repr(sorted((k, v) for k, v in p.items() if k != axis))
        if key not in groups:
            groups[key] = (i, [])
            out.append(groups[key])
        ref, members = groups[key]
        members.append((i, float(s) / float(grid[ref][axis])))  # type: ignore[arg-type]
    return out


def not_applicable(spec: MethodSpec | FusionSpec, pool: Pool) -> str | None:
    """Why ``spec`` cannot run on ``pool`` (``None`` when it can)."""
    k = len(pool.tasks)
    if isinstance(spec, FusionSpec):
        if pool.kind != "text-classification":
            return (
                f"fusion algorithms run on text-classification pools (an encoder under task "
                f"heads); {pool.name!r} is a {pool.kind} pool"
            )
        return None
    if spec.name in NOT_MULTI_TASK:
        return NOT_MULTI_TASK[spec.name]
    if spec.category != "data-free":
        return (
            f"it is a {spec.category} method: it needs data or training from mergeforge.fusion, "
            "which the benchmark does not drive yet"
        )
    if spec.max_models is not None and spec.max_models < k:
        return f"it merges at most {spec.max_models} model(s) and the pool has {k} tasks"
    if spec.min_models > k:
        return f"it needs at least {spec.min_models} models and the pool has {k} tasks"
    if spec.base == "required" and pool.base_dir is None:
        return "it needs the pretrained base model and the pool has none"
    return None


def select_methods(
    pool: Pool, methods: list[str] | None = None
) -> tuple[list[MethodSpec | FusionSpec], dict[str, str]]:
    """The methods to run on ``pool`` and ``{method: why skipped}``.

    ``None``: every registered method that applies (the others are skipped with their reason).
    Named methods must exist (``MethodError`` listing the known names) and apply (``MethodError``
    saying why not).
    """
    if methods is None:
        chosen, skipped = [], {}
        for spec in (*REGISTRY, *FUSION_REGISTRY):
            why = not_applicable(spec, pool)
            if why is None:
                chosen.append(spec)
            else:
                skipped[spec.name] = why
        return chosen, skipped
    known = ", ".join(s.name for s in (*REGISTRY, *FUSION_REGISTRY))
    unknown = [m for m in methods if _find(m) is None and m not in ("pretrained", "fine_tuned")]
    if unknown:
        raise MethodError(
            f"unknown method(s) {', '.join(map(repr, unknown))} in --methods; known methods: "
            f"{known} (the baselines pretrained and fine_tuned always run)"
        )
    specs = [_find(m) for m in dict.fromkeys(methods) if m not in ("pretrained", "fine_tuned")]
    problems = [f"{s.name}: {why}" for s in specs if s and (why := not_applicable(s, pool))]
    if problems:
        raise MethodError(
            f"method(s) not applicable to pool {pool.name!r} ({len(pool.tasks)} tasks): "
            + "; ".join(problems)
            + ". Leave them out of --methods"
        )
    return [s for s in specs if s is not None], {}


def _find(name: str) -> MethodSpec | FusionSpec | None:
    return find_method(name) or find_fusion(name)


def build_recipe(pool: Pool, spec: MethodSpec, params: Mapping[str, object]) -> dict[str, object]:
    """A recipe dict merging every task's encoder with ``params``.

    Per-model parameters go to every model entry, global ones to ``parameters``; the base model
    is listed unless the method does not use one (``linear``, ``karcher``: the base would be
    averaged in as one more model).
    """
    per_model = {
        k: v
        for k, v in params.items()
        if (p := spec.param(k)) is not None and p.scope == "per_model"
    }
    global_ = {k: v for k, v in params.items() if k not in per_model}
    unknown = [k for k in params if spec.param(k) is None]
    if unknown:
        raise MethodError(
            f"grid of {spec.name!r} sets unknown parameter(s) {unknown}; "
            f"{spec.name} has {[p.name for p in spec.params]}"
        )
    recipe: dict[str, object] = {
        "merge_method": spec.name,
        "models": [
            {"model": str(t.encoder_dir), **({"parameters": dict(per_model)} if per_model else {})}
            for t in pool.tasks
        ],
        "dtype": "float32",
        "mergeforge": {"index_tie_break": True},
    }
    if spec.base != "unused":
        recipe["base_model"] = str(pool.base_dir)
    if global_:
        recipe["parameters"] = dict(global_)
    return recipe

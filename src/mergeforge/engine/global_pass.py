"""Whole-model statistics gathered in a first streaming pass, for methods that need them.

TIES as in the paper (``trim_scope: model``) trims each task vector over the *whole model*: keep
``|δ| ≥ t_i`` where ``t_i`` is the ``r``-th smallest ``|δ|`` of model i over every merged tensor,
``r = D − int(D·d_i)`` (D entries; FusionBench's rule, so ties at the threshold are kept). A
method that modifies only some tensors counts only those (``MethodSpec.global_scope``: DOGE's mask covers its 2-D
block weights, as FusionBench's). Nothing is held in memory beyond one tensor's inputs: ``t_i`` is
found exactly by a two-level radix select on the float32 bit patterns of ``|δ|`` (for
non-negative floats, the bit pattern orders like the value): pass 1 counts the high 16 bits,
pass 2 counts the low 16 bits inside the chosen bucket.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from mergeforge.engine.execute import ExecOptions, prepare_inputs
from mergeforge.engine.plan import MergePlan, TensorPlan
from mergeforge.errors import PlanError
from mergeforge.io import arch

HI_BINS = 1 << 15  # |δ| has sign bit 0, so its high 16 bits are < 2^15
LO_BINS = 1 << 16


def in_scope(plan: MergePlan, tp: TensorPlan) -> bool:
    """Whether ``tp`` is a merged tensor that counts toward the whole-model statistics."""
    rule = plan.method.global_scope
    return tp.op == "merge" and (rule is None or rule(tp.shape, arch.layer_index(tp.name)))


def needs_thresholds(plan: MergePlan) -> bool:
    """Whether any tensor is trimmed against a whole-model magnitude threshold."""
    return any(t.params.get("trim_scope") == "model" for t in plan.tensors if t.op == "merge")


def _model_densities(plan: MergePlan) -> tuple[float, ...]:
    merged = [t for t in plan.tensors if in_scope(plan, t)]
    values = {tuple(t.params["density"]) for t in merged}  # type: ignore[arg-type]
    if len(values) != 1:
        raise PlanError(
            "trim_scope: model",
            [
                "`trim_scope: model` keeps one fraction of each model's whole task vector, so "
                "`density` must be the same for every tensor of a model (no gradients or filters)"
            ],
        )
    return next(iter(values))


def _abs_delta_bits(plan: MergePlan, tp: TensorPlan, options: ExecOptions) -> list[torch.Tensor]:
    """int32 bit patterns of |x_i − b| for each model (flattened)."""
    raw = [plan.checkpoints[s.model].read(s.info.name) for s in tp.sources()]
    xs = prepare_inputs(plan, tp, raw, options)
    b = xs[0].reshape(-1)
    return [(x.reshape(-1) - b).abs_().view(torch.int32) for x in xs[1:]]


def _scan(
    plan: MergePlan, options: ExecOptions, visit: Callable[[int, torch.Tensor], None]
) -> None:
    for tp in plan.tensors:
        if in_scope(plan, tp):
            for i, bits in enumerate(_abs_delta_bits(plan, tp, options)):
                visit(i, bits)


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bucket holding the ``rank``-th smallest (1-based) and the rank within that bucket."""
    cum = torch.cumsum(counts, 0)
    bucket = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype)))
    before = int(cum[bucket - 1]) if bucket > 0 else 0
    return bucket, rank - before


def model_thresholds(plan: MergePlan, options: ExecOptions) -> tuple[float, ...]:
    """Per-model threshold ``t_i`` (see the module docstring), exact, in two streaming passes."""
    dens = _model_densities(plan)
    k = len(plan.models)
    hi = torch.zeros(k, HI_BINS, dtype=torch.int64)
    _scan(plan, options, lambda i, bits: hi[i].add_(torch.bincount(bits >> 16, minlength=HI_BINS)))
    total = int(hi[0].sum())
    # rank 0: keep everything (d ≥ 1); rank total + 1: keep nothing (d ≤ 0, as per-tensor trim)
    ranks = [0 if d >= 1 else total + 1 if d <= 0 else total - int(total * d) for d in dens]
    found = [_locate(hi[i], r) if 0 < r <= total else (0, 0) for i, r in enumerate(ranks)]
    lo = torch.zeros(k, LO_BINS, dtype=torch.int64)

    def visit_lo(i: int, bits: torch.Tensor) -> None:
        if 0 < ranks[i] <= total:
            inside = bits[(bits >> 16) == found[i][0]] & 0xFFFF
            lo[i].add_(torch.bincount(inside, minlength=LO_BINS))

    _scan(plan, options, visit_lo)
    out = []
    for i, r in enumerate(ranks):
        if r == 0 or r > total:
            out.append(0.0 if r == 0 else math.inf)
            continue
        low, _ = _locate(lo[i], found[i][1])
        pattern = torch.tensor([(found[i][0] << 16) | low], dtype=torch.int32)
        out.append(float(pattern.view(torch.float32)))
    return tuple(out)


def with_global_stats(plan: MergePlan, options: ExecOptions) -> MergePlan:
    """The plan with whole-model statistics filled into the parameters that need them."""
    if not needs_thresholds(plan):
        return plan
    thresholds = model_thresholds(plan, options)
    tensors = tuple(
        dataclasses.replace(t, params={**t.params, "threshold": thresholds})
        if t.op == "merge"
        else t
        for t in plan.tensors
    )
    return dataclasses.replace(plan, tensors=tensors)

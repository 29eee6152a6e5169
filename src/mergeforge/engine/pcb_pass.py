"""Whole-model statistics of PCB-merging (``pcb`` with ``scope: model``), found by streaming.

PCB (Du et al. 2024, arXiv 2410.02396) flattens each task vector over the whole model; its four
per-model statistics (``methods.pcb.PCBStats``) are order statistics over all D entries:

1. ``lo``, ``hi``: the outlier clip of ``|τ_i|`` (ranks ``clip_ranks(D)``) — two passes;
2. ``q_r``, ``bmax``: the cut and the maximum of the balance ``B_i`` (ranks ``cut_rank(D, r)``
   and D), where ``B_i`` of a tensor needs step 1 and every model's ``τ`` of that tensor — two
   more passes.

Each pass reads one tensor's inputs at a time (``order_stats.select``), so memory stays that of
a normal merge; the merge itself is the fifth read of the inputs.
"""

from __future__ import annotations

import dataclasses

import torch

from mergeforge.engine.execute import ExecOptions, prepare_inputs
from mergeforge.engine.order_stats import Visit, float_keys, select
from mergeforge.engine.plan import MergePlan, TensorPlan
from mergeforge.errors import PlanError
from mergeforge.methods.pcb import PCBStats, balance_scores, clip_ranks, cut_rank


def needs_pcb_stats(plan: MergePlan) -> bool:
    """Whether the plan is a whole-model PCB merge."""
    return plan.method.name == "pcb" and any(
        t.params.get("scope") == "model" for t in plan.tensors if t.op == "merge"
    )


def _merged(plan: MergePlan) -> list[TensorPlan]:
    return [t for t in plan.tensors if t.op == "merge"]


def _ratio(plan: MergePlan) -> float:
    values = {(t.params["ratio"], t.params["scope"]) for t in _merged(plan)}
    if len(values) != 1:
        raise PlanError(
            "pcb scope: model",
            [
                "whole-model PCB keeps one fraction of each model's whole task vector, so "
                "`ratio` and `scope` must be the same for every tensor (no gradients or filters); "
                "use `scope: tensor` for per-tensor values"
            ],
        )
    return float(next(iter(values))[0])


def _taus(plan: MergePlan, tp: TensorPlan, options: ExecOptions) -> torch.Tensor:
    raw = [plan.checkpoints[s.model].read(s.info.name) for s in tp.sources()]
    xs = prepare_inputs(plan, tp, raw, options)
    b = xs[0].reshape(-1)
    return torch.stack([x.reshape(-1) - b for x in xs[1:]])  # (K, d)


def pcb_stats(plan: MergePlan, options: ExecOptions) -> PCBStats:
    """The four whole-model statistics of every model (module docstring)."""
    ratio = _ratio(plan)
    merged = _merged(plan)
    k = len(merged[0].inputs)
    d = sum(t.out_bytes() // t.dtype.itemsize for t in merged)

    def scan_abs(visit: Visit) -> None:
        for tp in merged:
            for i, row in enumerate(_taus(plan, tp, options).abs_()):
                visit(i, float_keys(row))

    lo_r, hi_r = clip_ranks(d)
    clip = select(scan_abs, [[lo_r, hi_r]] * k)
    lo = torch.tensor([c[0] for c in clip]).unsqueeze(1)  # (K, 1)
    hi = torch.tensor([c[1] for c in clip]).unsqueeze(1)  # (K, 1)

    def scan_balance(visit: Visit) -> None:
        for tp in merged:
            taus = _taus(plan, tp, options)
            _, balance = balance_scores(taus, lo.to(taus.device), hi.to(taus.device))
            for i, row in enumerate(balance):
                visit(i, float_keys(row))

    cut = select(scan_balance, [[cut_rank(d, ratio), d]] * k)
    return PCBStats(
        tuple(c[0] for c in clip), tuple(c[1] for c in clip),
        tuple(c[0] for c in cut), tuple(c[1] for c in cut),
    )  # fmt: skip


def with_pcb_stats(plan: MergePlan, options: ExecOptions) -> MergePlan:
    """The plan with ``stats`` filled into every merged tensor's parameters, if PCB needs them."""
    if not needs_pcb_stats(plan):
        return plan
    stats = pcb_stats(plan, options)
    tensors = tuple(
        dataclasses.replace(t, params={**t.params, "stats": stats}) if t.op == "merge" else t
        for t in plan.tensors
    )
    return dataclasses.replace(plan, tensors=tensors)

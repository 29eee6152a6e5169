"""Render a ``MergePlan`` for people (``mergeforge plan``) and for tools (``--json``)."""

from __future__ import annotations

from mergeforge.engine.params import describe
from mergeforge.engine.plan import MergePlan, TensorPlan


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _dtype(t: TensorPlan) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_json(t: TensorPlan) -> dict[str, object]:
    """One output tensor of the plan as JSON."""
    return {
        "name": t.name,
        "shape": list(t.shape),
        "dtype": _dtype(t),
        "op": t.op,
        "base": None if t.base is None else {"model": t.base.model, "tensor": t.base.info.name},
        "inputs": [{"model": s.model, "tensor": s.info.name, "note": s.note} for s in t.inputs],
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in t.params.items()},
        "note": t.note,
    }


def plan_json(plan: MergePlan) -> dict[str, object]:
    """The whole plan as JSON: method, models, estimates and every tensor."""
    return {
        "method": plan.method.name,
        "base_model": plan.base,
        "models": list(plan.models),
        "num_layers": plan.num_layers,
        "tensors": [tensor_json(t) for t in plan.tensors],
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written,
        "peak_memory_bytes": plan.peak_bytes(),
        "largest_tensor_work_bytes": plan.largest_tensor_bytes,
        "opt_ins": list(plan.opt_ins_used),
    }


def _shared_params(plan: MergePlan) -> dict[str, object]:
    """Parameters whose value is the same for every merged tensor."""
    merged = [t.params for t in plan.tensors if t.op == "merge"]
    if not merged:
        return {}
    return {k: v for k, v in merged[0].items() if all(p.get(k) == v for p in merged[1:])}


def plan_text(plan: MergePlan) -> str:
    """A readable plan: header, one line per tensor (only what varies), then the estimates."""
    shared = _shared_params(plan)
    lines = [
        f"method: {plan.method.name} ({plan.method.paper})",
        f"base model: {plan.base or '(none)'}",
        "models: " + ", ".join(plan.models),
        "parameters for every tensor: " + (describe(shared) or "(none)"),
        "",
    ]
    for t in plan.tensors:
        shape = "x".join(map(str, t.shape)) or "scalar"
        if t.op == "copy":
            what = f"copy from {t.base.model if t.base else '?'} ({t.note})"
        else:
            varying = {k: v for k, v in t.params.items() if k not in shared}
            tied = [f"{s.model}: {s.note}" for s in t.inputs if s.note]
            what = describe(varying) + (f"  [{'; '.join(tied)}]" if tied else "")
            if t.note:
                what += f"  [{t.note}]"
        lines.append(f"{t.name}  {shape} {_dtype(t)}  {what}".rstrip())
    merged = sum(1 for t in plan.tensors if t.op == "merge")
    lines += [
        "",
        f"tensors: {len(plan.tensors)} ({merged} merged, {len(plan.tensors) - merged} copied)",
        f"to read: {_mib(plan.bytes_read)}; to write: {_mib(plan.bytes_written)}",
        f"estimated peak memory: {_mib(plan.peak_bytes())} "
        f"(largest tensor in flight: {_mib(plan.largest_tensor_bytes)})",
    ]
    if plan.opt_ins_used:
        lines.append("opt-ins in effect: " + ", ".join(plan.opt_ins_used))
    return "\n".join(lines)

"""Check recipe parameters against a method's spec and resolve them per tensor.

Resolution for one tensor (mergekit's precedence, most specific first): the model's own
``parameters`` → the slice's ``parameters`` → the recipe's global ``parameters`` → the spec default.
A setting that is a filter list with no matching entry falls through to the next level. Gradients
are evaluated at the tensor's layer position ``t`` (see ``config.evaluate_setting``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from mergeforge.config import Conditional, Params, Setting, evaluate_setting
from mergeforge.methods import MethodSpec, ParamSpec

Resolved = dict[str, object]


def _leaf_values(setting: Setting) -> Iterator[object]:
    """Every concrete value a setting can take (scalars, gradient points, conditional values)."""
    if not isinstance(setting, tuple):
        yield setting
        return
    for item in setting:
        if isinstance(item, Conditional):
            yield from _leaf_values(item.value)
        else:
            yield item


def check_params(
    spec: MethodSpec,
    global_params: Params,
    model_params: Sequence[tuple[str, Params]],
) -> list[str]:
    """Problems with parameter names, scopes and values; ``model_params`` excludes the base."""
    problems: list[str] = []
    allowed = ", ".join(p.name for p in spec.params) or "none"
    levels = [("parameters", global_params, True)]
    levels += [(f"parameters of model {label}", ps, False) for label, ps in model_params]
    for where, params, is_global in levels:
        for name, setting in params.items():
            p = spec.param(name)
            if p is None:
                problems.append(
                    f"{where}: unknown parameter {name!r} for method {spec.name!r}; allowed: {allowed}"
                )
                continue
            if p.scope == "global" and not is_global:
                problems.append(
                    f"{where}: {name!r} is a global parameter of {spec.name!r}; "
                    "move it to the top-level `parameters:`"
                )
            problems += [f"{where}: {name} {err}" for err in _value_problems(p, setting)]
    for p in spec.params:
        if not (p.required and p.scope == "per_model") or p.name in global_params:
            continue
        for label, ps in model_params:
            if p.name not in ps:
                problems.append(
                    f"model {label}: method {spec.name!r} needs per-model parameter {p.name!r} "
                    f"({p.doc}); add `parameters: {{{p.name}: ...}}` to it"
                )
    for p in spec.params:
        if p.required and p.scope == "global" and p.name not in global_params:
            problems.append(f"method {spec.name!r} needs parameter {p.name!r} ({p.doc})")
    return problems


def _value_problems(p: ParamSpec, setting: Setting) -> list[str]:
    out = []
    for value in _leaf_values(setting):
        err = p.check(value)
        if err and err not in out:
            out.append(err)
    return out


def _lookup(levels: Sequence[Params], name: str, tensor: str, t: float) -> object | None:
    for params in levels:
        if name in params:
            value = evaluate_setting(params[name], tensor, t)
            if value is not None:
                return value
    return None


def resolve_params(
    spec: MethodSpec,
    global_levels: Sequence[Params],
    model_levels: Sequence[Sequence[Params]],
    tensor: str,
    t: float,
) -> tuple[Resolved, list[str]]:
    """Parameter values for one tensor; per-model ones become tuples aligned with the models.

    ``global_levels`` is the chain for global lookups (slice then recipe parameters);
    ``model_levels[i]`` is the chain for model i (its own parameters, then the global chain).
    Returns the values and the problems (required values that no level gives for this tensor).
    """
    out: Resolved = {}
    problems: list[str] = []
    for p in spec.params:
        if p.scope == "global":
            out[p.name] = _value_or_default(p, _lookup(global_levels, p.name, tensor, t))
            if out[p.name] is None and p.required:
                problems.append(f"{tensor}: no value for required parameter {p.name!r}")
            continue
        values = []
        for i, chain in enumerate(model_levels):
            v = _value_or_default(p, _lookup(chain, p.name, tensor, t))
            if v is None and p.required:
                problems.append(f"{tensor}: no value of {p.name!r} for model #{i + 1}")
            values.append(v)
        out[p.name] = tuple(values)
    return out, problems


def _value_or_default(p: ParamSpec, value: object | None) -> object | None:
    if value is None:
        return p.default
    if p.kind == "float":
        return float(value)  # type: ignore[arg-type]
    if p.kind == "int":
        return int(value)  # type: ignore[call-overload]
    return value


def describe(params: Mapping[str, object]) -> str:
    """Compact text of resolved parameters for plans and logs."""

    def fmt(v: object) -> str:
        if isinstance(v, tuple):
            return "(" + ", ".join(fmt(x) for x in v) + ")"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())

"""Recipes: the mergekit YAML schema as frozen dataclasses, parsed and validated in one pass.

Accepted top-level keys (mergekit's names): ``models``, ``slices``, ``merge_method``, ``base_model``,
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``, plus mergeforge's own ``mergeforge``
block of opt-ins. A parameter setting is a scalar, a *gradient* (a list interpolated across layer
index) or a list of *conditionals* ``{filter: substring, value: scalar | gradient}`` where the first
entry whose filter is a substring of the tensor name wins (``filter`` absent or ``"*"`` matches all).

Parsing collects every problem (unknown keys, wrong types) and raises one ``RecipeError``. Method
names and parameters are checked later against the method registry by the engine, which reports
those problems together with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mergeforge.errors import RecipeError

Scalar = float | int | bool | str
Gradient = tuple[Scalar, ...]


@dataclass(frozen=True)
class Conditional:
    """One entry of a filtered parameter: applies where ``filter`` is a substring of the name."""

    filter: str | None
    value: Scalar | Gradient


Setting = Scalar | Gradient | tuple[Conditional, ...]
Params = Mapping[str, Setting]

TOP_LEVEL_KEYS = (
    "models",
    "slices",
    "merge_method",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "mergeforge",
)
UNSUPPORTED_KEYS = {
    "modules": "multi-module recipes (`modules:`) are not supported yet; use `models:`",
    "tokenizer": "the `tokenizer:` block is not supported yet; use `tokenizer_source: base` or a model",
    "chat_template": "`chat_template` is not supported yet; the tokenizer files of the base are copied",
}
OPT_INS = {
    "truncate_embeddings": "crop embeddings/lm_head of different vocabulary sizes to the smallest "
    "(mergekit's --unsafe-truncate-embeddings)",
    "allow_nonfinite": "merge inputs that hold NaN or Inf instead of stopping",
    "factor_space": "merge PEFT LoRA adapters factor by factor (lora_A with lora_A, lora_B with "
    "lora_B) and write an adapter instead of a full model",
    "index_tie_break": "at a top-k magnitude cut, break exact ties by lowest index even in fp32 "
    "merges (faster, no sort; differs from mergekit only at the tied entries)",
}
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}  # fmt: skip


@dataclass(frozen=True)
class ModelEntry:
    """One input model of a ``models:`` recipe: a local path plus per-model parameters."""

    model: str
    parameters: Params = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: a model and the half-open layer range ``[start, end)`` it gives."""

    model: str
    layer_range: tuple[int, int]
    parameters: Params = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    """An output block of layers built from one or more sources covering equally many layers."""

    sources: tuple[SliceSource, ...]
    parameters: Params = field(default_factory=dict)
    base_model: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A parsed, schema-valid recipe. ``text`` is the YAML as written, for the model card."""

    merge_method: str
    models: tuple[ModelEntry, ...] = ()
    slices: tuple[Slice, ...] = ()
    base_model: str | None = None
    parameters: Params = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    opt_ins: frozenset[str] = frozenset()
    lines: tuple[float, float] | None = None
    """``(α, β)`` of LiNeS post-scaling (``mergeforge: {lines: {alpha, beta}}``), or ``None``."""
    text: str = ""
    path: Path | None = None

    def model_paths(self) -> tuple[str, ...]:
        """Every distinct model referenced (base first if set), in recipe order."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models:
            seen[m.model] = None
        for s in self.slices:
            for src in s.sources:
                seen[src.model] = None
        return tuple(seen)


def load_recipe(path: str | Path) -> Recipe:
    """Read and parse a YAML recipe file; every problem is reported at once."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p}", [f"file not found: {p} (give the path of a YAML recipe)"])
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise RecipeError(f"recipe {p}", [f"not valid YAML{at}: {exc}"]) from None
    return parse_recipe(data, text=text, path=p)


def parse_recipe(data: object, *, text: str = "", path: Path | None = None) -> Recipe:
    """Validate the schema of a recipe mapping and build a ``Recipe``."""
    what = f"recipe {path}" if path else "recipe"
    problems: list[str] = []
    if data is None:
        raise RecipeError(what, ["the recipe is empty; it needs `merge_method` and `models:`"])
    if not isinstance(data, Mapping):
        raise RecipeError(what, [f"the recipe must be a mapping of keys, got {_kind(data)}"])
    for key in data:
        if key in UNSUPPORTED_KEYS:
            problems.append(UNSUPPORTED_KEYS[str(key)])
        elif key not in TOP_LEVEL_KEYS:
            problems.append(f"unknown key {key!r}; allowed keys: {', '.join(TOP_LEVEL_KEYS)}")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        problems.append(
            "`merge_method` is required and must be a method name (see `mergeforge methods`)"
        )
    models = _parse_models(data.get("models"), problems)
    slices = _parse_slices(data.get("slices"), problems)
    if not models and not slices and "models" not in data and "slices" not in data:
        problems.append("the recipe needs `models:` (a list of {model: PATH, parameters: {...}})")
    if models and slices:
        problems.append("give either `models:` or `slices:`, not both")
    base = _optional_str(data, "base_model", problems)
    params = _parse_params(data.get("parameters"), "parameters", problems)
    dtype = _parse_dtype(data, "dtype", problems)
    out_dtype = _parse_dtype(data, "out_dtype", problems)
    tok = _optional_str(data, "tokenizer_source", problems)
    if tok == "union":
        problems.append(
            "`tokenizer_source: union` is not supported yet; use `base` or a model path"
        )
    section = data.get("mergeforge")
    lines = None
    if isinstance(section, Mapping) and "lines" in section:
        section = {k: v for k, v in section.items() if k != "lines"}
        lines = _parse_lines(data["mergeforge"]["lines"], problems)
    opt_ins = _parse_opt_ins(section, problems)
    if problems:
        raise RecipeError(what, problems)
    return Recipe(
        merge_method=str(method), models=models, slices=slices, base_model=base,
        parameters=params, dtype=dtype, out_dtype=out_dtype, tokenizer_source=tok,
        opt_ins=opt_ins, lines=lines, text=text, path=path,
    )  # fmt: skip


def _parse_lines(v: object, problems: list[str]) -> tuple[float, float] | None:
    """``{alpha: A, beta: B}`` (numbers) → ``(A, B)``."""
    fix = (
        "`mergeforge.lines` must be a mapping {alpha: A, beta: B} of numbers (LiNeS scaling "
        "b + (A + B·ℓ/(L−1))·(merged − b))"
    )
    if not isinstance(v, Mapping) or set(v) != {"alpha", "beta"}:
        problems.append(f"{fix}, got {v!r}")
        return None
    vals = [v["alpha"], v["beta"]]
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in vals):
        problems.append(f"{fix}, got {dict(v)!r}")
        return None
    return float(vals[0]), float(vals[1])


def _kind(x: object) -> str:
    return type(x).__name__ if x is not None else "nothing"


def _optional_str(data: Mapping, key: str, problems: list[str]) -> str | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, Mapping) and key == "base_model" and isinstance(v.get("model"), str):
        return str(v["model"])
    if not isinstance(v, str) or not v:
        problems.append(f"`{key}` must be a string, got {v!r}")
        return None
    return v


def _parse_dtype(data: Mapping, key: str, problems: list[str]) -> str | None:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or v not in DTYPE_NAMES:
        allowed = ", ".join(sorted(set(DTYPE_NAMES.values())))
        problems.append(f"`{key}: {v}` is not a known dtype; allowed: {allowed}")
        return None
    return DTYPE_NAMES[v]


def _parse_opt_ins(v: object, problems: list[str]) -> frozenset[str]:
    if v is None:
        return frozenset()
    if not isinstance(v, Mapping):
        problems.append("`mergeforge:` must be a mapping of opt-ins to true/false")
        return frozenset()
    chosen = set()
    for k, on in v.items():
        if k not in OPT_INS:
            allowed = ", ".join([*OPT_INS, "lines"])
            problems.append(f"unknown opt-in `mergeforge.{k}`; allowed: {allowed}")
        elif not isinstance(on, bool):
            problems.append(f"`mergeforge.{k}` must be true or false, got {on!r}")
        elif on:
            chosen.add(str(k))
    return frozenset(chosen)


def _parse_models(v: object, problems: list[str]) -> tuple[ModelEntry, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not v:
        problems.append("`models:` must be a non-empty list of {model: PATH, parameters: {...}}")
        return ()
    out = []
    for i, item in enumerate(v):
        if isinstance(item, str):
            out.append(ModelEntry(item))
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
            problems.append(f"models[{i}] must be a mapping with a `model:` path, got {item!r}")
            continue
        for k in item:
            if k not in ("model", "parameters"):
                problems.append(f"models[{i}]: unknown key {k!r}; allowed: model, parameters")
        params = _parse_params(item.get("parameters"), f"models[{i}].parameters", problems)
        out.append(ModelEntry(str(item["model"]), params))
    return tuple(out)


def _parse_slices(v: object, problems: list[str]) -> tuple[Slice, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not v:
        problems.append("`slices:` must be a non-empty list of {sources: [...]}")
        return ()
    out = []
    for i, item in enumerate(v):
        where = f"slices[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("sources"), list):
            problems.append(f"{where} must be a mapping with a `sources:` list")
            continue
        for k in item:
            if k not in ("sources", "parameters", "base_model"):
                problems.append(
                    f"{where}: unknown key {k!r}; allowed: sources, parameters, base_model"
                )
        sources = tuple(
            s
            for j, src in enumerate(item["sources"])
            if (s := _parse_source(src, f"{where}.sources[{j}]", problems)) is not None
        )
        params = _parse_params(item.get("parameters"), f"{where}.parameters", problems)
        base = item.get("base_model")
        out.append(Slice(sources, params, str(base) if isinstance(base, str) else None))
    return tuple(out)


def _parse_source(src: object, where: str, problems: list[str]) -> SliceSource | None:
    if not isinstance(src, Mapping) or not isinstance(src.get("model"), str):
        problems.append(f"{where} must be a mapping with `model:` and `layer_range: [start, end]`")
        return None
    for k in src:
        if k not in ("model", "layer_range", "parameters"):
            problems.append(f"{where}: unknown key {k!r}; allowed: model, layer_range, parameters")
    lr = src.get("layer_range")
    ok = isinstance(lr, list) and len(lr) == 2 and all(type(x) is int and x >= 0 for x in lr)
    if not ok or lr[0] >= lr[1]:
        problems.append(
            f"{where}.layer_range must be [start, end] with 0 <= start < end, got {lr!r}"
        )
        return None
    params = _parse_params(src.get("parameters"), f"{where}.parameters", problems)
    return SliceSource(str(src["model"]), (lr[0], lr[1]), params)


def _parse_params(v: object, where: str, problems: list[str]) -> Params:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        problems.append(f"`{where}` must be a mapping of parameter names to values, got {v!r}")
        return {}
    out: dict[str, Setting] = {}
    for name, setting in v.items():
        parsed = _parse_setting(setting, f"{where}.{name}", problems)
        if parsed is not None:
            out[str(name)] = parsed
    return out


def _parse_setting(v: object, where: str, problems: list[str]) -> Setting | None:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
        conds = []
        for i, c in enumerate(v):
            extra = set(c) - {"filter", "value"}
            if extra or "value" not in c:
                problems.append(
                    f"`{where}[{i}]` must be {{filter: NAME, value: V}}, got {dict(c)!r}"
                )
                continue
            value = _parse_setting(c["value"], f"{where}[{i}].value", problems)
            filt = c.get("filter")
            if filt is not None and not isinstance(filt, str):
                problems.append(f"`{where}[{i}].filter` must be a string, got {filt!r}")
            elif isinstance(value, tuple) and value and isinstance(value[0], Conditional):
                problems.append(f"`{where}[{i}].value` cannot itself be a filter list")
            elif value is not None:
                conds.append(Conditional(filt, value))  # type: ignore[arg-type]
        return tuple(conds)
    if isinstance(v, list) and v and all(isinstance(x, (bool, int, float, str)) for x in v):
        return tuple(v)
    problems.append(
        f"`{where}` must be a number, true/false, a string, a list of numbers (a gradient) or a "
        f"list of {{filter, value}} entries; got {v!r}"
    )
    return None


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """Value of a setting for one tensor at layer position ``t`` in [0, 1] (mergekit semantics).

    * scalar → itself;
    * numeric gradient ``[g0..g(n-1)]`` → piecewise-linear interpolation at ``x = t·(n−1)``:
      ``g[i]·(1−f) + g[i+1]·f`` with ``i = floor(x)``, ``f = x − i``;
    * non-numeric list → ``g[int(t·(n−1))]``;
    * conditionals → the first entry whose filter is a substring of ``tensor_name`` (``None`` or
      ``"*"`` match all), evaluated recursively; ``None`` when none matches.
    """
    if not isinstance(setting, tuple):
        return setting
    if setting and isinstance(setting[0], Conditional):
        for cond in setting:
            assert isinstance(cond, Conditional)
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    n = len(setting)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in setting)
    if not numeric:
        return setting[int(t * (n - 1))]  # type: ignore[return-value]
    if n == 1:
        return float(setting[0])  # type: ignore[arg-type]
    x = t * (n - 1)
    i = min(int(x), n - 2)
    f = x - i
    lo, hi = float(setting[i]), float(setting[i + 1])  # type: ignore[arg-type]
    return lo * (1.0 - f) + hi * f

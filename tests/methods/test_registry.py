"""The registry and the specs: names, defaults and scopes as in mergekit 0.1.5."""

from __future__ import annotations

import inspect

import pytest

from mergeforge.errors import MethodError
from mergeforge.methods import REGISTRY, find_method, get_method, method_names

# (method, parameter) -> (scope, default); mergekit 0.1.5 merge_methods/registry.py and
# generalized_task_arithmetic.py. None: required.
MERGEKIT_PARAMS = {
    "linear": {"weight": ("per_model", None), "normalize": ("global", True)},
    "task_arithmetic": {
        "weight": ("per_model", None),
        "density": ("per_model", 1.0),
        "normalize": ("global", False),
        "rescale": ("global", False),
        "lambda": ("global", 1.0),
        "int8_mask": ("global", False),
    },
    "ties": {
        "weight": ("per_model", None),
        "density": ("per_model", 1.0),
        "normalize": ("global", True),
        "rescale": ("global", False),
        "lambda": ("global", 1.0),
        "int8_mask": ("global", False),
    },
    "dare_linear": {
        "weight": ("per_model", None),
        "density": ("per_model", 1.0),
        "normalize": ("global", False),
        "rescale": ("global", True),
        "lambda": ("global", 1.0),
        "int8_mask": ("global", False),
    },
    "dare_ties": {
        "weight": ("per_model", None),
        "density": ("per_model", 1.0),
        "normalize": ("global", False),
        "rescale": ("global", True),
        "lambda": ("global", 1.0),
        "int8_mask": ("global", False),
    },
}
# Our named options beyond mergekit's: (method, parameter) -> (default, choices)
EXTRA_OPTIONS = {
    ("ties", "consensus"): ("sum", ("sum", "count")),
    ("ties", "trim_scope"): ("tensor", ("tensor", "model")),
    ("dare_ties", "consensus"): ("sum", ("sum", "count")),
    ("dare_linear", "rescale_mode"): ("l1", ("l1", "inverse")),
    ("dare_ties", "rescale_mode"): ("l1", ("l1", "inverse")),
}


# every method and how it uses the base model (mergekit 0.1.5's input contracts)
BASE_USE = {
    "linear": "unused", "task_arithmetic": "required", "ties": "required",
    "dare_linear": "required", "dare_ties": "required", "breadcrumbs": "required",
    "breadcrumbs_ties": "required", "della": "required", "della_linear": "required",
    "passthrough": "unused", "slerp": "required", "nuslerp": "optional",
    "multislerp": "optional", "karcher": "unused", "model_stock": "required", "sce": "required",
    "arcee_fusion": "required", "nearswap": "required", "ram": "required",
    "ramplus_tl": "required", "magmax": "required", "widen": "required", "pcb": "required",
    "lines": "required", "tsv": "required", "iso_c": "required", "iso_cts": "required",
    "doge": "required", "consensus": "required", "tall_masks": "required", "knots": "required",
    "rmm": "required", "opcm": "required",
}  # fmt: skip


def test_registry_names_are_unique_and_ordered() -> None:
    assert method_names() == tuple(BASE_USE)
    assert len(set(method_names())) == len(REGISTRY)


def test_find_and_get() -> None:
    assert find_method("ties") is get_method("ties")
    assert find_method("tie") is None
    with pytest.raises(MethodError, match=r"unknown merge method 'tie'.*ties"):
        get_method("tie")


@pytest.mark.parametrize("name", list(MERGEKIT_PARAMS))
def test_mergekit_parameters_scopes_and_defaults(name: str) -> None:
    spec = get_method(name)
    for pname, (scope, default) in MERGEKIT_PARAMS[name].items():
        p = spec.param(pname)
        assert p is not None, f"{name} lacks mergekit parameter {pname}"
        assert p.scope == scope
        assert p.required == (default is None)
        assert p.default == default
    extras = {p.name for p in spec.params} - set(MERGEKIT_PARAMS[name])
    assert extras == {pn for (m, pn) in EXTRA_OPTIONS if m == name}


@pytest.mark.parametrize(("name", "pname"), list(EXTRA_OPTIONS))
def test_named_paper_options(name: str, pname: str) -> None:
    p = get_method(name).param(pname)
    assert p is not None and p.scope == "global" and p.kind == "str"
    assert (p.default, p.choices) == EXTRA_OPTIONS[(name, pname)]


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.name)
def test_spec_is_consistent_with_its_function(spec) -> None:
    sig = inspect.signature(spec.fn)
    accepts_extra = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for p in spec.params:
        assert p.name in sig.parameters or (accepts_extra and p.name == "lambda"), p.name
        if p.name in sig.parameters and p.scope == "global" and not p.required:
            assert sig.parameters[p.name].default == p.default, p.name
        value = 1.0 if p.required else p.default  # None: an automatic default (see doc)
        assert p.doc and (value is None or p.check(value) is None)
    assert ("generator" in sig.parameters) == spec.stochastic
    assert spec.base == BASE_USE[spec.name]
    assert spec.paper.startswith("https://")
    assert spec.to_json()["name"] == spec.name


def test_density_range_is_closed_unit_interval() -> None:
    p = get_method("ties").param("density")
    assert p is not None
    assert p.check(0.0) is None and p.check(1.0) is None
    assert p.check(1.5) is not None and p.check(-0.1) is not None

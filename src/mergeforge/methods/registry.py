"""The merge methods mergeforge knows, as one explicit tuple of specs."""

from __future__ import annotations

from mergeforge.errors import MethodError
from mergeforge.methods.arcee_fusion import ARCEE_FUSION
from mergeforge.methods.breadcrumbs import BREADCRUMBS, BREADCRUMBS_TIES
from mergeforge.methods.consensus import CONSENSUS, TALL_MASKS
from mergeforge.methods.dare import DARE_LINEAR, DARE_TIES
from mergeforge.methods.della import DELLA, DELLA_LINEAR
from mergeforge.methods.doge import DOGE
from mergeforge.methods.knots import KNOTS
from mergeforge.methods.linear import LINEAR
from mergeforge.methods.lines import LINES
from mergeforge.methods.magmax import MAGMAX
from mergeforge.methods.model_stock import MODEL_STOCK
from mergeforge.methods.nearswap import NEARSWAP
from mergeforge.methods.opcm import OPCM
from mergeforge.methods.passthrough import PASSTHROUGH
from mergeforge.methods.pcb import PCB
from mergeforge.methods.ram import RAM, RAMPLUS_TL
from mergeforge.methods.rmm import RMM
from mergeforge.methods.sce import SCE
from mergeforge.methods.slerp import NUSLERP, SLERP
from mergeforge.methods.spec import MethodSpec
from mergeforge.methods.spherical import KARCHER, MULTISLERP
from mergeforge.methods.svd_merge import ISO_C, ISO_CTS, TSV
from mergeforge.methods.task_arithmetic import TASK_ARITHMETIC
from mergeforge.methods.ties import TIES
from mergeforge.methods.widen import WIDEN

REGISTRY: tuple[MethodSpec, ...] = (
    LINEAR,
    TASK_ARITHMETIC,
    TIES,
    DARE_LINEAR,
    DARE_TIES,
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DELLA,
    DELLA_LINEAR,
    PASSTHROUGH,
    SLERP,
    NUSLERP,
    MULTISLERP,
    KARCHER,
    MODEL_STOCK,
    SCE,
    ARCEE_FUSION,
    NEARSWAP,
    RAM,
    RAMPLUS_TL,
    MAGMAX,
    WIDEN,
    PCB,
    LINES,
    TSV,
    ISO_C,
    ISO_CTS,
    DOGE,
    CONSENSUS,
    TALL_MASKS,
    KNOTS,
    RMM,
    OPCM,
)


def method_names() -> tuple[str, ...]:
    """Names of every registered method, in registry order."""
    return tuple(spec.name for spec in REGISTRY)


def find_method(name: str) -> MethodSpec | None:
    """The spec called ``name``, or ``None``."""
    return next((spec for spec in REGISTRY if spec.name == name), None)


def get_method(name: str) -> MethodSpec:
    """The spec called ``name``; ``MethodError`` listing the known names if there is none."""
    spec = find_method(name)
    if spec is None:
        raise MethodError(
            f"unknown merge method {name!r}; known methods: {', '.join(method_names())}. "
            "Fix `merge_method:` in the recipe (`mergeforge methods` lists them with their "
            "parameters)."
        )
    return spec

"""Every fusion algorithm, in one explicit tuple (no import-time discovery).

Static results (``needs-data``): fisher, regmean, regmean_pp, adamerging, adamerging_pp,
concrete_ta, concrete_adamerging. Dynamic models (``dynamic``): wemoe, e_wemoe, smile,
twin_merging. ``mergeforge methods`` lists them after the per-tensor methods.
"""

from __future__ import annotations

from mergeforge.errors import FusionError
from mergeforge.fusion import adamerging, concrete, fisher, regmean, smile, twin, wemoe
from mergeforge.fusion.spec import FusionSpec

FUSION_REGISTRY: tuple[FusionSpec, ...] = (
    *fisher.SPECS,
    *regmean.SPECS,
    *adamerging.SPECS,
    *concrete.SPECS,
    *wemoe.SPECS,
    *smile.SPECS,
    *twin.SPECS,
)


def find_fusion(name: str) -> FusionSpec | None:
    """The algorithm called ``name``, or ``None``."""
    for spec in FUSION_REGISTRY:
        if spec.name == name:
            return spec
    return None


def get_fusion(name: str) -> FusionSpec:
    """The algorithm called ``name``; ``FusionError`` listing the known ones otherwise."""
    spec = find_fusion(name)
    if spec is None:
        known = ", ".join(s.name for s in FUSION_REGISTRY)
        raise FusionError(f"unknown fusion algorithm {name!r}; known algorithms: {known}")
    return spec

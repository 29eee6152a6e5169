"""Kernel parity of slerp, nuslerp, multislerp and karcher with mergekit 0.1.5, in a subprocess.

One subprocess of mergekit's Python (``$MERGEKIT_PYTHON``, else ``<repo>/.venv-mergekit/bin/python``,
else ``/tmp/venvs/mk/bin/python``) runs every case through ``mergekit.merge_methods.api.
merge_tensors`` twice: on the float32 inputs and on the same inputs in float64. Ours runs in
float32 and must agree with

* mergekit in float64 (its own algorithm, nearly without rounding): ``max|ours − mk64| ≤ 1e-6 ·
  max|mk64|``;
* mergekit in float32 to within 1e-6 relative plus mergekit's own float32 rounding error
  ``max|mk32 − mk64|``. That error is tiny except for multislerp, whose tangent-space step adds
  ~1e-6 relative noise at 10⁵ entries (see ``spherical.multislerp``); ours is the closed form.

Cases mergekit rejects must raise ``MethodError`` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import require_mergekit_python, run_reference
from mergeforge.errors import MethodError
from mergeforge.methods.slerp import nuslerp, slerp
from mergeforge.methods.spherical import karcher, multislerp

pytestmark = pytest.mark.parity

REPO = Path(__file__).resolve().parents[2]
REL_TOL = 1e-6

_WORKER = r"""
import sys
import torch
from mergekit.merge_methods.api import merge_tensors

def run(case, dtype):
    tensors = [x.to(dtype) for x in case["tensors"]]
    try:
        return merge_tensors(tensors, case["method"], parameters=case["parameters"],
                             base_index=case["base_index"])
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

results = [(run(c, torch.float32), run(c, torch.float64)) for c in torch.load(sys.argv[1])]
torch.save(results, sys.argv[2])
"""

SHAPES = {"tiny": (6,), "mid": (37, 53), "big": (211, 307), "cube": (5, 7, 9)}
Ours = Callable[[], torch.Tensor]


def _families(shape: tuple[int, ...], seed: int) -> dict[str, tuple[torch.Tensor, list]]:
    """``ft``: a base and 3 fine-tunes 5% away (small angles); ``far``: 4 independent tensors."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    fts = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(3)]
    far = torch.randn(shape, generator=g)
    return {"ft": (base, fts), "far": (far, [torch.randn(shape, generator=g) for _ in range(3)])}


class _Cases:
    def __init__(self) -> None:
        self.cases: list[dict[str, Any]] = []
        self.ours: list[Ours] = []
        self.ids: list[str] = []

    def add(self, case_id: str, method: str, tensors, params, base_index, ours: Ours) -> None:
        self.cases.append(
            {"method": method, "tensors": list(tensors), "parameters": params,
             "base_index": base_index}
        )  # fmt: skip
        self.ours.append(ours)
        self.ids.append(case_id)


def _slerp_cases(c: _Cases, sid: str, fam: dict) -> None:
    for fid, (b, fts) in fam.items():
        for t in (0.3, 0.75) if fid == "far" else (0.3, 0.75, 1.4):
            c.add(f"slerp-{fid}-t{t}-{sid}", "slerp", [b, fts[0]], {"t": t}, 0,
                  lambda b=b, x=fts[0], t=t: slerp([x], b, t=t))  # fmt: skip
    if sid != "mid":
        return
    b, fts = fam["ft"]
    g = torch.Generator().manual_seed(11)
    specials = {
        "colinear": 1.7 * b + 0.02 * torch.randn(b.shape, generator=g),  # |cos| > 0.9995: lerp
        "antiparallel": -0.5 * b,
        "zero": torch.zeros_like(b),
    }
    for name, x in specials.items():
        c.add(f"slerp-{name}-{sid}", "slerp", [b, x], {"t": 0.4}, 0,
              lambda b=b, x=x: slerp([x], b, t=0.4))  # fmt: skip


def _nuslerp_cases(c: _Cases, sid: str, fam: dict) -> None:
    layouts = {"flat": (True, False), "rows": (False, False), "cols": (False, True)}
    for fid, (b, fts) in fam.items():
        for lid, (flatten, row_wise) in layouts.items():
            opts = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            for with_base in (False, True):
                w = (0.7, 0.4)
                tensors, bi = ([b, *fts[:2]], 0) if with_base else (fts[:2], None)
                c.add(f"nuslerp-{fid}-{lid}-{'base' if with_base else 'nobase'}-{sid}",
                      "nuslerp", tensors, {"weight": list(w), **opts}, bi,
                      lambda b=b if with_base else None, x=fts[:2], w=w, o=opts:
                      nuslerp(x, b, weight=w, **o))  # fmt: skip
    b, fts = fam["ft"]
    for w in ((1.0, -1.0), (-0.5, 1.5)):  # |Σw| < 1e-6 → t = 0.5; t = 1.5 extrapolates
        c.add(f"nuslerp-w{w}-{sid}", "nuslerp", [b, *fts[:2]], {"weight": list(w)}, 0,
              lambda b=b, x=fts[:2], w=w: nuslerp(x, b, weight=w))  # fmt: skip
    if len(b.shape) >= 2:  # model 0 leaves half the rows unchanged: zero task-vector rows
        x0 = fts[0].clone()
        x0[::2] = b[::2]
        for lid in ("rows", "cols"):
            opts = {"nuslerp_flatten": False, "nuslerp_row_wise": lid == "cols"}
            c.add(f"nuslerp-zero-rows-{lid}-{sid}", "nuslerp", [b, x0, fts[1]],
                  {"weight": [0.6, 0.6], **opts}, 0,
                  lambda b=b, x=[x0, fts[1]], o=opts: nuslerp(x, b, weight=(0.6, 0.6), **o))  # fmt: skip


def _multislerp_cases(c: _Cases, sid: str, fam: dict) -> None:
    w = (0.5, 0.3, 0.9)
    for fid, (b, fts) in fam.items():
        for norm in (True, False):
            for with_base in (False, True):
                tensors, bi = ([b, *fts], 0) if with_base else (fts, None)
                params = {"weight": list(w), "normalize_weights": norm}
                c.add(f"multislerp-{fid}-{'norm' if norm else 'raw'}-"
                      f"{'base' if with_base else 'nobase'}-{sid}", "multislerp", tensors, params,
                      bi, lambda b=b if with_base else None, x=fts, n=norm:
                      multislerp(x, b, weight=w, normalize_weights=n))  # fmt: skip
    b, fts = fam["ft"]
    g = torch.Generator().manual_seed(12)
    b = torch.randint(-64, 64, b.shape, generator=g) / 16.0  # on a grid: b ± d is exact
    d = torch.randint(-8, 9, b.shape, generator=g) / 16.0
    pair = [b + d, b - d]  # antipodal task vectors, equal weights: lerp fallback
    c.add(f"multislerp-antipodal-{sid}", "multislerp", [b, *pair], {"weight": [1.0, 1.0]}, 0,
          lambda b=b, x=pair: multislerp(x, b, weight=(1.0, 1.0)))  # fmt: skip
    triple = [b + d, b - d, b + d]  # mean direction vanishes with three models: an error
    c.add(f"multislerp-cancel-{sid}", "multislerp", [b, *triple],
          {"weight": [1.0, 2.0, 1.0]}, 0,
          lambda b=b, x=triple: multislerp(x, b, weight=(1.0, 2.0, 1.0)))  # fmt: skip
    c.add(f"multislerp-single-{sid}", "multislerp", [b, fts[0]], {"weight": [0.3]}, 0,
          lambda b=b, x=fts[0]: multislerp([x], b, weight=(0.3,)))  # fmt: skip


def _karcher_cases(c: _Cases, sid: str, fam: dict) -> None:
    for fid, (b, fts) in fam.items():
        for params in ({}, {"max_iter": 1}, {"tol": 1e-3}):
            pid = "-".join(f"{k}{v}" for k, v in params.items()) or "default"
            c.add(f"karcher-{fid}-{pid}-{sid}", "karcher", [*fts, b], params, None,
                  lambda x=[*fts, b], p=params: karcher(x, None, **p))  # fmt: skip
    b, fts = fam["far"]
    two = [fts[0], fts[1]]
    with_zero = [fts[0], torch.zeros_like(b), fts[1]]  # a zero input only counts in the scale
    for name, xs in (("two", two), ("with-zero", with_zero)):
        c.add(f"karcher-{name}-{sid}", "karcher", xs, {}, None,
              lambda x=xs: karcher(x, None))  # fmt: skip


def _build() -> _Cases:
    c = _Cases()
    for i, (sid, shape) in enumerate(SHAPES.items()):
        fam = _families(shape, seed=40 + i)
        _slerp_cases(c, sid, fam)
        _nuslerp_cases(c, sid, fam)
        _multislerp_cases(c, sid, fam)
        _karcher_cases(c, sid, fam)
    return c


CASES = _build()


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, Any]]:
    tmp = tmp_path_factory.mktemp("mk_spherical")
    return run_reference(require_mergekit_python(), _WORKER, CASES.cases, tmp)  # type: ignore[return-value]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@pytest.mark.parametrize("index", range(len(CASES.cases)), ids=CASES.ids)
def test_matches_mergekit(index: int, mergekit_results: list[tuple[Any, Any]]) -> None:
    mk32, mk64 = mergekit_results[index]
    case_id = CASES.ids[index]
    if isinstance(mk32, str):  # mergekit refuses: so must we
        assert isinstance(mk64, str), f"{case_id}: mergekit fails only in float32: {mk32}"
        with pytest.raises(MethodError):
            CASES.ours[index]()
        return
    ours = CASES.ours[index]()
    assert ours.shape == mk32.shape and ours.dtype == torch.float32
    scale = float(mk64.abs().max()) or 1.0
    exact_err = _max_diff(ours, mk64)
    assert exact_err <= REL_TOL * scale, f"{case_id}: vs float64 mergekit {exact_err / scale:.3g}"
    own_err = _max_diff(mk32, mk64)
    err = _max_diff(ours, mk32)
    assert err <= REL_TOL * scale + own_err, (
        f"{case_id}: vs float32 mergekit {err / scale:.3g} relative (mergekit's own float32 "
        f"error {own_err / scale:.3g})"
    )


def test_cases_exercise_the_branches() -> None:
    """Guards against vacuous parity: the special inputs really hit their branches."""
    ids = set(CASES.ids)
    assert {"slerp-colinear-mid", "multislerp-antipodal-mid", "multislerp-cancel-mid"} <= ids
    i = CASES.ids.index("slerp-colinear-mid")
    b, x = CASES.cases[i]["tensors"]
    cos = float(torch.dot(b.flatten(), x.flatten()) / (b.norm() * x.norm()))
    assert 0.9995 < cos < 1 - 1e-6, cos
    j = CASES.ids.index("slerp-ft-t0.3-mid")
    b, x = CASES.cases[j]["tensors"]
    lerp = 0.7 * b + 0.3 * x
    assert not torch.allclose(CASES.ours[j](), lerp, rtol=1e-6, atol=0)
    assert math.isfinite(float(CASES.ours[CASES.ids.index("karcher-with-zero-mid")]().sum()))

"""Artifacts of reversible merges: saved beside the merged model so each input can be rebuilt.

A method with an ``ArtifactSpec`` (TALL masks, RMM, ...) returns, per tensor, a few tensors from
which every input model's tensor can be recovered. The engine writes them to ``OUT/artifacts/``
(safetensors, names ``<tensor>::<key>``, laid out before the merge starts like the model itself)
with ``artifacts.json``: the method, the inputs in order, the base, every tensor's resolved
parameters, and the measured reconstruction error of each input model::

    rel_error_i = sqrt( Σ_tensors ||x̂_i − x_i||² / Σ_tensors ||x_i − b||² )

(``b`` = 0 without a base), where ``x̂_i`` is what ``mergeforge recover`` will rebuild: the
method's ``recover`` for tensors with artifacts, the merged tensor itself for the others.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mergeforge import __version__
from mergeforge.engine.plan import MergePlan, TensorPlan
from mergeforge.errors import CheckpointError, MethodError
from mergeforge.io import ShardedWriter, write_json

ARTIFACTS_DIR = "artifacts"
MANIFEST = "artifacts.json"
SEP = "::"


def wants_artifacts(plan: MergePlan, tp: TensorPlan) -> bool:
    """Whether this tensor's method call should return artifacts."""
    spec = plan.method.artifacts
    return tp.op == "merge" and spec is not None and bool(spec.enabled(tp.params))


def artifact_entries(plan: MergePlan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every artifact tensor the merge will write."""
    spec = plan.method.artifacts
    if spec is None:
        return []
    out = []
    for tp in plan.tensors:
        if wants_artifacts(plan, tp):
            shapes = spec.shapes(tp.shape, len(tp.inputs), tp.params)
            out += [(f"{tp.name}{SEP}{k}", dt, tuple(sh)) for k, (sh, dt) in shapes.items()]
    return out


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class ArtifactSaver:
    """Writes one merge's artifacts and accumulates the reconstruction error of every input.

    ``add`` is called from the compute thread for every merged tensor (with or without artifacts);
    ``finish`` writes ``artifacts.json``.
    """

    def __init__(self, plan: MergePlan, out_dir: Path, shard_size: int) -> None:
        self.plan = plan
        self.dir = out_dir / ARTIFACTS_DIR
        self.dir.mkdir()
        meta = {"mergeforge": __version__, "method": plan.method.name}
        self.writer = ShardedWriter(self.dir, artifact_entries(plan), shard_size, metadata=meta)
        k = len(plan.models)
        self.err = torch.zeros(k, dtype=torch.float64)
        self.norm = torch.zeros(k, dtype=torch.float64)
        self.lock = threading.Lock()

    def add(
        self,
        tp: TensorPlan,
        tensors: Sequence[Tensor],
        base: Tensor | None,
        merged: Tensor,
        arts: Mapping[str, Tensor] | None,
    ) -> None:
        """Save ``arts`` of ``tp`` and account how well each input comes back."""
        spec = self.plan.method.artifacts
        assert spec is not None
        if arts is not None:
            self._write(tp, arts)
        for i, x in enumerate(tensors):
            rec = spec.recover(arts, base, i, tp.params) if arts is not None else merged
            ref = x if base is None else x - base
            with self.lock:
                self.err[i] += float((rec.to(x.device, torch.float32) - x).double().square().sum())
                self.norm[i] += float(ref.double().square().sum())

    def _write(self, tp: TensorPlan, arts: Mapping[str, Tensor]) -> None:
        spec = self.plan.method.artifacts
        assert spec is not None
        want = spec.shapes(tp.shape, len(tp.inputs), tp.params)
        if set(arts) != set(want):
            raise MethodError(
                f"method {self.plan.method.name!r} returned artifacts {sorted(arts)} for tensor "
                f"{tp.name!r}, its spec declares {sorted(want)} (a bug in the method)"
            )
        for key, t in arts.items():
            shape, dtype = want[key]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise MethodError(
                    f"artifact {key!r} of tensor {tp.name!r}: got {list(t.shape)} {t.dtype}, "
                    f"declared {list(shape)} {dtype} (a bug in method {self.plan.method.name!r})"
                )
            self.writer.write(f"{tp.name}{SEP}{key}", t.to("cpu").contiguous())

    def rel_errors(self) -> list[float]:
        """Per input model: relative reconstruction error (see the module docstring)."""
        return [
            math.sqrt(e / n) if n > 0 else (0.0 if e == 0 else math.inf)
            for e, n in zip(self.err.tolist(), self.norm.tolist(), strict=True)
        ]

    def finish(self) -> dict[str, object]:
        """Close the files and write the manifest; returns it."""
        self.writer.close()
        plan = self.plan
        manifest: dict[str, object] = {
            "format": "mergeforge-artifacts/1",
            "method": plan.method.name,
            "base": plan.base,
            "base_path": str(plan.paths[plan.base]) if plan.base else None,
            "models": [
                {"label": m, "path": str(plan.paths.get(m, m)), "rel_error": err}
                for m, err in zip(plan.models, self.rel_errors(), strict=True)
            ],
            "tensors": {
                tp.name: {
                    "base_tensor": tp.base.info.name if tp.base else None,
                    "params": {k: _jsonable(v) for k, v in tp.params.items()},
                }
                for tp in plan.tensors
                if wants_artifacts(plan, tp)
            },
        }
        write_json(self.dir / MANIFEST, manifest)
        return manifest

    def abort(self) -> None:
        self.writer.abort()


def read_manifest(out_dir: Path) -> dict:
    """``OUT/artifacts/artifacts.json`` of a finished reversible merge."""
    path = Path(out_dir) / ARTIFACTS_DIR / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist: {out_dir} was not merged by a reversible method with its "
            "artifacts saved (e.g. `tall_masks`, `consensus` with `save_masks: true`, `rmm`)"
        ) from None

"""`mergeforge recover`: rebuild one input model of a reversible merge from its artifacts.

For every tensor of the merged model ``OUT``: where ``OUT/artifacts/`` holds artifacts for it, the
method's ``ArtifactSpec.recover(artifacts, base, i, params)`` rebuilds input ``i``'s tensor from
them and the base tensor; every other tensor (copied or merged without artifacts) is the merged
tensor. Streams tensor by tensor into an atomic output directory with the merged model's config
and tokenizer files; the relative error measured at merge time is printed and recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeforge import __version__
from mergeforge.engine.artifacts import ARTIFACTS_DIR, SEP, read_manifest
from mergeforge.errors import CheckpointError, PlanError
from mergeforge.io import (
    Checkpoint,
    ShardedWriter,
    atomic_output_dir,
    copy_side_files,
    open_checkpoint,
)
from mergeforge.methods import get_method


@dataclass(frozen=True)
class RecoverResult:
    """What ``recover`` wrote: which input, its measured relative error, how long it took."""

    out_dir: Path
    model: str
    index: int
    rel_error: float
    tensors: int
    seconds: float


def _model_index(manifest: dict, model: str | int) -> int:
    labels = [m["label"] for m in manifest["models"]]
    if isinstance(model, int) or str(model).isdigit():
        i = int(model)
        if 0 <= i < len(labels):
            return i
    elif model in labels:
        return labels.index(model)
    listing = ", ".join(f"{i}: {lb}" for i, lb in enumerate(labels))
    raise PlanError("cannot recover", [f"no input model {model!r}; the inputs are {listing}"])


def _params(stored: dict) -> dict[str, object]:
    """Parameters as the method saw them (JSON lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}


def _artifact_keys(arts: Checkpoint) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for full in arts.tensors:
        name, _, key = full.rpartition(SEP)
        keys.setdefault(name, []).append(key)
    return keys


def _open_base(manifest: dict, base: str | Path | None) -> Checkpoint | None:
    path = base if base is not None else manifest.get("base_path")
    if path is None:
        return None
    try:
        return open_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"cannot open the base model of the merge ({path}): {exc} Pass the base model's "
            "location with --base."
        ) from None


def recover(
    merged_dir: str | Path,
    model: str | int,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> RecoverResult:
    """Rebuild input ``model`` (index or label) of the reversible merge in ``merged_dir``."""
    t0 = time.perf_counter()
    src = Path(merged_dir)
    manifest = read_manifest(src)
    spec = get_method(manifest["method"])
    if spec.artifacts is None:
        raise PlanError("cannot recover", [f"method {spec.name!r} saves no artifacts"])
    i = _model_index(manifest, model)
    merged = open_checkpoint(src)
    arts = open_checkpoint(src / ARTIFACTS_DIR)
    base_ck = _open_base(manifest, base)
    try:
        keys = _artifact_keys(arts)
        entries = [(n, t.dtype, t.shape) for n, t in merged.tensors.items()]
        with atomic_output_dir(Path(out_dir), overwrite) as tmp:
            meta = {"mergeforge": __version__, "recovered_from": str(src)}
            with ShardedWriter(tmp, entries, 5 * 10**9, metadata=meta) as writer:
                for name, info in merged.tensors.items():
                    stored = manifest["tensors"].get(name)
                    if stored is None or name not in keys:
                        writer.write(name, merged.read(name))
                        continue
                    x = _rebuild(spec, name, keys[name], arts, base_ck, stored, i)
                    writer.write(name, x.to(info.dtype).contiguous())
            _copy_side(src, tmp)
    finally:
        for ck in (merged, arts, base_ck):
            if ck is not None:
                ck.close()
    entry = manifest["models"][i]
    err = float(entry["rel_error"])
    return RecoverResult(Path(out_dir), entry["label"], i, err, len(entries),
                         time.perf_counter() - t0)  # fmt: skip


def _rebuild(spec, name, keys, arts, base_ck, stored, i) -> torch.Tensor:
    tensors = {k: arts.read(f"{name}{SEP}{k}") for k in keys}
    base_name = stored.get("base_tensor")
    b = None
    if base_name is not None:
        if base_ck is None or base_name not in base_ck.tensors:
            where = base_ck.root if base_ck is not None else "(no base given)"
            raise CheckpointError(
                f"tensor {base_name!r} is missing from the base model {where}; pass the base "
                "model the merge used with --base"
            )
        b = base_ck.read(base_name).to(torch.float32)
    return spec.artifacts.recover(tensors, b, i, _params(stored["params"]))


def _copy_side(src: Path, tmp: Path) -> None:
    copy_side_files(src, tmp)
    cfg = src / "config.json"
    if cfg.is_file():
        (tmp / "config.json").write_bytes(cfg.read_bytes())

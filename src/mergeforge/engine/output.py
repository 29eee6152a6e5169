"""What every kind of merge writes besides the weights, shared by ``merge`` and ``merge_continual``.

The result record, device and output-directory checks, the sha256 of every input (hashed on a
thread during the merge), ``config.json`` and tokenizer files, and the model card.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeforge import __version__
from mergeforge.config import OPT_INS
from mergeforge.engine.models import resolve_path
from mergeforge.engine.plan import MergePlan
from mergeforge.errors import OutputError, PlanError
from mergeforge.io import arch, copy_side_files, render_model_card, sha256_file, write_json


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote and how long it took."""

    out_dir: Path
    files: tuple[str, ...]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    rel_errors: tuple[tuple[str, float], ...] = ()
    """Reversible merges: each input's relative reconstruction error (``mergeforge recover``)."""


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OutputError(
            f"--device {device}: CUDA is not available on this machine (torch "
            f"{torch.__version__}); use --device cpu"
        )
    if not (device == "cpu" or device.startswith("cuda")):
        raise OutputError(f"--device {device!r} is not supported; use cpu or cuda[:N]")


class HashInputs:
    """sha256 of every input file, computed on a background thread during the merge."""

    def __init__(self, plan: MergePlan) -> None:
        files = sorted({f for ck in plan.checkpoints.values() for f in ck.files})
        self.hashes: dict[Path, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(files,), daemon=True)
        self.thread.start()

    def _run(self, files: list[Path]) -> None:
        try:
            for f in files:
                self.hashes[f] = sha256_file(f)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self) -> dict[Path, str]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.hashes


def output_config(plan: MergePlan) -> dict | None:
    ref = plan.checkpoints[plan.reference]
    if ref.config is None:
        return None
    cfg = copy.deepcopy(ref.config)
    if plan.recipe.slices and plan.num_layers is not None:  # layer stacking changes the depth
        arch.set_num_layers(cfg, plan.num_layers)
    wanted = plan.recipe.out_dtype or plan.recipe.dtype
    if wanted:  # as mergekit: recorded only when the recipe sets a dtype
        cfg["dtype"] = wanted
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = wanted
    return cfg


def write_side_files(plan: MergePlan, tmp: Path) -> None:
    cfg = output_config(plan)
    if cfg is not None:
        write_json(tmp / "config.json", cfg)
    src = tokenizer_dir(plan)
    if src is not None:
        copy_side_files(src, tmp)


def tokenizer_dir(plan: MergePlan) -> Path | None:
    label = plan.recipe.tokenizer_source
    if label in (None, "base"):
        path = plan.paths.get(plan.reference)
    else:
        path, problem = resolve_path(label, plan.recipe.path.parent if plan.recipe.path else None)
        if problem:
            raise PlanError("tokenizer_source", [problem])
    if path is None:
        return None
    return path if path.is_dir() else path.parent


def write_card(
    plan: MergePlan,
    tmp: Path,
    hashes: dict[Path, str],
    rel_errors: tuple[tuple[str, float], ...] = (),
) -> None:
    spec = plan.method
    opt_ins = [f"{o}: {OPT_INS[o]}" for o in plan.opt_ins_used]
    if plan.recipe.lines is not None:
        a, b = plan.recipe.lines
        opt_ins.append(f"lines: LiNeS post-scaling, out = b + ({a:g} + {b:g}·ℓ/(L−1))·(merged − b)")
    text = render_model_card(
        recipe_yaml=plan.recipe.text or f"merge_method: {spec.name}\n",
        version=__version__,
        methods=[(spec.name, spec.paper)],
        inputs=[(str(f), h) for f, h in sorted(hashes.items())],
        opt_ins=opt_ins,
        base_model=plan.base,
        reversible=[(m, f"{e:.3g}") for m, e in rel_errors],
    )
    (tmp / "README.md").write_text(text, encoding="utf-8")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early when ``out`` cannot become the output directory."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file; give a directory path")
    if out.exists() and not overwrite:
        raise OutputError(
            f"output directory {out} already exists; pass --overwrite to replace it or choose "
            "another directory"
        )

"""Merging LoRA adapters in factor space (``mergeforge: {factor_space: true}``).

Every input is a PEFT LoRA adapter of one base model. Instead of merging the dense models
``W + s·B A``, the method merges ``lora_A`` with ``lora_A`` and ``lora_B`` with ``lora_B`` (scales
folded into ``lora_B``), each adapter's factors being its own task vector (the base of a
task-vector method is zero), and the output is a PEFT adapter (``adapter_model.safetensors`` +
``adapter_config.json`` with scale 1) for the same base. This needs adapters with the same
target modules and the same rank per module; the error says which differ. Only methods marked
``factor_space`` run here: those that act entry by entry on task vectors, where merging factors
is what LoRA-merging papers do (TA/TIES/DARE on A and B separately, as in PEFT's
``add_weighted_adapter`` ``linear``/``ties``/``dare_*`` combinations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mergeforge.config import Recipe
from mergeforge.engine.models import resolve_path, split_adapter
from mergeforge.errors import CheckpointError
from mergeforge.io import is_adapter_dir
from mergeforge.io.lora_factors import FactorCheckpoint, ZeroCheckpoint, output_adapter_config

OPT_IN = "factor_space"
ADAPTER_FILE = "adapter_model.safetensors"


def factor_mode(recipe: Recipe) -> bool:
    """Whether the recipe merges adapters in factor space."""
    return OPT_IN in recipe.opt_ins


def open_factor_models(recipe: Recipe, labels: Sequence[str]) -> tuple[dict, dict, list[str]]:
    """Open the recipe's adapters as factor checkpoints and its base as zero factors."""
    recipe_dir = recipe.path.parent if recipe.path else None
    opened: dict[str, object] = {}
    paths: dict[str, Path] = {}
    problems: list[str] = []
    if any(m.model == recipe.base_model for m in recipe.models):
        problems.append(
            f"base model {recipe.base_model!r} is also listed under `models:`; in factor space "
            "every input must be a LoRA adapter of the base (the base itself has no factors)"
        )
    for label in labels:
        if label == recipe.base_model:
            continue
        base_part, adapter_part = split_adapter(label, recipe_dir)
        path, problem = resolve_path(adapter_part or base_part, recipe_dir)
        if problem or path is None:
            problems.append(problem or f"model {label!r} not found")
            continue
        if not is_adapter_dir(path):
            problems.append(
                f"model {label!r} ({path}) is not a PEFT LoRA adapter directory; with "
                "`factor_space: true` every model must be an adapter of the base"
            )
            continue
        try:
            opened[label] = FactorCheckpoint(path)
        except CheckpointError as exc:
            problems.append(f"model {label!r}: {exc}")
            continue
        paths[label] = path
    if opened and not problems:
        problems += compatibility_problems(opened)
    if recipe.base_model and opened:
        first = next(iter(opened.values()))
        base_path, problem = resolve_path(recipe.base_model, recipe_dir)
        if problem:
            problems.append(problem)
        else:
            opened[recipe.base_model] = ZeroCheckpoint(first, base_path)
            paths[recipe.base_model] = base_path
    return opened, paths, problems


def compatibility_problems(adapters: Mapping[str, FactorCheckpoint]) -> list[str]:
    """Different target modules or ranks between adapters, named module by module."""
    items = list(adapters.items())
    ref_label, ref = items[0]
    ref_mods = ref.modules()
    problems = []
    for label, ck in items[1:]:
        mods = ck.modules()
        only_ref = sorted(set(ref_mods) - set(mods))
        only_this = sorted(set(mods) - set(ref_mods))
        if only_ref or only_this:
            problems.append(
                f"adapters {ref_label!r} and {label!r} adapt different modules (only in the "
                f"first: {_few(only_ref)}; only in the second: {_few(only_this)}); factor-space "
                "merging needs the same target modules. Merge in weight space instead (drop "
                "`factor_space`), where any adapters of one base combine"
            )
            continue
        diff = [(m, ref_mods[m], mods[m]) for m in ref_mods if ref_mods[m] != mods[m]]
        if diff:
            shown = ", ".join(f"{m}: r={a} vs r={b}" for m, a, b in diff[:3])
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            problems.append(
                f"adapters {ref_label!r} and {label!r} have different LoRA ranks ({shown}{more}); "
                "factor-space merging pairs rank dimensions one to one, so ranks must be equal. "
                "Merge in weight space instead (drop `factor_space`)"
            )
    return problems


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def adapter_output_config(
    opened: Mapping[str, object], models: Sequence[str], base: Path | None
) -> dict:
    """``adapter_config.json`` for the merged adapter."""
    first = opened[models[0]]
    assert isinstance(first, FactorCheckpoint)
    return output_adapter_config(first.adapter_config, first.modules(), str(base) if base else None)

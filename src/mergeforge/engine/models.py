"""Resolve the models a recipe names into opened checkpoints (headers only, no tensor bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeforge.config import Recipe
from mergeforge.errors import CheckpointError
from mergeforge.io import Checkpoint, open_checkpoint


@dataclass(frozen=True)
class ModelRef:
    """A model as the recipe names it (``label``) and where it lives on disk."""

    label: str
    path: Path


def resolve_path(label: str, recipe_dir: Path | None) -> tuple[Path | None, str | None]:
    """Local path for a recipe model string, or a problem explaining why there is none."""
    if "+" in label:
        return None, (
            f"model {label!r}: `base+adapter` (PEFT LoRA inputs) is not supported yet; merge the "
            "adapter into its base first (peft `merge_and_unload`) and name that directory"
        )
    candidates = [Path(label).expanduser()]
    if recipe_dir is not None and not Path(label).is_absolute():
        candidates.append(recipe_dir / label)
    for c in candidates:
        if c.exists():
            return c.resolve(), None
    hint = ""
    if "/" in label and not label.startswith((".", "/", "~")) and label.count("/") == 1:
        hint = (
            " It looks like a Hugging Face Hub id: mergeforge never downloads; fetch it first "
            f"(`huggingface-cli download {label} --local-dir DIR`) and put DIR in the recipe."
        )
    return (
        None,
        f"model {label!r}: no such file or directory (looked in {', '.join(map(str, candidates))}).{hint}",
    )


def open_models(
    recipe: Recipe, labels: Sequence[str]
) -> tuple[dict[str, Checkpoint], dict[str, Path], list[str]]:
    """Open every model's checkpoint index; collect problems instead of stopping at the first."""
    recipe_dir = recipe.path.parent if recipe.path else None
    opened: dict[str, Checkpoint] = {}
    paths: dict[str, Path] = {}
    problems: list[str] = []
    by_path: dict[Path, Checkpoint] = {}
    for label in labels:
        path, problem = resolve_path(label, recipe_dir)
        if problem or path is None:
            problems.append(problem or f"model {label!r} not found")
            continue
        paths[label] = path
        if path in by_path:
            opened[label] = by_path[path]
            continue
        try:
            ckpt = open_checkpoint(path)
        except CheckpointError as exc:
            problems.append(f"model {label!r}: {exc}")
            continue
        by_path[path] = ckpt
        opened[label] = ckpt
    return opened, paths, problems


def same_model(a: Path | None, b: Path | None) -> bool:
    """Whether two resolved paths name the same model."""
    return a is not None and b is not None and a.resolve() == b.resolve()

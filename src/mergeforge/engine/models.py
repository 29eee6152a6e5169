"""Resolve the models a recipe names into opened checkpoints (headers only, no tensor bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeforge.config import Recipe
from mergeforge.errors import CheckpointError
from mergeforge.io import AdaptedCheckpoint, Checkpoint, is_adapter_dir, open_checkpoint


@dataclass(frozen=True)
class ModelRef:
    """A model as the recipe names it (``label``) and where it lives on disk."""

    label: str
    path: Path


def resolve_path(label: str, recipe_dir: Path | None) -> tuple[Path | None, str | None]:
    """Local path for a recipe model string, or a problem explaining why there is none."""
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
        base_label, adapter_label = split_adapter(label, recipe_dir)
        path, problem = resolve_path(adapter_label or base_label, recipe_dir)
        if problem or path is None:
            problems.append(problem or f"model {label!r} not found")
            continue
        paths[label] = path
        if path in by_path:
            opened[label] = by_path[path]
            continue
        try:
            ckpt = _open(label, base_label if adapter_label else None, path, recipe_dir)
        except CheckpointError as exc:
            problems.append(f"model {label!r}: {exc}")
            continue
        by_path[path] = ckpt
        opened[label] = ckpt
        problems += _base_mismatch(recipe, label, ckpt, recipe_dir)
    return opened, paths, problems


def _base_mismatch(recipe: Recipe, label: str, ckpt, recipe_dir: Path | None) -> list[str]:
    """An adapter applied to one base while the recipe's ``base_model`` is another: every task
    vector would carry the difference of the two bases."""
    if not isinstance(ckpt, AdaptedCheckpoint) or not recipe.base_model:
        return []
    if label == recipe.base_model:
        return []
    want, _ = resolve_path(recipe.base_model, recipe_dir)
    have = ckpt.base.root
    if want is None or same_model(Path(have), want):
        return []
    return [
        f"model {label!r} is adapter {ckpt.adapter_dir} applied to base {have}, but the recipe's "
        f"base_model is {want}; task vectors would include the difference of the two bases. "
        "Apply the adapter to the recipe's base model (write BASE+ADAPTER) or change base_model"
    ]


def split_adapter(label: str, recipe_dir: Path | None) -> tuple[str, str | None]:
    """``"BASE+ADAPTER"`` → ``(BASE, ADAPTER)``; a plain path (even one holding '+') → ``(label,
    None)``. The split is at the last '+' whose left side exists."""
    if "+" not in label or resolve_path(label, recipe_dir)[0] is not None:
        return label, None
    head, _, tail = label.rpartition("+")
    return head, tail


def _open(label: str, base_label: str | None, path: Path, recipe_dir: Path | None):
    """The checkpoint behind a label: a model, ``base+adapter``, or an adapter directory whose
    ``adapter_config.json`` names its base (``base_model_name_or_path``, a local path)."""
    if base_label is None and not is_adapter_dir(path):
        return open_checkpoint(path)
    if base_label is None:
        base_label = str(_adapter_base(path))
    base_path, problem = resolve_path(base_label, recipe_dir or path)
    if problem or base_path is None:
        raise CheckpointError(problem or f"base of adapter {path} not found")
    if not is_adapter_dir(path):
        raise CheckpointError(
            f"{path} is not a PEFT adapter directory (no adapter_config.json); in "
            f"{label!r} the part after '+' must be a LoRA adapter"
        )
    return AdaptedCheckpoint(open_checkpoint(base_path), path)


def _adapter_base(adapter: Path) -> Path:
    import json

    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    name = cfg.get("base_model_name_or_path")
    if not name:
        raise CheckpointError(
            f"adapter {adapter} does not name its base model (base_model_name_or_path); write "
            "it as BASE+ADAPTER in the recipe"
        )
    p = Path(name).expanduser()
    return p if p.is_absolute() else (adapter / p).resolve() if (adapter / p).exists() else p


def same_model(a: Path | None, b: Path | None) -> bool:
    """Whether two resolved paths name the same model."""
    return a is not None and b is not None and a.resolve() == b.resolve()

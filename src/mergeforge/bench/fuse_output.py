"""What ``mergeforge fuse`` writes: a fused model directory that ``mergeforge.load`` reads back.

Every output directory holds ``fusion.json`` (what was fused, how, on which data, with what
accuracy; ``kind`` says how to load it), a model card ``README.md``, the tokenizer and, per task,
its classification head: ``heads/<task>.safetensors`` (the fine-tuned classifier's tensors outside
its encoder) and ``heads/<task>.json`` (the classifier's config: labels, ``model_type``). Then:

* ``kind: static`` — the fused encoder as a plain Hugging Face directory (``config.json``,
  ``model.safetensors``), loadable with ``AutoModel.from_pretrained``; where the result is
  θ0 + Σ_t λ_{t,k} τ_t^k (AdaMerging) also ``recipe.yaml``, a ``task_arithmetic`` recipe with one
  ``{filter: TENSOR, value: λ_{t,k}}`` entry per tensor that the streaming engine applies to the
  pool's encoder directories to give the same tensors.
* ``kind: dynamic`` — the upscaled model (WEMoE, SMILE, Twin-Merging): ``model.safetensors`` with
  every tensor of the module, ``config.json`` of the base body, and in ``fusion.json`` the
  ``loader`` (dotted name of ``rebuild(body, description, tensors)``), its ``description`` and the
  ``body_class`` to build the body with.

Everything goes through ``engine.save_state.write_state_dir``: atomic, as ``mergeforge merge``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mergeforge.engine.save_state import write_state_dir
from mergeforge.io.side_files import TOKENIZER_FILES, copy_side_files, sha256_file

FORMAT = "mergeforge-fusion/1"
HEADS_DIR = "heads"


@dataclass(frozen=True)
class Head:
    """One task's classification head: its tensors and the JSON record written beside them."""

    task: str
    tensors: dict[str, Tensor]
    record: dict[str, Any]


def extract_head(task: str, model: Any, label_names: Sequence[str], source: Path) -> Head:
    """The tensors of ``model`` (a ``ForSequenceClassification`` model) outside its encoder
    (``base_model_prefix``), and a record with its config (labels, ``model_type``)."""
    prefix = f"{model.base_model_prefix}."
    tensors = {
        k: v.detach().to("cpu").clone()
        for k, v in model.state_dict().items()
        if not k.startswith(prefix)
    }
    cfg = model.config
    record = {
        "task": task,
        "model_type": str(cfg.model_type),
        "architecture": type(model).__name__,
        "base_model_prefix": model.base_model_prefix,
        "num_labels": int(cfg.num_labels),
        "id2label": {str(k): str(v) for k, v in cfg.id2label.items()},
        "label_names": list(label_names),
        "tensors": sorted(tensors),
        "source": str(source),
        "config": json.loads(cfg.to_json_string(use_diff=False)),
    }
    return Head(task, tensors, record)


def write_heads(directory: Path, heads: Sequence[Head]) -> None:
    """``heads/<task>.safetensors`` and ``heads/<task>.json`` for every head."""
    from safetensors.torch import save_file

    out = directory / HEADS_DIR
    out.mkdir()
    for head in heads:
        tensors = {k: v.contiguous() for k, v in head.tensors.items()}
        save_file(tensors, str(out / f"{head.task}.safetensors"), metadata={"format": "pt"})
        (out / f"{head.task}.json").write_text(json.dumps(head.record, indent=1) + "\n")


def unshare(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU tensors, each holding its own memory: a tensor whose storage another one already uses
    (tied or shared weights) is cloned, so every name is written with its values."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        key = (str(t.device), t.untyped_storage().data_ptr())
        out[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    return out


def recipe_yaml(
    coefficients: Mapping[str, Mapping[str, float]],
    base_dir: Path,
    encoder_dirs: Mapping[str, Path],
    algorithm: str,
) -> str:
    """A ``task_arithmetic`` recipe reproducing θ0 + Σ_t λ_{t,k} τ_t^k.

    Filters match by substring and the first matching entry wins (``config.evaluate_setting``),
    so entries are sorted longest name first: a filter listed before tensor k's own entry is at
    least as long as k's name, so it matches k only if it is k's name. Tensors without a
    coefficient (not fused) get λ = 0, i.e. θ0, as the fused state has them."""
    import yaml

    models = []
    for task, lams in coefficients.items():
        entries = [{"filter": n, "value": float(lams[n])} for n in sorted(lams, key=_longest)]
        entries.append({"filter": "*", "value": 0.0})
        models.append(
            {"model": str(Path(encoder_dirs[task]).resolve()), "parameters": {"weight": entries}}
        )
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(Path(base_dir).resolve()),
        "parameters": {"lambda": 1.0, "normalize": False},
        "dtype": "float32",
        "out_dtype": "float32",
        "models": models,
    }
    head = (
        f"# {algorithm} coefficients as a recipe: `mergeforge merge recipe.yaml OUT` applies\n"
        "# theta0 + sum_t lambda_{t,k} (theta_t - theta0) to the pool's encoder directories\n"
        "# (each task's weight lists lambda per tensor k; point the paths at full-size checkpoints\n"
        "# of the same architecture to apply the same coefficients there).\n"
    )
    return head + yaml.safe_dump(recipe, sort_keys=False, width=200)


def _longest(name: str) -> tuple[int, str]:
    return (-len(name), name)


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists, paths and unknown objects as strings, tensors as lists and
    non-finite floats as ``None`` (fusion.json is strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def weight_files(model_dir: Path) -> list[tuple[str, str]]:
    """``(path, sha256)`` of every weight file (``*.safetensors``, ``*.bin``) of ``model_dir``."""
    files = sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")])
    return [(str(f.resolve()), sha256_file(f)) for f in files]


def tokenizer_source(candidates: Sequence[Path]) -> Path | None:
    """The first directory holding tokenizer files."""
    for d in candidates:
        if any((Path(d) / n).is_file() for n in TOKENIZER_FILES):
            return Path(d)
    return None


def write_fused_dir(
    out_dir: Path,
    tensors: Mapping[str, Tensor],
    *,
    config_from: Path,
    record: Mapping[str, Any],
    card: str,
    heads: Sequence[Head] = (),
    recipe: str | None = None,
    tokenizer_from: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a fused model directory (module docstring) atomically: ``tensors`` as safetensors,
    ``config.json`` (and side files) of ``config_from``, ``fusion.json`` = ``record``, the card,
    the heads, ``recipe.yaml`` when given and the tokenizer files of ``tokenizer_from``."""

    def extra(tmp: Path) -> None:
        if tokenizer_from is not None:
            copy_side_files(tokenizer_from, tmp)
        if heads:
            write_heads(tmp, heads)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(recipe, encoding="utf-8")

    return write_state_dir(
        out_dir,
        unshare(tensors),
        config_from=config_from,
        json_files={"fusion.json": jsonable(record)},
        card=card,
        extra=extra,
        overwrite=overwrite,
    )


def full_state(base: Mapping[str, Tensor], fused: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """θ0's tensors with the fused ones in their place (every name of ``fused`` must be in θ0
    with the same shape: the result then loads with no missing or unexpected keys)."""
    from mergeforge.errors import FusionError

    out = dict(base)
    for name, t in fused.items():
        if name not in base or tuple(base[name].shape) != tuple(t.shape):
            raise FusionError(
                f"the fused tensor {name!r} {tuple(t.shape)} is not in the base encoder "
                f"(or has another shape there); the result does not fit the base architecture"
            )
        out[name] = t.detach().to("cpu")
    return out


def _cell(value: Any) -> str:
    text = (
        json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    )
    return text.replace("|", "\\|").replace("\n", " ")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _accuracy_rows(accuracy: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> list[str]:
    val, test = accuracy.get("validation", {}), accuracy.get("test", {})
    rows = ["| task | validation accuracy (%) | test accuracy (%) |", "| --- | --- | --- |"]
    rows += [f"| {_cell(t)} | {_pct(val.get(t))} | {_pct(test.get(t))} |" for t in tasks]
    means = [sum(a.values()) / len(a) if a else None for a in (val, test)]
    return [*rows, f"| **mean** | {_pct(means[0])} | {_pct(means[1])} |"]


def _usage(record: Mapping[str, Any]) -> list[str]:
    task = record["tasks"][0]
    lines = ["```python", "import mergeforge"]
    if record["kind"] == "static":
        lines += [
            "from transformers import AutoModel",
            "",
            "encoder = AutoModel.from_pretrained(DIR)  # the fused encoder (no task head)",
        ]
    else:
        lines += ["", "body = mergeforge.load(DIR)  # the upscaled model, called like the encoder"]
    lines += [
        f"classifier = mergeforge.load(DIR, task={task!r})  # with that task's head: .logits",
        "```",
    ]
    return lines


def _data_line(data: Mapping[str, Any]) -> str:
    if data["split"] is None:
        return f"{data['reads']}: the algorithm reads no data."
    counts = ", ".join(f"{t} {n}" for t, n in data["examples"].items())
    return (
        f"{data['reads']}: {data['used']} (at most {data['max_examples']} examples per task, a "
        f"seeded random subset). Examples read per task: {counts}."
    )


def model_card(record: Mapping[str, Any]) -> str:
    """The ``README.md`` of a fused model: algorithm and paper, parameters, inputs with their
    sha256, the data the algorithm read, per-task accuracy of the fused model, how to load it."""
    data, inputs = record["data"], record["inputs"]
    kind = (
        "a static model: one set of encoder weights, a plain Hugging Face directory"
        if record["kind"] == "static"
        else f"a dynamic model (new modules on the {record['body_class']} body), rebuilt by "
        "`mergeforge.load`"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- mergeforge",
        "- model-fusion",
        f"- {record['algorithm']}",
        "---",
        "",
        f"# {record['algorithm']} fusion of {len(record['tasks'])} task models",
        "",
        f"Made with mergeforge {record['mergeforge']} (`mergeforge fuse`) from the user pool "
        f"`{record['pool']}`: **{record['algorithm']}** — {record['doc']} "
        f"([paper]({record['paper']})). The result is {kind}.",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "| --- | --- |",
        *(f"| `{k}` | `{_cell(v)}` |" for k, v in record["parameters"].items()),
        "",
        "## Inputs",
        "",
        "| role | file | sha256 |",
        "| --- | --- | --- |",
        *(f"| base | `{_cell(p)}` | `{h}` |" for p, h in inputs["base"]),
        *(
            f"| task {_cell(t)} | `{_cell(p)}` | `{h}` |"
            for t, files in inputs["tasks"].items()
            for p, h in files
        ),
        "",
        "## Data used",
        "",
        _data_line(data),
        "",
        "## Accuracy of the fused model",
        "",
        "Each task's own fine-tuned head on the fused model, measured after fusing on the pool's "
        "validation and test files (every example).",
        "",
        *_accuracy_rows(record["accuracy"], record["tasks"]),
        "",
        "## Loading",
        "",
        *_usage(record),
        "",
    ]
    if record.get("recipe"):
        lines += [
            "## Recipe",
            "",
            "`recipe.yaml` holds the learned coefficients as a `task_arithmetic` recipe with one "
            "weight per tensor: `mergeforge merge recipe.yaml OUT` gives these weights from the "
            "task models' encoders.",
            "",
        ]
    return "\n".join(lines)

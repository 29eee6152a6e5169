"""What a CLIP pool derives from its cached repos, built once: base vision tower and zero-shot heads.

``build_derived(root, base_snapshot, task_snapshots, config)`` writes, atomically,

    root/base/                     the pretrained CLIP's vision tower as a ``CLIPVisionModel``
                                   (``vision_model.*``): the merge base
    root/tasks/<task>/encoder/     only for a fine-tuned repo not stored as a safetensors
                                   ``CLIPVisionModel`` (e.g. ``pytorch_model.bin``): converted
    root/heads.safetensors         ``head.<task>`` (C_t, D) zero-shot heads, the pretrained
                                   ``visual_projection.weight`` (D, H) and ``logit_scale``
    root/preprocessor_config.json  the base's image preprocessing
    root/manifest.json             the build config

The zero-shot head of a task (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision", §3.1.4; FusionBench's ``HFCLIPClassifier.set_classification_task``):
for class c with prompts ``p_1 … p_K`` (templates filled with the class name),

    e_k = P_text · pool(text_model(p_k)),   ê_k = e_k / ‖e_k‖,
    w_c = mean_k ê_k / ‖mean_k ê_k‖,

and a task's logits are ``logit_scale · ⟨w_c, v / ‖v‖⟩`` with ``v = P_vis · pool(vision(x))``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergeforge.bench.clip_classnames import CLASSNAMES, TEMPLATES
from mergeforge.bench.pools import build_atomically
from mergeforge.errors import PoolError

HEADS_FILE = "heads.safetensors"
PROJECTION = "visual_projection.weight"
TEXT_BATCH = 256
VISION_PREFIX = "vision_model."


def zero_shot_head(
    model: Any, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, D) unit rows ``w_c``: normalized mean of the normalized template embeddings of class c.

    ``model``: a ``CLIPModel``; ``templates``: ``str.format`` patterns with one ``{}``.
    """
    prompts = [t.format(c) for c in classnames for t in templates]  # class-major
    max_len = int(model.config.text_config.max_position_embeddings)
    embeds = []
    with torch.inference_mode():
        for start in range(0, len(prompts), TEXT_BATCH):
            enc = tokenizer(
                prompts[start : start + TEXT_BATCH],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            pooled = model.text_model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).pooler_output  # (B, H_text)
            embeds.append(model.text_projection(pooled))  # (B, D)
    e = torch.cat(embeds).float()  # (C·K, D)
    e = e / e.norm(dim=-1, keepdim=True)
    w = e.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return w / w.norm(dim=-1, keepdim=True)


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name → shape of ``model_dir``'s safetensors weights (header only), None if none."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    out: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[k] = tuple(f.get_slice(k).get_shape())
    return out


def vision_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """A vision tower's tensors under FusionBench's checkpoint names (``vision_model.*``).

    A full ``CLIPModel`` state keeps its ``vision_model.*`` tensors; a ``CLIPVisionModel`` saved
    by transformers ≥ 5 (unprefixed ``embeddings.*``, ``encoder.*``, ...) gets the prefix.
    """
    if any(k.startswith(VISION_PREFIX) for k in state):
        return {k: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    return {VISION_PREFIX + k: v for k, v in state.items()}


def _write_tower(out: Path, tensors: Mapping[str, torch.Tensor], config: Any) -> None:
    """``out/model.safetensors`` (``vision_model.*``) and a ``CLIPVisionModel`` config.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["CLIPVisionModel"]
    config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _read_state(snap: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a snapshot's weights (safetensors, else ``pytorch_model.bin``)."""
    if safetensors_shapes(snap) is not None:
        from mergeforge.bench.evaluate import load_encoder_state

        return load_encoder_state(snap)
    return torch.load(snap / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _task_encoder(task: str, snap: Path, tmp: Path, want: Mapping[str, tuple[int, ...]]) -> None:
    """Check a fine-tuned repo's tensors against the base's; rewrite it under FusionBench's names
    (``tmp/tasks/<task>/encoder``) when it is not a safetensors file with exactly those names."""
    shapes = safetensors_shapes(snap)
    if shapes is None or set(shapes) != set(want):
        from transformers import CLIPVisionConfig

        state = vision_names(_read_state(snap))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if set(shapes) == set(want):
            config = CLIPVisionConfig.from_pretrained(snap)
            _write_tower(tmp / "tasks" / task / "encoder", state, config)
    diff = sorted(set(shapes) ^ set(want)) or [k for k in want if shapes[k] != want[k]]
    if diff:
        raise PoolError(
            f"task {task!r}: the fine-tuned model {snap} does not match the base's vision tower "
            f"(first differing tensors: {diff[:5]}); it must be a CLIPVisionModel fine-tuned "
            "from the pool's pretrained CLIP."
        )


def _build(
    tmp: Path, base: Path, models: Mapping[str, Path], config: Mapping[str, Any], progress: bool
) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPModel

    from mergeforge.bench.finetune import _quiet

    _quiet()
    model = CLIPModel.from_pretrained(base).float().eval()
    tower = {VISION_PREFIX + k: v for k, v in model.vision_model.state_dict().items()}
    _write_tower(tmp / "base", tower, model.config.vision_config)
    want = {k: tuple(v.shape) for k, v in tower.items()}
    tensors = {
        PROJECTION: model.visual_projection.weight.detach().clone(),  # (D, H_vis)
        "logit_scale": model.logit_scale.detach().clone().reshape(1),
    }
    tokenizer = AutoTokenizer.from_pretrained(base)
    for task in tqdm(list(models), desc="CLIP zero-shot heads", disable=not progress):
        _task_encoder(task, models[task], tmp, want)
        head = zero_shot_head(model, tokenizer, CLASSNAMES[task], TEMPLATES[task])
        tensors[f"head.{task}"] = head.contiguous()  # (C_t, D)
    save_file(tensors, str(tmp / HEADS_FILE))
    shutil.copyfile(base / "preprocessor_config.json", tmp / "preprocessor_config.json")
    (tmp / "manifest.json").write_text(json.dumps({"build_config": config}, indent=1))


def build_derived(
    root: Path,
    base: Path,
    models: Mapping[str, Path],
    config: Mapping[str, Any],
    *,
    progress: bool = True,
) -> None:
    """Build ``root`` (see the module docs) unless it is already complete."""
    if (root / "manifest.json").is_file():
        return
    build_atomically(root, lambda tmp: _build(tmp, base, models, config, progress))


def load_heads(root: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``root/heads.safetensors`` (heads, projection, logit scale)."""
    from safetensors.torch import load_file

    path = root / HEADS_FILE
    if not path.is_file():
        raise PoolError(f"{path} is missing; delete {root} so the CLIP pool is rebuilt.")
    return load_file(str(path))

"""A base checkpoint with a PEFT LoRA adapter applied on read (``base+adapter`` in a recipe).

For every adapted module, reading its weight returns ``W + s · (B A)`` with ``s = alpha / r``
(``alpha / √r`` with ``use_rslora``; per-module ``rank_pattern``/``alpha_pattern`` honoured;
``(B A)ᵀ`` for embeddings and ``fan_in_fan_out`` layers), exactly what peft's
``merge_and_unload`` computes, in fp32 and cast back to the weight's dtype. Tensors saved under
``modules_to_save`` replace the base's. Only the adapter's small factors are held in memory.
Hu et al. 2021, "LoRA", arXiv 2106.09685.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeforge.errors import CheckpointError
from mergeforge.io.checkpoint import Checkpoint, open_checkpoint

_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_(?:embedding_)?([AB])(?:\.weight)?$")
_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class _Delta:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    transpose: bool


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory."""
    return (path / "adapter_config.json").is_file()


class AdaptedCheckpoint:
    """A :class:`Checkpoint` look-alike: the base's tensors, adapted ones merged on read."""

    def __init__(self, base: Checkpoint, adapter_dir: Path) -> None:
        self.base = base
        self.adapter_dir = adapter_dir
        cfg = adapter_config(adapter_dir)
        weights_file = next((adapter_dir / n for n in ADAPTER_WEIGHTS
                             if (adapter_dir / n).is_file()), None)  # fmt: skip
        if weights_file is None:
            raise CheckpointError(
                f"adapter {adapter_dir} has no {' or '.join(ADAPTER_WEIGHTS)}; save it with "
                "peft's save_pretrained"
            )
        with open_checkpoint(weights_file) as ad:
            factors = {name: ad.read(name) for name in ad.tensors}
        self._deltas, self._replaced = _parse(factors, cfg, base, adapter_dir)
        self.root = base.root
        self.format = base.format
        self.tensors = base.tensors
        self.files = (*base.files, weights_file)
        self.config = base.config
        self.config_path = base.config_path

    def read(self, name: str) -> torch.Tensor:
        """The base tensor with the adapter applied (or replaced by a saved module)."""
        if name in self._replaced:
            return self._replaced[name].clone()
        w = self.base.read(name)
        d = self._deltas.get(name)
        if d is None:
            return w
        delta = d.b.float() @ d.a.float()  # (out, in)
        if d.transpose:
            delta = delta.T
        return (w.float() + d.scale * delta).to(w.dtype)

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> AdaptedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def adapter_config(adapter_dir: Path) -> dict:
    """The parsed ``adapter_config.json`` of a LoRA adapter (other PEFT types are refused)."""
    path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read adapter config {path}: {e}") from None
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(
            f"adapter {adapter_dir} is {cfg.get('peft_type')!r}, not a LoRA adapter; only LoRA "
            "adapters can be merged into their base"
        )
    return cfg


def _pattern(patterns: dict, module: str, default: float) -> float:
    """peft's per-module override: a key matching the module name (or its suffix) wins."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return float(value)
    return float(default)


def module_scale(cfg: dict, module: str, rank: int) -> float:
    """peft's scaling ``s`` of one module's update ``s · B A``: ``alpha / r`` (rsLoRA:
    ``alpha / √r``), with ``rank_pattern``/``alpha_pattern`` overrides; ``rank`` is the factors'
    rank, used when the config gives none."""
    r = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", rank))
    alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _parse(factors: dict, cfg: dict, base: Checkpoint, adapter_dir: Path):
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, t in factors.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif key.startswith(_PREFIX):
            replaced[_check_target(key[len(_PREFIX) :], t.shape, base, adapter_dir, "saved")] = t
        else:
            raise CheckpointError(f"adapter {adapter_dir}: unexpected tensor {key!r}")
    deltas = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(
                f"adapter {adapter_dir}: module {module!r} lacks lora_A or lora_B"
            )
        embedding = module.split(".")[-1] in ("embed_tokens", "wte", "word_embeddings")
        transpose = embedding or bool(cfg.get("fan_in_fan_out"))
        a, b = (
            (ab["B"].T, ab["A"].T) if embedding else (ab["A"], ab["B"])
        )  # A: (r, in), B: (out, r)
        scale = module_scale(cfg, module, a.shape[0])
        shape = (b.shape[0], a.shape[1])
        name = _check_target(f"{module}.weight", shape[::-1] if transpose else shape,
                             base, adapter_dir, "adapted")  # fmt: skip
        deltas[name] = _Delta(a, b, scale, transpose)
    return deltas, replaced


def _check_target(name: str, shape, base: Checkpoint, adapter_dir: Path, what: str) -> str:
    info = base.tensors.get(name)
    if info is None:
        raise CheckpointError(
            f"adapter {adapter_dir} targets {name!r}, which base model {base.root} does not have; "
            "the adapter was trained on another model (check base_model_name_or_path in "
            "adapter_config.json)"
        )
    if tuple(info.shape) != tuple(shape):
        raise CheckpointError(
            f"adapter {adapter_dir}: the {what} update of {name!r} has shape {list(shape)} but "
            f"base model {base.root} has {list(info.shape)}; the adapter does not belong to this "
            "base"
        )
    return name

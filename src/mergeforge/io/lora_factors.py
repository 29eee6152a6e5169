"""LoRA adapters as checkpoints of their factors, for merging in factor space.

An adapter stores, per adapted module, ``lora_A`` (r × in) and ``lora_B`` (out × r) with the
update ``ΔW = s · B A``, ``s = alpha / r`` (or ``alpha / √r`` with rsLoRA; per-module patterns).
:class:`FactorCheckpoint` exposes the factors under their PEFT names with ``s`` folded into
``lora_B`` (so adapters with different alphas can be combined factor by factor, and the merged
adapter is written with ``s = 1``). :class:`ZeroCheckpoint` gives zero factors of the same names
and shapes: the "base" of a task-vector method in factor space (each adapter's factors are its
own task vector). Tensors saved under ``modules_to_save`` are not factors; an adapter holding
them cannot be merged in factor space.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mergeforge.errors import CheckpointError
from mergeforge.io.checkpoint import Checkpoint, open_checkpoint
from mergeforge.io.lora import ADAPTER_WEIGHTS, adapter_config, module_scale
from mergeforge.io.tensor_info import TensorInfo

FACTOR_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_(?:embedding_)?([AB])(?:\.weight)?$")


def _weights_file(adapter_dir: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise CheckpointError(
        f"adapter {adapter_dir} has no {' or '.join(ADAPTER_WEIGHTS)}; save it with peft's "
        "save_pretrained"
    )


class FactorCheckpoint:
    """An adapter's LoRA factors as named tensors, ``lora_B`` pre-multiplied by its scale."""

    def __init__(self, adapter_dir: Path) -> None:
        self.adapter_dir = Path(adapter_dir)
        self.adapter_config = adapter_config(self.adapter_dir)
        self.inner: Checkpoint = open_checkpoint(_weights_file(self.adapter_dir))
        self.root = self.adapter_dir
        self.files = self.inner.files
        self.config = None
        self.config_path = None
        self.format = self.inner.format
        self.tensors: dict[str, TensorInfo] = {}
        self.scales: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        for name, info in self.inner.tensors.items():
            m = FACTOR_KEY.match(name)
            if m is None:
                self.inner.close()
                raise CheckpointError(
                    f"adapter {adapter_dir} saves tensor {name!r}, which is not a LoRA factor "
                    "(modules_to_save); such adapters can only be merged in weight space: drop "
                    "`mergeforge: {factor_space: true}`"
                )
            self.tensors[name] = info
            module = m.group(1)
            r = info.shape[0] if m.group(2) == "A" else info.shape[-1]
            self.ranks[module] = r
            if m.group(2) == "B":
                self.scales[name] = module_scale(self.adapter_config, module, r)

    def modules(self) -> dict[str, int]:
        """Adapted module → its rank."""
        return dict(self.ranks)

    def read(self, name: str) -> torch.Tensor:
        t = self.inner.read(name)
        s = self.scales.get(name)
        return t if s is None or s == 1.0 else (t.float() * s).to(t.dtype)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FactorCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZeroCheckpoint:
    """Zeros with the names, shapes and dtypes of ``like``'s tensors (reads nothing)."""

    def __init__(self, like: FactorCheckpoint, root: Path) -> None:
        self.tensors = dict(like.tensors)
        self.root = root
        self.files: tuple[Path, ...] = ()
        self.config = None
        self.config_path = None
        self.format = "zeros"

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return torch.zeros(info.shape, dtype=info.dtype)

    def close(self) -> None:
        pass


def output_adapter_config(first: dict, ranks: dict[str, int], base_path: str | None) -> dict:
    """``adapter_config.json`` of a merged adapter: the first input's, with scale 1 everywhere
    (the inputs' scales were folded into ``lora_B``) and its per-module ranks."""
    cfg = dict(first)
    r = max(ranks.values(), key=list(ranks.values()).count) if ranks else cfg.get("r", 8)
    cfg["r"] = r
    cfg["lora_alpha"] = r
    cfg["use_rslora"] = False
    cfg["rank_pattern"] = {m: k for m, k in sorted(ranks.items()) if k != r}
    cfg["alpha_pattern"] = dict(cfg["rank_pattern"])
    if base_path is not None:
        cfg["base_model_name_or_path"] = base_path
    return cfg

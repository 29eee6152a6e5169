"""Torch pickle checkpoints (``.bin``, ``.pt``, ``.pth``) loaded without running code.

``torch.load(..., weights_only=True)`` only rebuilds tensors and plain containers; a pickle that
asks for any other callable (``os.system``, a class constructor, ...) is refused before anything
runs. Zip-format files (``torch.save`` since 1.6) are memory-mapped, so loading costs only the
pickle; legacy-format files cannot be mapped and are read whole.

The file must hold a flat ``{name: tensor}`` dict. A file whose only top-level key is
``"state_dict"`` or ``"model"`` holding such a dict (a common training-script wrapper) is
unwrapped; anything else with non-tensor values is an error.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

from mergeforge.errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load the state dict in ``path`` (tensors are CPU and, for zip files, memory-mapped)."""
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} does not exist; check the path (and, for a sharded "
            "checkpoint, that every shard was downloaded)."
        )
    mmap = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # a plain pickle of protocol > 2 warns; it loads fine
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise _load_error(path, e) from None
    return _as_state_dict(path, obj)


def _load_error(path: Path, e: Exception) -> CheckpointError:
    text = str(e)
    if "Weights only load failed" in text:
        lines = [line.strip() for line in text.splitlines()[1:]]
        reason = next(
            (line for line in lines if line.startswith(("Unsupported", "Trying to load"))),
            "it uses pickle instructions or globals that only arbitrary code needs",
        )
        return CheckpointError(
            f"checkpoint file {path} contains code that weights_only loading refuses ({reason.rstrip('.')}); "
            "it was not executed. Only load it if you trust its source: convert it to "
            "safetensors with a trusted tool (e.g. load it in an isolated environment and save "
            "it with safetensors.torch.save_file), then use the .safetensors file."
        )
    return CheckpointError(
        f"checkpoint file {path} is not a readable torch checkpoint ({type(e).__name__}: "
        f"{text.splitlines()[0] if text else 'no details'}); the file is truncated or corrupt; "
        "re-download or re-save it."
    )


def _as_state_dict(path: Path, obj: object) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint file {path} holds a {type(obj).__name__}, not a dict of tensors; save "
            "the model's state_dict() instead of the object itself."
        )
    if (
        len(obj) == 1
        and next(iter(obj)) in WRAPPER_KEYS
        and isinstance(next(iter(obj.values())), dict)
    ):
        inner = next(iter(obj.values()))
        if _all_tensors(inner):
            obj = inner
    if not _all_tensors(obj):
        bad = [repr(k) for k, v in obj.items() if not _is_plain_tensor(k, v)][:5]
        raise CheckpointError(
            f"checkpoint file {path} is not a flat dict of tensors: key(s) {', '.join(bad)} hold "
            "something else (a training checkpoint with optimizer state, a nested dict, or a "
            "sparse/quantized tensor). Extract the weights first, e.g. "
            "torch.save(ckpt['state_dict'], 'weights.bin'), or save them with safetensors."
        )
    return obj


def _is_plain_tensor(key: object, value: object) -> bool:
    return (
        isinstance(key, str) and isinstance(value, torch.Tensor) and value.layout == torch.strided
    )


def _all_tensors(d: dict) -> bool:
    return all(_is_plain_tensor(k, v) for k, v in d.items())

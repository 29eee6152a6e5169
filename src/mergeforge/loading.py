"""``mergeforge.load(DIR, task=None)``: a model written by ``mergeforge fuse``, ready for inference.

The directory's ``fusion.json`` says what it holds (``bench.fuse_output``):

* ``kind: static`` — the fused encoder: ``AutoModel.from_pretrained(DIR)``;
* ``kind: dynamic`` — an upscaled model: the body is built from ``config.json`` with
  ``body_class`` (``AutoModel`` or ``AutoModelForCausalLM``) and the recorded
  ``attn_implementation`` (so outputs are bit-identical to the saved module's), handed to the loader named in
  ``fusion.json`` (``rebuild(body, description, tensors)``, a function of ``mergeforge.fusion``;
  any other name is refused, the file is data, not code to run) with every saved tensor.

With ``task=NAME`` the result is that task's ``AutoModelForSequenceClassification``: its head from
``heads/NAME.safetensors`` (config from ``heads/NAME.json``), the fused encoder in place of its own
(a dynamic model behind :class:`EncoderAdapter`, so the classifier can call it), returning
``.logits``. Models come back in eval mode.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergeforge.errors import CheckpointError

BODY_CLASSES = ("AutoModel", "AutoModelForCausalLM")
LOADER_PATTERN = re.compile(r"mergeforge\.fusion(\.[A-Za-z_][A-Za-z0-9_]*)+")
NOT_OURS = (
    "{dir} is not a directory written by `mergeforge fuse` ({why}); load a plain model "
    "directory with transformers' from_pretrained"
)


class EncoderAdapter(nn.Module):
    """A dynamic fusion module called the way a ``ForSequenceClassification`` model calls its
    encoder: ``input_ids`` may come positionally, and arguments that are ``None`` (or
    ``return_dict``) are dropped, so a module taking only keyword tensors (Twin-Merging) works."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, input_ids: Tensor | None = None, **kwargs: Any) -> Any:
        kwargs.pop("return_dict", None)
        inputs = {"input_ids": input_ids, **kwargs}
        return self.module(**{k: v for k, v in inputs.items() if v is not None})


def read_record(directory: str | Path) -> dict[str, Any]:
    """``fusion.json`` of a fused model directory; ``CheckpointError`` when it is not one."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"{d} does not exist or is not a directory; check the path")
    path = d / "fusion.json"
    if not path.is_file():
        raise CheckpointError(NOT_OURS.format(dir=d, why="no fusion.json"))
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            NOT_OURS.format(dir=d, why=f"fusion.json is not JSON: {exc}")
        ) from None
    if not isinstance(record, dict) or record.get("kind") not in ("static", "dynamic"):
        raise CheckpointError(NOT_OURS.format(dir=d, why="fusion.json has no kind static/dynamic"))
    return record


def load(directory: str | Path, task: str | None = None, *, device: str = "cpu") -> nn.Module:
    """The fused model in ``directory`` (module docstring), on ``device``, in eval mode."""
    d = Path(directory).expanduser()
    record = read_record(d)
    if task is not None:
        known = list(record.get("heads") or {})
        if task not in known:
            raise CheckpointError(
                f"{d} has no head for task {task!r}; its tasks are {known} (or give task=None "
                "for the fused model without a head)"
            )
    if record["kind"] == "static":
        model = _static(d) if task is None else _classifier(d, task, encoder_state=_tensors(d))
    else:
        module = _dynamic(d, record)
        model = module if task is None else _classifier(d, task, module=EncoderAdapter(module))
    return model.to(device).eval()


def _static(d: Path) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(d)


def _tensors(d: Path) -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors weights (one file or an indexed set)."""
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, Tensor] = {}
    for name in files:
        if not (d / name).is_file():
            raise CheckpointError(f"{d} lacks its weights file {name}; the directory is incomplete")
        state.update(load_file(str(d / name)))
    return state


def _float_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def resolve_loader(name: str) -> Callable[..., nn.Module]:
    """The function ``name`` (``mergeforge.fusion.<module>.<function>``); anything outside
    ``mergeforge.fusion`` is refused, so a directory cannot make ``load`` run other code."""
    if not isinstance(name, str) or not LOADER_PATTERN.fullmatch(name):
        raise CheckpointError(
            f"fusion.json names the loader {name!r}; only functions of mergeforge.fusion "
            "(e.g. mergeforge.fusion.smile.rebuild) are loaded"
        )
    module_name, _, attr = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise CheckpointError(
            f"the loader {name!r} of fusion.json does not exist in this mergeforge; the model "
            "was written by another version"
        ) from None
    if not callable(fn):
        raise CheckpointError(f"the loader {name!r} of fusion.json is not a function")
    return fn


def _dynamic(d: Path, record: Mapping[str, Any]) -> nn.Module:
    """Build the body, rebuild the upscaled model on it with the saved tensors."""
    import transformers

    body_class = record.get("body_class")
    if body_class not in BODY_CLASSES:
        raise CheckpointError(
            f"{d}/fusion.json: body_class {body_class!r} is not one of {list(BODY_CLASSES)}"
        )
    rebuild = resolve_loader(record.get("loader", ""))
    tensors = _tensors(d)
    config = transformers.AutoConfig.from_pretrained(d)
    cls = getattr(transformers, body_class)
    attn = record.get("attn_implementation")  # the saved model's kernels: bit-identical outputs
    extra = {"attn_implementation": str(attn)} if attn else {}
    body = cls.from_config(config, dtype=_float_dtype(tensors), **extra)
    module = rebuild(body, record.get("description") or {}, tensors)
    return module.eval()


def _classifier(
    d: Path,
    task: str,
    *,
    encoder_state: Mapping[str, Tensor] | None = None,
    module: nn.Module | None = None,
) -> nn.Module:
    """Task ``task``'s classifier: its saved head, and the fused encoder — weights
    (``encoder_state``) loaded into its own encoder, or ``module`` put in its encoder's place."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    head_json, head_file = d / "heads" / f"{task}.json", d / "heads" / f"{task}.safetensors"
    if not head_json.is_file() or not head_file.is_file():
        raise CheckpointError(f"{d}: the head of task {task!r} is missing ({head_file})")
    cfg = dict(json.loads(head_json.read_text())["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    head = load_file(str(head_file))
    model = AutoModelForSequenceClassification.from_config(config, dtype=_float_dtype(head))
    prefix = model.base_model_prefix
    if module is not None:
        setattr(model, prefix, module)
    else:
        assert encoder_state is not None
        _load_exact(model.base_model, encoder_state, f"{d} (fused encoder)", subset=True)
    own = {k for k in model.state_dict() if not k.startswith(f"{prefix}.")}
    _load_exact(model, head, f"{head_file} (head of {task!r})", keys=own)
    return model


def _load_exact(
    module: nn.Module,
    state: Mapping[str, Tensor],
    where: str,
    *,
    keys: set[str] | None = None,
    subset: bool = False,
) -> None:
    """Load ``state`` into ``module``'s tensors named ``keys`` (default: all of them); every one
    must be there with its shape; extra names are an error unless ``subset`` (an encoder saved
    with a pooler its classifier lacks)."""
    own = module.state_dict()
    want = set(own) if keys is None else keys
    missing = sorted(want - set(state))
    extra = [] if subset else sorted(set(state) - want)
    wrong = [k for k in sorted(want & set(state)) if own[k].shape != state[k].shape]
    if missing or extra or wrong:
        raise CheckpointError(
            f"{where} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    module.load_state_dict({k: state[k] for k in want}, strict=False)

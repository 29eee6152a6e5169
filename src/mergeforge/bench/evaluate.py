"""Task accuracy of a (merged) encoder: every task's own head on top of the given encoder weights.

FusionBench's protocol for classification pools: only the shared encoder is merged; each task keeps
the head it was fine-tuned with. ``Evaluator(pool, split)`` loads every task's fine-tuned model
(``AutoModelForSequenceClassification``) once, tokenizes the task's split once (sorted by length,
padded per batch, so short texts cost little), and ``evaluate(state)`` loads ``state`` into each
task model's ``base_model`` and returns

    accuracy_t = (1/N_t) Σ_i [argmax_c logits_t(x_i)_c = y_i]      for each task t.

Evaluation dominates a benchmark's run time (a MiniLM-L6 forward pass is ~10⁹ FLOPs per
48-token text), so models are loaded and texts tokenized once per process, and batches are
length-sorted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mergeforge.bench.pool import Pool, PoolTask
from mergeforge.errors import CheckpointError, MergeforgeError

SplitName = Literal["train", "validation", "test"]
DEFAULT_MAX_LENGTH = 128
DEFAULT_BATCH_SIZE = 32
VALIDATION_LIMIT = 100
"""Examples per task that choose hyperparameters (a seeded random subset of the validation split:
each grid point costs one pass over them, and the grids are small)."""
SUBSET_SEED = 20240101


class EvaluationError(MergeforgeError):
    """An encoder's weights do not fit the task models of a pool."""


def load_encoder_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors weights in ``model_dir`` (one file or an indexed set)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / s for s in shards]
    else:
        files = [d / "model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(
                f"no safetensors weights at {f}: the encoder directory {d} must hold "
                "model.safetensors (or shards listed in model.safetensors.index.json), as "
                "save_pretrained writes them; re-create it with model.save_pretrained(DIR)"
            )
        state.update(load_file(str(f)))
    return state


@dataclass
class _TaskEval:
    """One task ready to evaluate: its model, pre-tokenized batches and labels in batch order."""

    name: str
    model: Any
    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor  # (N,) int64, in the order of the concatenated batches


def load_task_models(pool: Pool) -> dict[str, Any]:
    """Every task's fine-tuned classification model, in eval mode (shared by Evaluators).

    The models share **one** encoder module (the first task's ``base_model``, put in place of the
    others'), so evaluating a merged encoder loads its weights once, not once per task; the
    heads stay each task's own. ``Evaluator.evaluate(None)`` loads each task's own encoder before
    scoring that task."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    models: dict[str, Any] = {}
    shared = None
    for task in pool.tasks:
        model = AutoModelForSequenceClassification.from_pretrained(task.model_dir).float().eval()
        if shared is None:
            shared = model.base_model
        else:
            setattr(model, model.base_model_prefix, shared)
        models[task.name] = model
    return models


def pool_max_length(pool: Pool) -> int:
    """Tokens per text the pool was fine-tuned with: ``build_config["max_length"]``, else
    ``build_config["train"]["max_len"]`` (``bench.pools``), else 128."""
    cfg = pool.build_config
    train = cfg.get("train")
    value = cfg.get("max_length") or (train.get("max_len") if isinstance(train, Mapping) else None)
    return int(value) if isinstance(value, (int, float, str)) else DEFAULT_MAX_LENGTH


def task_tokenizer(task: PoolTask, pool: Pool) -> Any:
    """The task model's tokenizer, else the base's (the pool's encoders share one vocabulary)."""
    from transformers import AutoTokenizer

    for d in (task.model_dir, task.encoder_dir, pool.base_dir):
        if (Path(d) / "tokenizer_config.json").is_file() or (Path(d) / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(d)
    raise EvaluationError(
        f"no tokenizer for task {task.name!r}: none of {task.model_dir}, {task.encoder_dir}, "
        f"{pool.base_dir} holds tokenizer.json or tokenizer_config.json; save the tokenizer "
        "next to the model with tokenizer.save_pretrained(DIR)"
    )


def tokenize_split(
    tokenizer: Any,
    texts: tuple[str, ...],
    labels: tuple[int, ...],
    batch_size: int,
    max_length: int,
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Length-sorted, per-batch padded inputs and the labels in the same order."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: (len(enc["input_ids"][i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [{k: enc[k][i] for k in enc} for i in idx]
        batches.append(dict(tokenizer.pad(rows, return_tensors="pt")))
    sorted_labels = torch.tensor([labels[i] for i in order], dtype=torch.long)  # (N,)
    return batches, sorted_labels


def subset(n: int, limit: int | None) -> list[int]:
    """Sorted indices of ``min(n, limit)`` of ``range(n)`` drawn uniformly without replacement by
    a private generator seeded with ``SUBSET_SEED`` (all of them when ``limit`` is ``None``)."""
    if limit is None or limit >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    return sorted(torch.randperm(n, generator=gen)[:limit].tolist())


class Evaluator:
    """Accuracy of every task of ``pool`` on ``split`` with a given encoder.

    ``models``: task models from :func:`load_task_models` to share between evaluators of
    different splits (loaded here when ``None``); ``limit``: evaluate ``limit`` examples of each
    task's split drawn at random without replacement by a generator seeded with ``SUBSET_SEED``
    (the same examples every run; ``None``: all); ``max_length``: tokens per text (default: the
    pool's ``build_config["max_length"]``, else 128).
    """

    def __init__(
        self,
        pool: Pool,
        split: SplitName,
        *,
        models: Mapping[str, Any] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        limit: int | None = None,
    ) -> None:
        self.pool = pool
        self.split = split
        models = dict(models) if models is not None else load_task_models(pool)
        length = max_length or pool_max_length(pool)
        self.tasks: list[_TaskEval] = []
        for task in pool.tasks:
            data = getattr(task.data, split)
            keep = subset(len(data), limit)
            texts = tuple(data.texts[i] for i in keep)
            labels = tuple(data.labels[i] for i in keep)
            self._check_labels(task, labels, models[task.name])
            batches, ys = tokenize_split(
                task_tokenizer(task, pool), texts, labels, batch_size, length
            )
            self.tasks.append(_TaskEval(task.name, models[task.name], batches, ys))

    def _check_labels(self, task: PoolTask, labels: tuple[int, ...], model: Any) -> None:
        n = int(model.config.num_labels)
        bad = sorted({y for y in labels if not 0 <= y < n})
        if bad:
            raise EvaluationError(
                f"task {task.name!r}: {self.split} labels {bad[:5]} are outside the range 0…{n - 1} "
                f"of the head of {task.model_dir} ({n} labels); map the labels to 0…{n - 1} "
                "or fine-tune the model with enough labels"
            )

    def evaluate(self, encoder_state: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        """``{task: accuracy}`` with ``encoder_state`` as every task's encoder.

        ``None``: each task's own fine-tuned encoder (read from its ``encoder_dir``), the
        ``fine_tuned`` baseline. The state must have exactly the encoder's tensor names.
        """
        out: dict[str, float] = {}
        loaded: set[int] = set()  # encoder modules holding encoder_state already
        for t in self.tasks:
            encoder = t.model.base_model
            if encoder_state is None:
                own = load_encoder_state(self.pool.task(t.name).encoder_dir)
                load_into(encoder, own, where=f"task {t.name!r}")
            elif id(encoder) not in loaded:
                load_into(encoder, encoder_state, where=f"task {t.name!r}")
                loaded.add(id(encoder))
            out[t.name] = _accuracy(t)
        return out

    def evaluate_module(self, encoder: torch.nn.Module) -> dict[str, float]:
        """``{task: accuracy}`` with ``encoder`` — a module called like the encoder (a dynamic
        fusion result: WEMoE, SMILE, Twin-Merging) — in place of every task's encoder (through
        ``mergeforge.loading.EncoderAdapter``: ``input_ids`` positional, ``None`` arguments
        dropped)."""
        from mergeforge.loading import EncoderAdapter

        adapted = EncoderAdapter(encoder)
        out: dict[str, float] = {}
        for t in self.tasks:
            prefix = t.model.base_model_prefix
            own = getattr(t.model, prefix)
            setattr(t.model, prefix, adapted)
            try:
                out[t.name] = _accuracy(t)
            finally:
                setattr(t.model, prefix, own)
        return out

    @property
    def num_examples(self) -> int:
        return sum(int(t.labels.numel()) for t in self.tasks)


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, where: str) -> None:
    """``module.load_state_dict(state, strict=True)`` after checking names and shapes itself."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
            if unexpected
            else "",
            f"wrong shapes {wrong[:5]}" if wrong else "",
        ]
        raise EvaluationError(
            f"{where}: the encoder weights do not fit the model's {type(module).__name__} "
            f"({len(own)} tensors): {'; '.join(p for p in parts if p)}. The merged encoder must "
            "have the tensor names of the pool's encoder directories (AutoModel checkpoints, "
            "without the task head or a model prefix); check the pool's encoder_dir/base_dir"
        )
    module.load_state_dict(dict(state), strict=True)


def _accuracy(t: _TaskEval) -> float:
    correct = 0
    with torch.inference_mode():
        offset = 0
        for batch in t.batches:
            logits = t.model(**batch).logits  # (B, num_labels)
            n = logits.shape[0]
            correct += int((logits.argmax(-1) == t.labels[offset : offset + n]).sum())
            offset += n
    return correct / max(1, int(t.labels.numel()))


class CausalLmEvaluator:
    """The ``Evaluator`` interface for ``causal-lm`` pools (the whole model is merged).

    ``evaluate(state)`` scores every task with ``bench.llm_eval.evaluate_lm`` (label
    log-likelihood accuracy) on the merged model; ``None`` scores each task with its own
    fine-tuned model (``model_dir``).
    """

    def __init__(self, pool: Pool, split: SplitName) -> None:
        self.pool = pool
        self.split = split

    def evaluate(self, encoder_state: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        from mergeforge.bench.llm_eval import evaluate_lm

        if encoder_state is not None:
            return evaluate_lm(encoder_state, self.pool, self.split)
        out: dict[str, float] = {}
        for task in self.pool.tasks:
            out.update(evaluate_lm(task.model_dir, self.pool, self.split, tasks=[task.name]))
        return out

    @property
    def num_examples(self) -> int:
        return sum(len(getattr(t.data, self.split)) for t in self.pool.tasks)


def make_evaluators(pool: Pool) -> tuple[Any, Any]:
    """(validation, test) evaluators fitting the pool's kind (task models loaded once):
    :class:`Evaluator` for text classification, :class:`CausalLmEvaluator` for causal LMs,
    ``bench.clip_eval.ClipEvaluator`` for CLIP image classification; each has
    ``evaluate(state | None) -> {task: accuracy}``."""
    if pool.kind == "causal-lm":
        return CausalLmEvaluator(pool, "validation"), CausalLmEvaluator(pool, "test")
    if pool.kind == "image-classification":
        from mergeforge.bench import clip_eval

        return clip_eval.ClipEvaluator(pool, "validation"), clip_eval.ClipEvaluator(pool, "test")
    models = load_task_models(pool)
    val = Evaluator(pool, "validation", models=models, limit=VALIDATION_LIMIT)
    return val, Evaluator(pool, "test", models=models)

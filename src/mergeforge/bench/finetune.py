"""Seeded, deterministic full fine-tuning of a sequence classifier on CPU, and encoder extraction.

``finetune_classifier`` trains every parameter of ``AutoModelForSequenceClassification`` (a new
head on the pretrained encoder) with AdamW, linear warmup then linear decay, the head at its own
learning rate; batches are drawn from a seeded permutation of the training split, dropout from
``torch.manual_seed(seed)``, with ``torch.use_deterministic_algorithms(True)`` and a fixed thread
count, so the same inputs and seed give bit-identical weights on the same machine.

``extract_encoder`` writes the model's shared part (``model.base_model``, the ``base_model_prefix``
stripped) as an ``AutoModel``-loadable directory: what merging combines.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergeforge.bench.pool import Split, TaskData


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings. ``lr`` is the encoder's peak learning rate, ``head_lr`` the new
    head's; the rate rises linearly over ``warmup_steps`` and falls linearly to 0 at ``steps``."""

    steps: int = 60
    batch_size: int = 32
    max_len: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 6
    seed: int = 0
    threads: int = 2
    eval_batch_size: int = 64

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms inside the block; restored after."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` index batches: consecutive slices of seeded permutations (epoch after epoch)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then linear decay to 0 at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))


def _optimizer(model: Any, cfg: TrainConfig) -> Any:
    """AdamW with the encoder at ``lr`` and the head (everything outside ``base_model``) at
    ``head_lr``; no weight decay on biases and LayerNorm weights."""
    import torch

    encoder_ids = {id(p) for p in model.base_model.parameters()}
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower()
        groups.setdefault((id(p) in encoder_ids, no_decay), []).append(p)
    params = [
        {
            "params": ps,
            "lr": cfg.lr if enc else cfg.head_lr,
            "weight_decay": 0.0 if nd else cfg.weight_decay,
        }
        for (enc, nd), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(params, lr=cfg.lr)


def predict(
    model: Any, tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int = 64
) -> list[int]:
    """Arg-max class of each text (eval mode, no grad), in order."""
    import torch

    model.eval()
    out: list[int] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                truncation=True,
                max_length=max_len,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**enc).logits  # (batch, num_labels)
            out += logits.argmax(-1).tolist()
    return out


def accuracy(model: Any, tokenizer: Any, split: Split, max_len: int, batch_size: int = 64) -> float:
    """Fraction of ``split`` classified correctly (0.0 for an empty split)."""
    if len(split) == 0:
        return 0.0
    pred = predict(model, tokenizer, split.texts, max_len, batch_size)
    return sum(int(p == y) for p, y in zip(pred, split.labels, strict=True)) / len(split)


def new_classifier(base_dir: str | Path, label_names: Sequence[str], seed: int) -> Any:
    """``AutoModelForSequenceClassification`` from ``base_dir`` with a new head initialised under
    ``torch.manual_seed(seed)`` (as is any part the checkpoint lacks, e.g. a BERT pooler)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    _quiet()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        dtype=torch.float32,
    )


def _train_loop(model: Any, tok: Any, split: Split, cfg: TrainConfig, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm

    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    model.train()
    bar = tqdm(total=cfg.steps, desc="fine-tune", disable=not progress, leave=False)
    for idx in _batches(len(split), cfg.batch_size, cfg.steps, cfg.seed):
        enc = tok(
            [split.texts[i] for i in idx],
            truncation=True,
            max_length=cfg.max_len,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.tensor([split.labels[i] for i in idx])  # (batch,)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()


def finetune_classifier(
    base_dir: str | Path,
    task: TaskData,
    out_dir: str | Path,
    cfg: TrainConfig,
    progress: bool = True,
) -> dict[str, float]:
    """Fully fine-tune a classifier from ``base_dir`` on ``task.train``; save it to ``out_dir``.

    Saves the model (``save_pretrained``, safetensors) and ``base_dir``'s tokenizer. Returns
    ``{"train_s", "val_acc", "test_acc"}`` (accuracy of the fine-tuned model on its own splits).
    """
    import torch
    from transformers import AutoTokenizer

    if len(task.train) == 0:
        raise ValueError(f"task {task.name!r} has an empty training split")
    with deterministic_torch(cfg.threads):
        tok = AutoTokenizer.from_pretrained(base_dir)
        model = new_classifier(base_dir, task.label_names, cfg.seed)
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        _train_loop(model, tok, task.train, cfg, progress)
        train_s = time.perf_counter() - start
        val = accuracy(model, tok, task.validation, cfg.max_len, cfg.eval_batch_size)
        test = accuracy(model, tok, task.test, cfg.max_len, cfg.eval_batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"train_s": train_s, "val_acc": val, "test_acc": test}


def head_on_encoder_accuracy(
    model_dir: str | Path, encoder_dir: str | Path, split: Split, cfg: TrainConfig
) -> float:
    """Accuracy on ``split`` of ``model_dir``'s head on top of the encoder at ``encoder_dir``
    (e.g. the pretrained one: how much the head alone carries)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    _quiet()
    with deterministic_torch(cfg.threads):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        encoder = AutoModel.from_pretrained(encoder_dir)
        model.base_model.load_state_dict(encoder.state_dict(), strict=True)
        tok = AutoTokenizer.from_pretrained(model_dir)
        return accuracy(model, tok, split, cfg.max_len, cfg.eval_batch_size)


def save_encoder(model: Any, encoder_dir: str | Path, tokenizer: Any | None = None) -> Path:
    """Save ``model.base_model`` (``AutoModel``-loadable, base architecture in its config)."""
    out = Path(encoder_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = model.base_model
    encoder.config.architectures = [type(encoder).__name__]
    encoder.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def extract_encoder(model_dir: str | Path, encoder_dir: str | Path) -> Path:
    """Write the encoder of the ``AutoModelForSequenceClassification`` at ``model_dir`` to
    ``encoder_dir``: tensor names without the ``base_model_prefix``, loadable with ``AutoModel``,
    with the tokenizer when ``model_dir`` has one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tok = None
    return save_encoder(model, encoder_dir, tok)

"""Seeded LoRA fine-tuning of a causal LM on an instruction-formatted classification task.

The model learns to answer a task's prompt (``llm_eval.prompt_text``) with the label word: the
loss is the mean token cross-entropy over the answer tokens only (label word + end-of-turn),
prompt tokens masked out. LoRA (Hu et al., 2021) adapts ``W' = W + (α/r)·B·A`` on the attention
and MLP projections (A random from ``torch.manual_seed(seed)``, B zero), AdamW with linear
warmup then linear decay; batches are slices of seeded permutations. After training the adapter
is merged into the weights (``merge_and_unload``) and the whole model saved with its tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergeforge.bench.llm_eval import encode_task, pad_id_of
from mergeforge.bench.pool import TaskData


@dataclass(frozen=True)
class LMPoolConfig:
    """Build settings. ``sizes``: (train cap, validation, test) examples kept per task (a seeded
    subsample of the task's fixed splits); LoRA rank ``lora_rank``, scale ``lora_alpha / rank`` on
    ``lora_targets``; AdamW at ``lr`` with linear warmup then decay over ``steps``; texts cut to
    ``max_text_tokens`` tokens. The defaults are sized for 2 shared CPU cores (24 steps of batch 8
    per task, ~2.5 min a task; validation 50 / test 100 examples per task)."""

    tasks: tuple[str, ...] = ("ucla_subject", "nace_section", "trump_source")
    sizes: tuple[int, int, int] = (2000, 50, 100)
    steps: int = 24
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 2
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    max_text_tokens: int = 32
    seed: int = 0
    threads: int = 1
    """Torch threads for training and scoring: 1 is ~5× faster than 2 on 2 cores shared with
    other jobs (OpenMP threads wait on each other), and sweeps run several workers anyway."""
    dtype: str = "float32"
    evaluate: bool = True
    """Record base and fine-tuned validation accuracy of each task in the manifest."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LMTask:
    """A task to fine-tune on: its data, the instruction question and the source row ids."""

    data: TaskData
    question: str
    rows: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _train_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` index batches cut from consecutive seeded permutations of ``range(n)``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def _collate(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Left-padded ``prompt + answer`` rows (every answer ends at the last column, as in
    scoring) and ``targets``: the answer tokens, −100 elsewhere."""
    import torch

    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (b, T)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)  # (b, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (b, T)
    for i, (r, a) in enumerate(zip(rows, answers, strict=True)):
        ids[i, width - len(r) :] = torch.tensor(r)
        targets[i, width - len(a) :] = torch.tensor(a)
        mask[i, width - len(r) :] = 1
    keep = max(len(a) for a in answers) + 1
    return {"input_ids": ids, "attention_mask": mask, "targets": targets, "keep": keep}


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy of the answer tokens. Only the last ``keep`` positions (which hold
    every answer, left padding) go through the vocabulary projection."""
    import torch

    mask, keep = batch["attention_mask"], batch["keep"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (b, T)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=keep,
    )
    logits = out.logits[:, :-1].float()  # (b, keep−1, V): predictions of the last keep−1 tokens
    targets = batch["targets"][:, -(keep - 1) :]  # (b, keep−1)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)


def finetune_lm(
    base_dir: Path, task: LMTask, config: LMPoolConfig, out_dir: Path, progress: bool = True
) -> dict[str, float]:
    """LoRA-fine-tune ``base_dir`` on ``task``'s train split, merge, save the whole model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    data = task.data
    enc = encode_task(
        tok, task.question, data.label_names, data.train.texts, config.max_text_tokens
    )
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warm = max(1, config.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warm, max(0.0, (config.steps - s) / max(1, config.steps - warm))),
    )
    batches = _train_batches(len(data.train), config.batch_size, config.steps, config.seed)
    t0, losses = time.perf_counter(), []
    bar = tqdm(batches, desc=f"fine-tune {data.name}", disable=not progress, unit="step")
    for idx in bar:
        batch = _collate(
            [enc.prompts[i] for i in idx],
            [enc.answers[data.train.labels[i]] for i in idx],
            pad_id_of(tok),
        )
        loss = answer_loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    merged = model.merge_and_unload().to(getattr(torch, config.dtype))
    merged.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 5) :]
    return {
        "seconds": round(seconds, 2),
        "s_per_step": round(seconds / max(1, len(losses)), 3),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
    }

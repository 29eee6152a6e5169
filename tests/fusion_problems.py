"""Tiny fusion problems for tests: a 2-layer BERT body, T experts, per-task heads and batches.

``tiny_problem(T)`` builds everything in memory (no files): θ0 = a seeded random tiny BertModel;
θ_t = θ0 + a seeded perturbation of scale ``spread`` (stand-ins for fine-tunes: the algorithms'
math does not care how the experts were obtained); each task's head is a seeded ``Linear`` on the
pooled output with ``classes`` outputs; ``unlabeled`` holds ``batches`` batches of ``n`` random
token sequences (with padding at the end of some rows); ``labelled`` pairs them with seeded labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mergeforge.fusion.data import Batch, FusionProblem, FusionTask

VOCAB, HIDDEN, LENGTH = 40, 16, 7


def tiny_body(seed: int = 0, layers: int = 2) -> nn.Module:
    """A seeded random BertModel with hidden size 16 (eval mode, eager attention)."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    return BertModel(cfg).eval()


def _batches(seed: int, batches: int, n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)  # (n, L)
        lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)  # (n,)
        mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()  # (n, L)
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def make_head(classes: int, seed: int) -> tuple[nn.Linear, Any]:
    """A seeded ``Linear(HIDDEN, classes)`` and the ``head(outputs, batch)`` that applies it."""
    torch.manual_seed(1000 + seed)
    lin = nn.Linear(HIDDEN, classes)

    def head(outputs: Any, batch: Batch) -> torch.Tensor:
        return lin(outputs.pooler_output)  # (N, classes)

    return lin, head


def tiny_problem(
    tasks: int = 3, *, classes: int = 3, batches: int = 2, n: int = 4, spread: float = 0.05,
    seed: int = 0, layers: int = 2,
) -> FusionProblem:  # fmt: skip
    """The fusion problem described in the module docstring."""
    body = tiny_body(seed, layers)
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    experts, fusion_tasks = [], []
    for t in range(tasks):
        gen = torch.Generator().manual_seed(seed * 100 + t + 1)
        experts.append(
            {k: v + spread * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        )
        _, head = make_head(classes, seed * 100 + t)
        unl = _batches(seed * 100 + t + 50, batches, n)
        gen_l = torch.Generator().manual_seed(seed * 100 + t + 70)
        lab = tuple((b, torch.randint(0, classes, (n,), generator=gen_l)) for b in unl)
        fusion_tasks.append(FusionTask(f"task{t}", head, classes, tuple(unl), lab))
    return FusionProblem(body, base, tuple(experts), tuple(fusion_tasks))

"""Losses and guards shared by the test-time-adaptation algorithms.

AdaMerging, Concrete and WEMoE minimise the Shannon entropy of each task head's prediction on
unlabeled test inputs (Yang et al. 2024, arXiv 2310.02575):

    H(x) = −Σ_c p_c(x) log p_c(x),   p = softmax(logits),   loss = mean_x H(x)   (per task)

and the algorithms sum it over tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mergeforge.errors import FusionError

Progress = Callable[[int, int, float], None]
"""``progress(step, total_steps, loss)``, called after every optimisation step (a progress bar)."""


def entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the entropy of ``softmax(logits)``; ``logits`` is ``(N, C)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, C)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def check_finite(loss: Tensor | float, step: int, algorithm: str, lower: str) -> float:
    """The loss as a float; ``FusionError`` naming the step and what to lower when it is NaN/Inf."""
    value = float(loss)
    if not math.isfinite(value):
        raise FusionError(
            f"{algorithm}: the loss became {value} at step {step}; lower {lower} (or use fewer "
            "steps) and run again. Nothing was written"
        )
    return value

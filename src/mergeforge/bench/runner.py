"""``run_bench``: baselines and every method on a pool, hyperparameters chosen on validation only.

For each method and each point of its grid (``bench.grid``): build a recipe over the pool's task
encoders, ``mergeforge.engine.merge.merge`` it into ``OUT/work/``, load the merged encoder and
measure every task's validation accuracy. The point with the best mean validation accuracy
(first on ties) is then evaluated once on the test splits. ``normalized = test accuracy ÷ the
fine_tuned baseline's test accuracy`` on the same task (Ilharco et al. 2023; algorithms §29.2).

Resumable: each finished method (baselines included) is written to ``OUT/runs/<method>.json`` with
the pool fingerprint, seed and grid it ran with; a rerun with the same three reuses it. ``OUT/
results.json`` (``bench.records`` format) is rewritten after every method. Same seed → same
numbers (stochastic merges are seeded; evaluation is deterministic); timings and RSS vary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeforge.bench.evaluate import load_encoder_state, make_evaluators
from mergeforge.bench.executors import ExecutorName, execute
from mergeforge.bench.grid import Params, build_recipe, grid_for, scale_groups, select_methods
from mergeforge.bench.measure import PeakRss, timed
from mergeforge.bench.pool import Pool
from mergeforge.bench.records import FORMAT, Candidate, RunRecord
from mergeforge.bench.runinfo import run_info
from mergeforge.errors import MergeforgeError, OutputError
from mergeforge.fusion.registry import find_fusion
from mergeforge.methods.registry import get_method

AnyEvaluator = Any  # evaluate(state | None) -> {task: accuracy}; see evaluate.make_evaluators
RSS_METHOD = (
    "peak of the process's resident set size sampled every 0.02 s with psutil during the "
    "method's run (merges, validation and test evaluation); the process also holds the task "
    "models used for evaluation (a worker process for executors other than local with 1 worker); "
    "without psutil installed: the process's lifetime peak from getrusage"
)
SELECTION_RULE = (
    "grid point with the best mean validation accuracy over tasks (first on ties); test splits "
    "are evaluated only for the chosen point"
)
DATA_USED_GRID = "validation labels (hyperparameter choice)"
DATA_USED_NONE = "none (data-free, one setting)"
DATA_USED = {
    "pretrained": "none (the pretrained encoder under each task's fine-tuned head)",
    "fine_tuned": "each task's training split (its own fine-tuned model)",
}
DATA_USED_WHOLE_MODEL = {  # pools whose whole model is merged (causal LMs): no task heads
    **DATA_USED,
    "pretrained": "none (the pretrained model, prompted for each task)",
}


@dataclass(frozen=True)
class MethodJob:
    """One unit of work: a method's whole grid and its test evaluation (picklable)."""

    pool: Pool
    method: str
    grid: tuple[Params, ...]
    seed: int
    work_dir: str
    fine_tuned_test: Mapping[str, float] = field(default_factory=dict)
    progress: bool = False
    threads: int | None = None


_EVALUATORS: dict[tuple[str, str], tuple[AnyEvaluator, AnyEvaluator]] = {}


def evaluators(pool: Pool) -> tuple[AnyEvaluator, AnyEvaluator]:
    """This process's (validation, test) evaluators of ``pool``, built once."""
    key = (pool.fingerprint, str(pool.root))
    if key not in _EVALUATORS:
        _EVALUATORS[key] = make_evaluators(pool)
    return _EVALUATORS[key]


def choose(candidates: Sequence[Candidate]) -> int:
    """Index of the candidate with the best ``val_avg`` (the first of equal ones)."""
    best = 0
    for i, c in enumerate(candidates):
        if c.val_avg > candidates[best].val_avg:
            best = i
    return best


def _mean(scores: Mapping[str, float]) -> float:
    return sum(scores.values()) / max(1, len(scores))


def _merge_state(job: MethodJob, index: int, params: Params) -> dict:
    """Merge grid point ``index`` into the work dir and return the merged encoder's tensors."""
    from mergeforge.config import parse_recipe
    from mergeforge.engine.merge import merge

    spec = get_method(job.method)
    out = Path(job.work_dir) / f"{job.method}-{index}"
    recipe = parse_recipe(build_recipe(job.pool, spec, params))
    merge(recipe, out, seed=job.seed, overwrite=True, progress=False)
    try:
        return load_encoder_state(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_method_job(job: MethodJob) -> dict[str, object]:
    """Run one method's grid on validation, the chosen point on test; the run-file dict.

    Points that differ only in a scale knob (``grid.scale_groups``) share one merge. A method
    with a single point skips validation (nothing to choose)."""
    import torch
    from tqdm.auto import tqdm

    if job.threads:
        torch.set_num_threads(job.threads)
    if find_fusion(job.method) is not None:
        return _fusion_run(job)
    val_ev, test_ev = evaluators(job.pool)
    t0 = time.perf_counter()
    clock = {"merge": 0.0, "eval": 0.0}
    candidates: list[Candidate | None] = [None] * len(job.grid)
    best: tuple[dict | None, dict[str, float], int] = (None, {}, -1)
    groups = scale_groups(job.method, list(job.grid))
    single = len(job.grid) == 1
    steps = len(groups) + (0 if single else len(job.grid)) + 1
    with (
        PeakRss() as rss,
        tqdm(total=steps, desc=job.method, disable=not job.progress, leave=False) as bar,
    ):
        for ref, members in groups:
            bar.set_postfix_str(f"merging {ref + 1}/{len(job.grid)}")
            with timed(clock, "merge"):
                merged = _merge_state(job, ref, job.grid[ref])
            bar.update()
            if single:
                best = (merged, {}, 0)
                break
            for i, factor in members:
                bar.set_postfix_str(f"validating {i + 1}/{len(job.grid)}")
                state = merged if factor == 1.0 else scaled(job.pool, merged, factor)
                with timed(clock, "eval"):
                    val = val_ev.evaluate(state)
                bar.update()
                candidates[i] = Candidate(dict(job.grid[i]), _mean(val))
                if _better(_mean(val), i, best):
                    best = (state, val, i)
            del merged
        bar.set_postfix_str("testing")
        with timed(clock, "eval"):
            test = test_ev.evaluate(best[0])
        bar.update()
    tried = tuple(c for c in candidates if c is not None)
    chosen = dict(job.grid[0]) if single else tried[choose(tried)].params
    timing = {"merge_s": clock["merge"], "eval_s": clock["eval"],
              "wall_s": time.perf_counter() - t0, "peak_rss_bytes": rss.peak}  # fmt: skip
    used = DATA_USED_NONE if single else DATA_USED_GRID
    records = _records(job.method, job.pool, test, best[1], job.fine_tuned_test, chosen,
                       tried, timing, used, job.seed)  # fmt: skip
    return _run_file(job.pool, job.method, job.seed, job.grid, records)


def _fusion_run(job: MethodJob) -> dict[str, object]:
    """A fusion algorithm's run file (``bench.fusion_job``): run once, test evaluated."""
    from mergeforge.bench.fusion_job import run_fusion_job

    _, test_ev = evaluators(job.pool)
    t0 = time.perf_counter()
    with PeakRss() as rss:
        test, timing, used = run_fusion_job(job, test_ev)
    timing = {**timing, "wall_s": time.perf_counter() - t0, "peak_rss_bytes": rss.peak}
    records = _records(job.method, job.pool, test, {}, job.fine_tuned_test, dict(job.grid[0]),
                       (), timing, used, job.seed)  # fmt: skip
    return _run_file(job.pool, job.method, job.seed, job.grid, records)


def _better(score: float, index: int, best: tuple[object, dict[str, float], int]) -> bool:
    """Whether point ``index`` beats the best so far (ties: the lower grid index, as ``choose``)."""
    if best[2] < 0:
        return True
    top = _mean(best[1])
    return score > top or (score == top and index < best[2])


_BASES: dict[str, dict] = {}


def scaled(pool: Pool, merged: Mapping[str, Any], factor: float) -> dict:
    """θ0 + factor·(merged − θ0) for every tensor (θ0 = the pool's base encoder, read once)."""
    key = str(pool.base_dir)
    if key not in _BASES:
        _BASES[key] = load_encoder_state(pool.base_dir)
    base = _BASES[key]
    return {k: base[k] + factor * (v - base[k]) for k, v in merged.items()}


def _records(
    method: str, pool: Pool, test: Mapping[str, float], val: Mapping[str, float],
    ft_test: Mapping[str, float], params: Mapping[str, object], selection: tuple[Candidate, ...],
    timing: Mapping[str, float], data_used: str, seed: int,
) -> list[RunRecord]:  # fmt: skip
    out = []
    for task in pool.tasks:
        value, ft = test[task.name], ft_test.get(task.name, test[task.name])
        normalized = 1.0 if method == "fine_tuned" else (value / ft if ft > 0 else 0.0)
        out.append(
            RunRecord(
                method=method, task=task.name, metric=task.metric, value=value,
                normalized=normalized, val_value=val.get(task.name), params=dict(params),
                selection=selection, merge_s=timing["merge_s"], eval_s=timing["eval_s"],
                wall_s=timing["wall_s"], peak_rss_bytes=int(timing["peak_rss_bytes"]),
                data_used=data_used, seed=seed,
            )
        )  # fmt: skip
    return out


def _run_file(
    pool: Pool, method: str, seed: int, grid: Sequence[Params], records: list[RunRecord]
) -> dict:
    return {
        "method": method,
        "pool_fingerprint": pool.fingerprint,
        "seed": seed,
        "grid": [dict(p) for p in grid],
        "records": [r.to_json() for r in records],
    }


def run_baselines(pool: Pool, seed: int) -> dict[str, dict]:
    """Run files of ``fine_tuned`` and ``pretrained`` (each task's head on the given encoder)."""
    val_ev, test_ev = evaluators(pool)
    out: dict[str, dict] = {}
    ft_test: dict[str, float] = {}
    for name in ("fine_tuned", "pretrained"):
        t0 = time.perf_counter()
        with PeakRss() as rss:
            state = None if name == "fine_tuned" else load_encoder_state(pool.base_dir)
            val, test = val_ev.evaluate(state), test_ev.evaluate(state)
        wall = time.perf_counter() - t0
        ft_test = ft_test or dict(test)
        timing = {"merge_s": 0.0, "eval_s": wall, "wall_s": wall, "peak_rss_bytes": rss.peak}
        used = (DATA_USED_WHOLE_MODEL if pool.kind == "causal-lm" else DATA_USED)[name]
        recs = _records(name, pool, test, val, ft_test, {}, (), timing, used, seed)
        out[name] = _run_file(pool, name, seed, (), recs)
    return out


def prepare_out_dir(out_dir: str | Path) -> Path:
    """``OUT`` with ``runs/`` and ``work/`` inside; ``OutputError`` when it is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"--out {out} is a file, not a directory; the benchmark writes results.json, "
            "leaderboard.md, report.html and runs/ into a directory. Give a directory path "
            "(it is created when missing) or remove the file"
        )
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "work").mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def load_finished(
    out: Path, pool: Pool, seed: int, method: str, grid: Sequence[Params]
) -> dict | None:
    """``OUT/runs/<method>.json`` if it ran on this pool with this seed and grid, else ``None``."""
    path = out / "runs" / f"{method}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = (
        data.get("pool_fingerprint") == pool.fingerprint
        and data.get("seed") == seed
        and data.get("grid") == json.loads(json.dumps([dict(p) for p in grid]))
    )
    return data if same else None


def pool_json(pool: Pool) -> dict[str, object]:
    """The pool's description in ``results.json``."""
    return {
        "name": pool.name,
        "kind": pool.kind,
        "fingerprint": pool.fingerprint,
        "root": str(pool.root),
        "base_dir": str(pool.base_dir),
        "build_config": json.loads(json.dumps(dict(pool.build_config), default=str)),
        "tasks": [
            {
                "name": t.name,
                "metric": t.metric,
                "source": t.data.source,
                "label_names": list(t.data.label_names),
                "sizes": {s: len(getattr(t.data, s)) for s in ("train", "validation", "test")},
            }
            for t in pool.tasks
        ],
    }


@dataclass
class _Sweep:
    """The state of one ``run_bench`` call: what is finished and where it goes."""

    out: Path
    pool: Pool
    info: dict[str, object]
    order: list[str]
    runs: dict[str, dict] = field(default_factory=dict)

    def finish(self, method: str, run: dict, *, write_run: bool = True) -> None:
        self.runs[method] = run
        if write_run:
            _write_json(self.out / "runs" / f"{method}.json", run)
        _write_json(self.out / "results.json", self.results())

    def results(self) -> dict[str, object]:
        records = [r for m in self.order if m in self.runs for r in self.runs[m]["records"]]
        return {"format": FORMAT, "pool": pool_json(self.pool), "run_info": self.info,
                "records": records}  # fmt: skip


def run_bench(
    pool: Pool,
    methods: Sequence[str] | None = None,
    out_dir: str | Path = "bench-out",
    executor: ExecutorName = "local",
    workers: int = 1,
    address: str | None = None,
    seed: int = 0,
    progress: bool = True,
    grids: Mapping[str, Sequence[Params]] | None = None,
) -> dict[str, object]:
    """Benchmark ``methods`` (default: every applicable one) on ``pool``; the results.json dict.

    ``grids`` overrides a method's grid (``bench.grid.grid_for`` otherwise). Methods are run by
    ``executor`` (``local``: in this process when ``workers == 1``, else a process pool;
    ``dask``/``ray``: a local cluster of ``workers`` processes, or the one at ``address``).
    """
    if workers < 1:
        raise OutputError(f"--workers must be at least 1, got {workers}")
    specs, skipped = select_methods(pool, list(methods) if methods is not None else None)
    out = prepare_out_dir(out_dir)
    plan = {s.name: tuple((grids or {}).get(s.name) or grid_for(s.name)) for s in specs}
    threads = _threads(workers) if workers > 1 else None  # None: this process's own
    info = run_info(seed=seed, pool_fingerprint=pool.fingerprint)
    info.update(executor=executor, workers=workers, threads_per_job=threads or _torch_threads(),
                peak_rss_method=RSS_METHOD,
                selection_rule=SELECTION_RULE, skipped_methods=skipped, failed_methods={})  # fmt: skip
    sweep = _Sweep(out, pool, info, ["pretrained", "fine_tuned", *plan])
    _baselines(sweep, seed)
    ft_test = {r["task"]: r["value"] for r in sweep.runs["fine_tuned"]["records"]}
    jobs = []
    for name, grid in plan.items():
        done = load_finished(out, pool, seed, name, grid)
        if done is not None:
            sweep.finish(name, done, write_run=False)
            continue
        jobs.append(MethodJob(pool, name, grid, seed, str(out / "work"), ft_test,
                              progress and workers == 1 and executor == "local",
                              threads))  # fmt: skip
    if workers > 1:  # longest first, so no worker idles at the end: fusion jobs train
        jobs.sort(key=lambda j: find_fusion(j.method) is None)
    for job, result in _with_bar(
        execute(jobs, run_method_job, executor, workers, address), len(jobs), progress
    ):
        if isinstance(result, MergeforgeError):
            info["failed_methods"][job.method] = str(result)  # type: ignore[index]
            _write_json(out / "results.json", sweep.results())
            continue
        sweep.finish(job.method, result)
    shutil.rmtree(out / "work", ignore_errors=True)
    return sweep.results()


def _baselines(sweep: _Sweep, seed: int) -> None:
    cached = {
        m: load_finished(sweep.out, sweep.pool, seed, m, ()) for m in ("fine_tuned", "pretrained")
    }
    if all(cached.values()):
        for m, run in cached.items():
            sweep.finish(m, run, write_run=False)  # type: ignore[arg-type]
        return
    for m, run in run_baselines(sweep.pool, seed).items():
        sweep.finish(m, run)


def _torch_threads() -> int:
    """This process's math threads. Recorded as ``threads_per_job``: float reductions, so results
    (Twin-Merging's router most), depend on it; the same seed and thread count give the same
    numbers."""
    import torch

    return torch.get_num_threads()


def _threads(workers: int) -> int:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (usable or 1) // workers)


def _with_bar(items, total: int, progress: bool):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="methods", unit="method", disable=not progress) as bar:
        for job, result in items:
            bar.set_postfix_str(job.method)
            bar.update()
            yield job, result

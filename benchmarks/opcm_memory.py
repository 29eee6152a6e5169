"""Peak memory and time of continual OPCM (``merge_continual``) for 2, 4 and 8 models.

OPCM folds the models in one at a time with the running merge on disk, so its peak memory should
not grow with the number of models. The models are the benchmarks' synthetic Llama family
(``_synthetic.py``, ``--scale small`` by default: hidden 512, MLP 1408, 4 layers, vocab 16000,
29.4M parameters, about 118 MB per model in fp32): a base and 8 fine-tunes (base +
0.002·N(0, 1)), built once and cached under ``~/.cache/mergeforge/bench/opcm/``.

Each K in ``--models`` (default 2, 4, 8) runs ``merge_continual`` over the first K fine-tunes
(``alpha: 0.5``) in a fresh subprocess, measured as ``_measure.measure_process`` describes: wall
time and peak RSS of the child. The input files are read once first so the page cache is warm.

Every K runs twice: with glibc's default allocator settings, and with a fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_=1048576``). By default glibc raises its mmap threshold (up to 32 MiB)
each time a large block is freed, so later tensors of up to that size come from the heap, whose
freed space fragments: the peak RSS then creeps up with the number of passes although no data is
kept. A fixed threshold turns that off and shows what the merge itself holds.

Results go to ``benchmarks/results/opcm_memory-<UTC time>.json`` with ``run_info`` and, per
allocator setting, the ratio of the largest to the smallest peak RSS (1 when flat in K). Run:
``python benchmarks/opcm_memory.py [--scale small|tiny] [--models 2 4 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "src"), str(HERE)]  # benchmark this checkout; `import _runinfo`

import _measure  # noqa: E402
import _runinfo  # noqa: E402
import _synthetic  # noqa: E402

CACHE = Path("~/.cache/mergeforge/bench/opcm")
ALPHA = 0.5
ALLOCATORS = {"glibc-default": {}, "fixed-mmap-threshold": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def _child(recipe: str, out: str) -> None:
    """The measured process: one continual merge, nothing else."""
    from mergeforge.engine.continual import merge_continual

    result = merge_continual(recipe, out, progress=False)
    print(json.dumps({"seconds": result.seconds, "bytes_read": result.bytes_read}))


def _recipe(path: Path, models: _synthetic.ModelSet, k: int) -> Path:
    listing = "".join(f"  - model: {m}\n" for m in models.finetunes[:k])
    text = f"merge_method: opcm\nbase_model: {models.base}\nmodels:\n{listing}"
    path.write_text(text + f"parameters:\n  alpha: {ALPHA}\n")
    return path


def _run(models: _synthetic.ModelSet, k: int, work: Path, allocator: str) -> dict[str, object]:
    recipe = _recipe(work / f"opcm-{k}.yml", models, k)
    out = work / f"out-{k}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(recipe), str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    env = {n: v for n, v in env.items() if not n.startswith("MALLOC_")} | ALLOCATORS[allocator]
    stats = _measure.measure_process(cmd, env, work / f"log-{k}.txt")
    if stats.returncode != 0:
        raise SystemExit(f"merge of {k} models failed:\n{stats.output[-3000:]}")
    inner = json.loads(stats.output.strip().splitlines()[-1])
    shutil.rmtree(out)
    return {
        "models": k,
        "allocator": allocator,
        "malloc_env": ALLOCATORS[allocator],
        "wall_s": round(stats.wall_s, 3),
        "merge_s": round(inner["seconds"], 3),
        "bytes_read": inner["bytes_read"],
        "peak_rss_bytes": stats.peak_rss_bytes,
        "peak_rss_sampled_bytes": stats.peak_rss_sampled_bytes,
        "peak_anon_sampled_bytes": stats.peak_anon_sampled_bytes,
        "peak_hwm_bytes": stats.peak_hwm_bytes,
        "samples": stats.samples,
    }


def _ratio(runs: list[dict[str, object]]) -> float:
    peaks = [int(r["peak_rss_bytes"]) for r in runs]  # type: ignore[call-overload]
    return round(max(peaks) / min(peaks), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small", choices=sorted(_synthetic.SCALES))
    parser.add_argument("--models", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    models = _synthetic.build_or_load(args.scale, CACHE, max(args.models))
    warm = _synthetic.warm_page_cache(models)
    runs = []
    with tempfile.TemporaryDirectory(prefix="opcm-bench-") as tmp:
        for allocator in ALLOCATORS:
            for k in args.models:
                runs.append(_run(models, k, Path(tmp), allocator))
                r = runs[-1]
                mib = r["peak_rss_bytes"] / 2**20  # type: ignore[operator]
                print(f"{allocator} K={k}: {r['wall_s']:.1f} s, peak RSS {mib:.0f} MiB")
    flat = {a: _ratio([r for r in runs if r["allocator"] == a]) for a in ALLOCATORS}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "benchmark": "opcm_memory",
        "run_info": _runinfo.run_info(),
        "models": models.describe(),
        "alpha": ALPHA,
        "page_cache_warmup": warm,
        "measurement": _measure.MEASUREMENT,
        "runs": runs,
        "peak_rss_max_over_min": flat,
        "model_bytes_fp32": models.model_bytes,
    }
    path = HERE / "results" / f"opcm_memory-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak RSS max/min over K: {flat}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

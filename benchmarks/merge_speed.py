"""Speed and peak memory of a TIES merge: mergeforge vs mergekit 0.1.5 vs the I/O floor.

The recipe (design.md §4): TIES, density 0.5, weight 1 per model, ``normalize: true``,
``dtype: float32``, over K=4 fine-tunes of a Llama-style fp32 model and its base (``--scale
full``: hidden 1024, MLP 2816, 16 layers, vocab 32000, untied: 271.1M parameters, 1.08 GB per
model). The models are random (base ~ 0.02·N(0,1), norms 1; fine-tune i = base + 0.002·N(0,1))
and built once, cached under ``~/.cache/mergeforge/bench/merge_speed/<hash of build config>/``.

One run alternates the tools, each as a subprocess, ``--repeats`` rounds of (mergekit,
mergeforge, I/O floor), after reading every input file once so the page cache is warm. The I/O
floor reads every input tensor once (``mergeforge.io.open_checkpoint(...).read``) and writes one
model's worth of fp32 tensors once (``mergeforge.io.ShardedWriter``), no math. For each run:
wall time of the subprocess (start to exit, interpreter start and imports included) and peak
RSS (see ``MEASUREMENT``). The outputs of the two tools are compared tensor by tensor.

Results go to ``benchmarks/results/merge_speed-<UTC time>.json`` and ``merge_speed-latest.json``;
a summary table says whether each target is met. Run: ``make bench-merge`` or
``python benchmarks/merge_speed.py [--scale full|small|tiny] [--repeats N] [--skip-mergekit]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "src"), str(HERE)]  # benchmark this checkout; `import _runinfo`

import _measure  # noqa: E402
import _runinfo  # noqa: E402
import _synthetic  # noqa: E402

K = 4
DENSITY = 0.5
PARITY_RTOL = 1e-6
SAMPLE_INTERVAL_S = 0.05
SHARD_SIZE = 5 * 10**9  # mergekit's and mergeforge's default: one shard at every scale here
BOUND_SLACK_BYTES = 500 * 10**6
MEASUREMENT = {
    **_measure.MEASUREMENT,
    "sample_interval_s": SAMPLE_INTERVAL_S,
    "medians": "median wall time over the repeats; peak RSS is the max over the repeats",
    "parity": "per tensor max|mergeforge - mergekit| / max|mergekit|, the max over tensors; "
    "elements_over_tolerance counts elements with |mergeforge - mergekit| > 1e-6 max|mergekit|",
}


@dataclass
class Run:
    """One measured subprocess."""

    tool: str
    repeat: int
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    peak_rss_sampled_bytes: int
    peak_anon_sampled_bytes: int
    peak_hwm_bytes: int
    samples: int
    inner_s: float | None = None  # the tool's own timing, where it prints one
    error: str | None = None


def measure(cmd: list[str], env: dict[str, str], log: Path, tool: str, repeat: int) -> Run:
    """Run one tool as a subprocess and measure it (see ``_measure``)."""
    st = _measure.measure_process(cmd, env, log, SAMPLE_INTERVAL_S)
    return Run(
        tool, repeat, st.returncode, st.wall_s, st.peak_rss_bytes, st.peak_rss_sampled_bytes,
        st.peak_anon_sampled_bytes, st.peak_hwm_bytes, st.samples, _inner_seconds(tool, st.output),
        None if st.returncode == 0 else st.output[-2000:],
    )  # fmt: skip


def _inner_seconds(tool: str, text: str) -> float | None:
    if tool == "mergeforge":
        m = re.search(r"\bin ([0-9.]+) s\b", text)
        return float(m.group(1)) if m else None
    if tool == "io_floor":
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])["seconds"] if lines else None
    return None


def write_recipe(path: Path, models: _synthetic.ModelSet, opt_ins: Sequence[str] = ()) -> Path:
    """The TIES recipe both tools run (mergekit YAML schema); ``opt_ins`` adds a ``mergeforge:``
    block of opt-ins (a recipe for mergeforge only)."""
    lines = [
        "merge_method: ties",
        f"base_model: {models.base}",
        "models:",
    ]
    for ft in models.finetunes:
        lines += [f"  - model: {ft}", "    parameters:", f"      density: {DENSITY}"]
        lines += ["      weight: 1.0"]
    lines += ["parameters:", "  normalize: true", "dtype: float32"]
    if opt_ins:
        lines += ["mergeforge:", *(f"  {o}: true" for o in opt_ins)]
    lines.append("")
    path.write_text("\n".join(lines))
    return path


Command = Callable[[Path], list[str]]  # OUT_DIR -> argv


def tool_commands(
    recipe: Path,
    models: _synthetic.ModelSet,
    mergekit: Path | None,
    threads: int | None,
    ours_recipe: Path | None = None,
) -> dict[str, tuple[Command, dict[str, str]]]:
    """name -> (argv for an OUT_DIR, env) for mergekit (if given), mergeforge and the floor;
    mergeforge runs ``ours_recipe`` when given (the same recipe plus opt-ins)."""
    mine = recipe if ours_recipe is None else ours_recipe
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base_env.pop("PYTHONPATH", None)
    ours = {**base_env, "PYTHONPATH": str(REPO / "src")}
    t = [] if threads is None else ["--threads", str(threads)]
    inputs = [str(models.base), *map(str, models.finetunes)]
    cmds: dict[str, tuple[Command, dict[str, str]]] = {}
    if mergekit is not None:
        mk_t = [] if threads is None else ["--num-threads", str(threads)]
        cmds["mergekit"] = (
            lambda out: [str(mergekit), str(recipe), str(out), "--no-copy-tokenizer", "--quiet", *mk_t],
            base_env,
        )  # fmt: skip
    cmds["mergeforge"] = (
        lambda out: [sys.executable, "-m", "mergeforge", "merge", str(mine), str(out), "--quiet", *t],
        ours,
    )  # fmt: skip
    cmds["io_floor"] = (
        lambda out: [sys.executable, str(Path(__file__)), "_io_floor", "--out", str(out), *t, *inputs],
        ours,
    )  # fmt: skip
    return cmds


def run_rounds(
    cmds: dict[str, tuple[Command, dict[str, str]]], repeats: int, work: Path
) -> tuple[list[Run], dict[str, Path]]:
    """``repeats`` rounds of every tool in order; returns the runs and each tool's last output."""
    runs: list[Run] = []
    last: dict[str, Path] = {}
    for r in range(repeats):
        for tool, (command, env) in cmds.items():
            if tool in last:
                shutil.rmtree(last.pop(tool), ignore_errors=True)  # free disk before the next run
            out = work / f"{tool}-{r}"
            run = measure(command(out), env, work / f"{tool}-{r}.log", tool, r)
            runs.append(run)
            print(
                f"  round {r + 1}/{repeats} {tool:<10} {run.wall_s:7.2f} s  "
                f"peak RSS {run.peak_rss_bytes / 1e9:5.2f} GB"
                + ("" if run.returncode == 0 else f"  FAILED (exit {run.returncode})"),
                flush=True,
            )
            if run.returncode == 0:
                last[tool] = out
            else:
                print(run.error, file=sys.stderr)
    return runs, last


def compare_outputs(ours: Path, theirs: Path) -> dict[str, object]:
    """Max over tensors of max|a-b| / max|b| (b = mergekit), plus key/shape/dtype mismatches."""
    from mergeforge.io import open_checkpoint

    worst, worst_name, max_abs, over, total, problems = 0.0, None, 0.0, 0, 0, []
    with open_checkpoint(ours) as a, open_checkpoint(theirs) as b:
        names = sorted(set(a.tensors) | set(b.tensors))
        for name in names:
            if name not in a or name not in b:
                problems.append(f"{name}: only in {'mergeforge' if name in a else 'mergekit'}")
                continue
            x, y = a.read(name), b.read(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                problems.append(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
                continue
            diff = (x.double() - y.double()).abs()  # shape of name
            scale = max(y.double().abs().max().item(), 1e-30)
            over += int((diff > PARITY_RTOL * scale).sum())
            total += diff.numel()
            rel = diff.max().item() / scale
            max_abs = max(max_abs, diff.max().item())
            if rel > worst or worst_name is None:
                worst, worst_name = rel, name
    return {
        "tensors_compared": len(names) - len(problems),
        "max_rel_diff": worst,
        "max_abs_diff": max_abs,
        "worst_tensor": worst_name,
        "elements_over_tolerance": over,
        "elements_compared": total,
        "mismatches": problems,
        "tolerance": PARITY_RTOL,
        "ok": not problems and worst <= PARITY_RTOL,
    }


def summarize(runs: list[Run]) -> dict[str, dict[str, float | int]]:
    """Per tool over its successful runs: median wall, max peak RSS, max sampled anon RSS."""
    out: dict[str, dict[str, float | int]] = {}
    for tool in dict.fromkeys(r.tool for r in runs):
        ok = [r for r in runs if r.tool == tool and r.returncode == 0]
        if ok:
            out[tool] = {
                "runs": len(ok),
                "median_wall_s": statistics.median(r.wall_s for r in ok),
                "min_wall_s": min(r.wall_s for r in ok),
                "peak_rss_bytes": max(r.peak_rss_bytes for r in ok),
                "peak_anon_sampled_bytes": max(r.peak_anon_sampled_bytes for r in ok),
            }
            inner = [r.inner_s for r in ok if r.inner_s is not None]
            if inner:
                out[tool]["median_inner_s"] = statistics.median(inner)
    return out


def headline(summary: dict, models: _synthetic.ModelSet, parity: dict | None) -> dict:
    """Ratios, the memory bound and which targets are met (None where not measured)."""
    mk, mf, fl = (summary.get(t) for t in ("mergekit", "mergeforge", "io_floor"))

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] / b[key] if a and b else None

    bound = (K + 3) * models.largest_tensor_bytes + BOUND_SLACK_BYTES
    ratios = {
        "speedup_vs_mergekit": ratio(mk, mf, "median_wall_s"),
        "rss_ratio_vs_mergekit": ratio(mf, mk, "peak_rss_bytes"),
        "time_vs_io_floor": ratio(mf, fl, "median_wall_s"),
        "inner_time_vs_io_floor": (
            mf["median_inner_s"] / fl["median_inner_s"]
            if mf and fl and "median_inner_s" in mf and "median_inner_s" in fl
            else None
        ),
    }
    memory_bound = {
        "formula": "(K+3) x largest tensor + 500 MB",
        "k": K,
        "largest_tensor": models.largest_tensor,
        "largest_tensor_bytes": models.largest_tensor_bytes,
        "bound_bytes": bound,
        "mergeforge_peak_rss_bytes": mf["peak_rss_bytes"] if mf else None,
        "met": mf["peak_rss_bytes"] <= bound if mf else None,
    }

    def at_least(v: float | None, goal: float) -> bool | None:
        return None if v is None else v >= goal

    def at_most(v: float | None, goal: float) -> bool | None:
        return None if v is None else v <= goal

    targets = {
        "speedup_vs_mergekit >= 2": at_least(ratios["speedup_vs_mergekit"], 2.0),
        "rss_ratio_vs_mergekit <= 0.5": at_most(ratios["rss_ratio_vs_mergekit"], 0.5),
        "time_vs_io_floor <= 1.5": at_most(ratios["time_vs_io_floor"], 1.5),
        "peak_rss <= (K+3) x largest + 500 MB": memory_bound["met"],
        "parity max_rel_diff <= 1e-6": None if parity is None else parity["ok"],
    }
    return {"ratios": ratios, "memory_bound": memory_bound, "targets": targets}


def print_table(result: dict) -> None:
    """The summary: per-tool medians, then each ratio against its goal."""
    cfg, summ, head = result["config"], result["summary"], result["headline"]
    print(
        f"\nmerge_speed, scale {cfg['scale']}: {cfg['param_count'] / 1e6:.1f}M params, "
        f"K={cfg['k']}, TIES density {cfg['density']}, repeats {cfg['repeats']}, "
        f"{result['run_info']['hardware']['usable_cores']} cores"
    )
    print(f"{'tool':<12}{'median wall':>12}{'peak RSS':>11}{'peak anon':>11}")
    for tool, s in summ.items():
        print(
            f"{tool:<12}{s['median_wall_s']:>10.2f} s{s['peak_rss_bytes'] / 1e9:>8.2f} GB"
            f"{s['peak_anon_sampled_bytes'] / 1e9:>8.2f} GB"
        )
    r, t, mb, parity = head["ratios"], head["targets"], head["memory_bound"], result["parity"]
    peak = mb["mergeforge_peak_rss_bytes"]
    rows = [
        ("speedup vs mergekit", r["speedup_vs_mergekit"], ">= 2x", "speedup_vs_mergekit >= 2"),
        ("peak RSS vs mergekit", r["rss_ratio_vs_mergekit"], "<= 0.5x", "rss_ratio_vs_mergekit <= 0.5"),
        ("time vs I/O floor", r["time_vs_io_floor"], "<= 1.5x", "time_vs_io_floor <= 1.5"),
        ("peak RSS (GB)", peak and peak / 1e9, f"<= {mb['bound_bytes'] / 1e9:.2f}", "peak_rss <= (K+3) x largest + 500 MB"),
        ("parity max rel diff", parity and parity["max_rel_diff"], "<= 1e-6", "parity max_rel_diff <= 1e-6"),
    ]  # fmt: skip
    print(f"\n{'target':<22}{'value':>10}  {'goal':<10}met")
    for label, value, goal, key in rows:
        met = "n/a" if t[key] is None else "yes" if t[key] else "NO"
        print(f"{label:<22}{'n/a' if value is None else f'{value:.3g}':>10}  {goal:<10}{met}")
    if parity:
        print(
            f"parity: {parity['elements_over_tolerance']} of {parity['elements_compared']} "
            f"elements differ by more than 1e-6 x max|tensor| (worst: {parity['worst_tensor']})"
        )


def write_results(result: dict, out_dir: Path) -> Path:
    """``merge_speed-<UTC time>.json`` and ``merge_speed-latest.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(result, indent=2) + "\n"
    path = out_dir / f"merge_speed-{stamp}.json"
    for target in (path, out_dir / "merge_speed-latest.json"):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return path


def io_floor_main(argv: list[str]) -> int:
    """Child process: read every tensor of every input once, write one model's worth, no math."""
    p = argparse.ArgumentParser(prog="merge_speed.py _io_floor")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("models", nargs="+")
    args = p.parse_args(argv)
    import torch

    from mergeforge.io import ShardedWriter, open_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ckpts = [open_checkpoint(m) for m in args.models]
    first = ckpts[0]
    entries = [(i.name, i.dtype, i.shape) for i in first.tensors.values()]
    args.out.mkdir(parents=True)
    read = 0
    with ShardedWriter(args.out, entries, SHARD_SIZE) as writer:
        for name in first.tensors:
            tensors = [c.read(name) for c in ckpts]  # K+1 x (shape of name)
            read += sum(t.numel() * t.element_size() for t in tensors)
            writer.write(name, tensors[0])
    for c in ckpts:
        c.close()
    written = sum(s.data_bytes for s in writer.shards)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "bytes_read": read, "bytes_written": written}))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=tuple(_synthetic.SCALES), default="full")
    p.add_argument("--repeats", type=int, default=2, help="rounds of each tool (default 2)")
    p.add_argument("--skip-mergekit", action="store_true", help="only mergeforge and the floor")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every tool")
    p.add_argument(
        "--mergeforge-opt-in", action="append", default=[], metavar="NAME",
        help="run mergeforge with this recipe opt-in (e.g. index_tie_break); needs --skip-mergekit",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--cache-dir", type=Path, default=_synthetic.DEFAULT_CACHE, help="model cache")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def build_result(
    args: argparse.Namespace,
    models: _synthetic.ModelSet,
    warm: dict,
    recipe: str,
    mergekit: Path | None,
    runs: list[Run],
    parity: dict | None,
) -> dict:
    """The results JSON: run_info, config, definitions, every run, medians, headline ratios."""
    summary = summarize(runs)
    config = {
        **models.describe(),
        "k": K,
        "method": "ties",
        "density": DENSITY,
        "weight": 1.0,
        "normalize": True,
        "dtype": "float32",
        "repeats": args.repeats,
        "threads": args.threads,
        "order": list(dict.fromkeys(r.tool for r in runs)),
        "recipe": recipe,
        "mergeforge_opt_ins": list(args.mergeforge_opt_in),
        "page_cache": {"warmed": True, **warm},
        "mergekit_yaml": None if mergekit is None else str(mergekit),
    }
    ok = all(r.returncode == 0 for r in runs) and (parity is None or parity["ok"])
    return {
        "benchmark": "merge_speed",
        "ok": ok,
        "run_info": _runinfo.run_info(mergekit),
        "config": config,
        "measurement": MEASUREMENT,
        "runs": [asdict(r) for r in runs],
        "summary": summary,
        "parity": parity,
        "headline": headline(summary, models, parity),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mergekit = None if args.skip_mergekit else _runinfo.find_mergekit_yaml()
    if not args.skip_mergekit and mergekit is None:
        print("mergekit-yaml not found (set MERGEKIT_YAML or make mergekit-venv), or pass "
              "--skip-mergekit", file=sys.stderr)  # fmt: skip
        return 2
    if args.mergeforge_opt_in and mergekit is not None:
        print("--mergeforge-opt-in changes mergeforge's recipe, so the outputs are not comparable "
              "with mergekit's: add --skip-mergekit", file=sys.stderr)  # fmt: skip
        return 2
    models = _synthetic.build_or_load(args.scale, args.cache_dir, K)
    warm = _synthetic.warm_page_cache(models)
    print(f"page cache warmed: read {warm['bytes'] / 1e9:.2f} GB in {warm['seconds']:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=args.cache_dir))
    try:
        recipe = write_recipe(work / "recipe.yml", models)
        ours = write_recipe(work / "ours.yml", models, args.mergeforge_opt_in)
        cmds = tool_commands(recipe, models, mergekit, args.threads, ours)
        runs, last = run_rounds(cmds, args.repeats, work)
        parity = None
        if "mergekit" in last and "mergeforge" in last:
            parity = compare_outputs(last["mergeforge"], last["mergekit"])
        result = build_result(args, models, warm, ours.read_text(), mergekit, runs, parity)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_results(result, args.out)
    print_table(result)
    print(f"\nwrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_io_floor":
        sys.exit(io_floor_main(sys.argv[2:]))
    sys.exit(main())

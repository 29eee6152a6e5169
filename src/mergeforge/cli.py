"""Command line: ``mergeforge merge|validate|plan|methods|extract-lora|recover|bench|fuse``. Thin: parse, call the API, report.

Every ``MergeforgeError`` becomes a one-paragraph message on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from mergeforge import __version__
from mergeforge.errors import MergeforgeError

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
              "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
              "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``'4GB'`` → 4·10⁹ bytes; also K/M/G/T, KiB/MiB/GiB, plain integers."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 4GB, 500MB, 2GiB")
    value = int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeforge", description="Deep model fusion.")
    p.add_argument("--version", action="version", version=f"mergeforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge models as a recipe says (streaming)")
    m.add_argument("recipe")
    m.add_argument("out_dir")
    m.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    m.add_argument("--threads", type=int, default=None, help="torch threads for the math")
    m.add_argument(
        "--memory-budget", type=parse_size, default=None,
        help="bytes of tensors in flight, e.g. 4GB (default: what the largest tensor needs, "
        "at least 512MiB)",
    )  # fmt: skip
    m.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), help="default 5GB")
    m.add_argument("--seed", type=int, default=0, help="seed of stochastic methods (default 0)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument(
        "--save-steps", action="store_true",
        help="continual methods (opcm): also write the merge after each model to "
        "OUT_DIR/steps/step-<t>/",
    )  # fmt: skip
    v = sub.add_parser("validate", help="check a recipe and its inputs without reading tensors")
    v.add_argument("recipe")
    pl = sub.add_parser("plan", help="show the per-tensor plan and the resource estimate")
    pl.add_argument("recipe")
    pl.add_argument("--json", action="store_true")
    me = sub.add_parser("methods", help="list merge methods and their parameters")
    me.add_argument("--json", action="store_true")
    me.add_argument("--markdown", action="store_true", help="the README's method table")
    _add_extract_lora(sub)
    _add_bench(sub)
    _add_fuse(sub)
    r = sub.add_parser("recover", help="rebuild one input model of a reversible merge")
    r.add_argument("merged_dir", help="output directory of a merge that saved artifacts/")
    r.add_argument("out_dir", help="where to write the rebuilt model")
    r.add_argument("--model", required=True, help="the input to rebuild: index (0-based) or label")
    r.add_argument("--base", help="the base model, if it moved since the merge")
    r.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    return p


def positive_int(text: str) -> int:
    """An integer ≥ 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_extract_lora(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "extract-lora", help="a PEFT LoRA adapter from TUNED − BASE (truncated SVD per layer)"
    )
    e.add_argument("base", help="the base model (directory or weight file)")
    e.add_argument("tuned", help="the fine-tuned model, same architecture as BASE")
    e.add_argument("out_dir", help="the adapter directory to write")
    e.add_argument("--rank", type=positive_int, required=True, help="the largest LoRA rank")
    e.add_argument("--include", metavar="REGEX", help="only modules whose path matches")
    e.add_argument("--exclude", metavar="REGEX", help="skip modules whose path matches")
    e.add_argument(
        "--include-embeddings", action="store_true",
        help="also factorize embeddings and the output head (lm_head)",
    )  # fmt: skip
    e.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="dtype of the stored factors (default float32)",
    )  # fmt: skip
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench", help="benchmark merge methods on a model pool (accuracy, normalized, time, RSS)"
    )
    b.add_argument("--pool", required=True, help="pool name (e.g. text-minilm) or a pool YAML file")
    b.add_argument(
        "--methods", type=_method_list, default=None,
        help="comma-separated methods (default: every registered method that applies; the "
        "baselines pretrained and fine_tuned always run)",
    )  # fmt: skip
    b.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    b.add_argument("--executor", choices=("local", "dask", "ray"), default="local",
                   help="where methods run (default local)")  # fmt: skip
    b.add_argument("--workers", type=positive_int, default=1, help="parallel workers (default 1)")
    b.add_argument("--address", default=None, help="Dask scheduler or Ray cluster address")
    b.add_argument("--seed", type=int, default=0, help="seed of stochastic methods (default 0)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_fuse(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "fuse", help="run a fusion algorithm (AdaMerging, RegMean, WEMoE, SMILE, ...) on your "
        "own models and data files; write the fused model",
    )  # fmt: skip
    f.add_argument("config", help="user pool YAML (name, base, tasks) plus `algorithm:`, "
                   "optional `parameters:` and `device:`")  # fmt: skip
    f.add_argument("out_dir", help="where to write the fused model (load it: mergeforge.load)")
    f.add_argument("--device", default=None, help="cpu or cuda (default: the YAML's, else cpu)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    f.add_argument("--quiet", action="store_true", help="no progress bar")


def _method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method name, e.g. ties,task_arithmetic")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MergeforgeError as exc:
        print(f"mergeforge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mergeforge {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _merge(args: argparse.Namespace) -> int:
    import torch

    from mergeforge.engine.merge import merge

    if args.threads:
        torch.set_num_threads(args.threads)
    res = merge(
        args.recipe, args.out_dir, device=args.device, memory_budget=args.memory_budget,
        shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite,
        progress=not args.quiet, save_steps=args.save_steps,
    )  # fmt: skip
    print(
        f"merged {res.tensors} tensors into {res.out_dir} in {res.seconds:.1f} s "
        f"(read {_gb(res.bytes_read)}, wrote {_gb(res.bytes_written)}; files: {', '.join(res.files)})"
    )
    if res.rel_errors:
        print("reversible: `mergeforge recover` rebuilds each input with relative error")
        for i, (label, err) in enumerate(res.rel_errors):
            print(f"  {i}: {label}  {err:.4g}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    from mergeforge.engine.recover import recover

    res = recover(args.merged_dir, args.model, args.out_dir, base=args.base,
                  overwrite=args.overwrite)  # fmt: skip
    print(f"rebuilt input {res.index} ({res.model}) into {res.out_dir} in {res.seconds:.1f} s; "
          f"relative error measured at merge time: {res.rel_error:.4g}")  # fmt: skip
    return 0


def _validate(args: argparse.Namespace) -> int:
    from mergeforge.engine.merge import plan_recipe

    plan = plan_recipe(args.recipe)
    plan.close()
    print(
        f"{args.recipe}: OK — {plan.method.name} over {len(plan.models)} model(s)"
        f"{' + base' if plan.base else ''}, {len(plan.tensors)} tensors"
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from mergeforge.engine.merge import plan_recipe
    from mergeforge.engine.report import plan_json, plan_text

    plan = plan_recipe(args.recipe)
    plan.close()
    if args.json:
        print(json.dumps(plan_json(plan), indent=2))
    else:
        print(plan_text(plan))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from mergeforge.fusion.registry import FUSION_REGISTRY
    from mergeforge.methods import REGISTRY

    if args.json:
        records = [s.to_json() for s in REGISTRY] + [f.to_json() for f in FUSION_REGISTRY]
        print(json.dumps(records, indent=2))
        return 0
    if args.markdown:
        print(methods_markdown())
        return 0
    for s in REGISTRY:
        base = {"required": "needs base", "optional": "base optional", "unused": "no base"}
        flags = [s.category, base[s.base]] + (["stochastic"] if s.stochastic else [])
        print(f"{s.name}  [{', '.join(flags)}]  {s.paper}\n    {s.summary}")
        for p in s.params:
            dflt = "required" if p.required else f"default {_yaml(p.default)}"
            print(f"    - {p.name} ({p.scope}, {p.kind}, {dflt}, {p.range_text()}): {p.doc}")
    print("\nfusion algorithms (mergeforge fuse CONFIG.yaml OUT_DIR; mergeforge bench):")
    for f in FUSION_REGISTRY:
        print(f"{f.name}  [{f.category}]  {f.paper}\n    {f.doc}\n    data: {f.data}")
        for p in f.params():
            print(f"    - {p['name']} ({p['type']}, default {_yaml(p['default'])}): {p['doc']}")
    return 0


def _extract_lora(args: argparse.Namespace) -> int:
    import torch

    from mergeforge.engine.extract_lora import extract_lora

    res = extract_lora(
        args.base, args.tuned, args.out_dir, rank=args.rank, include=args.include,
        exclude=args.exclude, include_embeddings=args.include_embeddings,
        dtype=getattr(torch, args.dtype), overwrite=args.overwrite,
    )  # fmt: skip
    print(f"extracted {res.modules} LoRA modules (r ≤ {res.rank}) into {res.out_dir} "
          f"in {res.seconds:.1f} s")  # fmt: skip
    print("relative error ‖ΔW − BA‖_F / ‖ΔW‖_F:")
    for kind, err in res.kind_errors.items():
        print(f"  {kind:<24} {err:.4g}")
    print(f"  {'total':<24} {res.total_error:.4g}")
    if res.not_captured:
        print(f"{len(res.not_captured)} changed tensor(s) are NOT captured by the adapter:")
        for name, why in res.not_captured:
            print(f"  {name}: {why}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mergeforge.bench.pools import get_pool
    from mergeforge.bench.report import write_leaderboard, write_report
    from mergeforge.bench.runner import run_bench

    pool = get_pool(args.pool, progress=not args.quiet)
    results = run_bench(
        pool, args.methods, args.out, executor=args.executor, workers=args.workers,
        address=args.address, seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    out = Path(args.out)
    failed = results["run_info"].get("failed_methods") or {}  # type: ignore[union-attr]
    for method, why in failed.items():
        print(f"method {method} failed: {why}", file=sys.stderr)
    write_leaderboard(results, out / "leaderboard.md")
    write_report(results, out / "report.html")
    print((out / "leaderboard.md").read_text())
    print(f"results: {out / 'results.json'}\nreport: {(out / 'report.html').resolve()}")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from mergeforge.bench.fuse import fuse

    res = fuse(args.config, args.out_dir, device=args.device, overwrite=args.overwrite,
               progress=not args.quiet)  # fmt: skip
    print(f"fused {len(res.accuracy['test'])} task models with {res.result.algorithm} "
          f"({res.kind}) into {res.out_dir} in {res.fuse_seconds:.1f} s "
          f"(evaluation {res.eval_seconds:.1f} s)")  # fmt: skip
    print(f"{'task':<24} {'validation':>10} {'test':>10}")
    for task, acc in res.accuracy["test"].items():
        print(f"{task:<24} {100 * res.accuracy['validation'][task]:>9.1f}% {100 * acc:>9.1f}%")
    print(f"load it: mergeforge.load({str(res.out_dir)!r}, task=NAME)")
    return 0


def _yaml(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def methods_markdown() -> str:
    """The README's method table, generated from the registry (a test keeps them in sync)."""
    from mergeforge.methods import REGISTRY

    base = {"required": "required", "optional": "optional", "unused": "as an input"}
    rows = [
        "| method | what it does | base model | parameters (default) | paper |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in REGISTRY:
        params = ", ".join(
            f"`{p.name}`" + ("" if p.required else f" ({_yaml(p.default)})")
            + (" per model" if p.scope == "per_model" else "")
            for p in s.params
        )  # fmt: skip
        kind = " (stochastic)" if s.stochastic else ""
        rows.append(
            f"| `{s.name}` | {s.summary}{kind} | {base[s.base]} | {params} | [link]({s.paper}) |"
        )
    return "\n".join(rows)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


COMMANDS = {
    "merge": _merge,
    "validate": _validate,
    "plan": _plan,
    "methods": _methods,
    "extract-lora": _extract_lora,
    "recover": _recover,
    "bench": _bench,
    "fuse": _fuse,
}

if __name__ == "__main__":
    sys.exit(main())

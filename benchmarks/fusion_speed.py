"""Cost of the data-driven and dynamic fusion algorithms on the ``text-minilm`` pool (issue 5).

The fusion problem is ``mergeforge.bench.fusion_problem.problem_from_pool(pool, "test",
max_examples=16, batch_size=16)``: the MiniLM body, θ0, T = 6 experts and one test batch of 16
per task (the same T batches for every measurement). Four measurements:

1. **Layer-wise AdaMerging step** (``fusion.merged``: ``MergedModel.params`` → ``entropy`` summed
   over the T tasks → ``train`` for one Adam step on λ (K, T), the code path of
   ``adamerging.run``) vs **one plain pass**: the body with every parameter trainable, the same
   entropy through each task's head on the same batches, one backward to all parameters.
   Ratio = median step / median plain pass (target ≤ 2).
2. **WEMoE training step** (``wemoe.upscale`` with the default config, routers batch-reduced;
   ``wemoe.train_step``, what ``wemoe.run`` loops over: per task forward + entropy + backward,
   then one Adam step) vs the
   same plain pass (target ≤ 2). The three are timed interleaved, ``--repeats`` rounds after
   ``WARMUP`` rounds, the order rotated every round.
3. **Peak memory**: each of plain / AdaMerging / WEMoE runs in a fresh subprocess that loads the
   problem, reads θ0 and the experts once (so weights mapped from files are resident), frees what
   it can (``gc``, ``malloc_trim``) and takes its RSS as the baseline; then it builds the state
   (build peak) and takes one step (step peak), each window with the kernel's peak-RSS mark
   reset. The step peak's increase over the baseline is compared with (T+2) × model bytes +
   activations, the activations measured as the peak RSS increase of the plain pass's forward
   (all T graphs alive, before the backward).
4. **SMILE** with its default config and with ``gate_k=16, k=32``: extra parameters (absolute and
   relative to the body) and per-batch inference latency of the upscaled body vs the plain body on
   the same T batches (median of ``--repeats``, interleaved, under ``torch.inference_mode``).

Results: ``benchmarks/results/fusion_speed-<UTC time>.json`` with ``run_info``. Run:
``python benchmarks/fusion_speed.py [--repeats N] [--threads N] [--note TEXT]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "src"), str(HERE)]  # benchmark this checkout; `import _runinfo`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

import _runinfo  # noqa: E402
from mergeforge.fusion.adamerging import AdaMergingConfig  # noqa: E402
from mergeforge.fusion.data import Batch, FusionProblem  # noqa: E402
from mergeforge.fusion.losses import entropy  # noqa: E402
from mergeforge.fusion.merged import MergedModel, train  # noqa: E402
from mergeforge.fusion.smile import SmileConfig  # noqa: E402
from mergeforge.fusion.smile import run as smile_run  # noqa: E402
from mergeforge.fusion.wemoe import WEMoEConfig, routers, train_step, upscale  # noqa: E402

POOL = "text-minilm"
BATCH_SIZE = 16
MAX_EXAMPLES = 16  # one batch of 16 per task
THREADS = 2
REPEATS = 7
WARMUP = 1
SPEED_TARGET = 2.0
SMILE_CONFIGS = {"default": SmileConfig(), "gate_k=16,k=32": SmileConfig(gate_k=16, k=32)}
STEPS = ("plain", "adamerging", "wemoe")
SAMPLE_INTERVAL_S = 0.005

MEASUREMENT = {
    "step_time": "wall time (perf_counter) of one call of the step; the loss is read back as a "
    "float inside it. Median over the repeats, after the warm-up rounds; rounds interleave the "
    "three steps, the order rotated each round",
    "adamerging_step": "fusion.merged.train(steps=1) on layer-wise λ (K, T) with the objective "
    "of adamerging.run: MergedModel.entropy(MergedModel.params(λ), one batch per task); a fresh "
    "Adam per call (its state is λ-sized)",
    "wemoe_step": "wemoe.train_step (wemoe.run's loop): zero_grad, per task forward + entropy + "
    "backward, check_finite, Adam step on the routers; hub.batch_reduce on",
    "plain_pass": "problem.body with requires_grad on every parameter: zero_grad, Σ_t entropy("
    "head_t(body(batch_t))), one backward; no optimizer",
    "peak_rss_increase": "fresh subprocess per step kind: load the problem, read every tensor of "
    "θ0 and the experts once (weights mapped from files become resident), gc + malloc_trim, "
    "baseline = RSS; then two windows, each opened with gc + malloc_trim and a VmHWM reset "
    "(/proc/self/clear_refs 5): building the state (build peak), one step (step peak; plain: "
    "forward, then backward). peak = max(VmHWM, RSS sampled every 5 ms); increase = peak − "
    "baseline. The bound is compared with the step peak",
    "activations": "peak RSS increase of the plain pass's forward (the T graphs alive, before the "
    "backward), measured in the plain subprocess",
    "memory_bound": "(T+2) × model bytes (θ0, T task vectors, the merged weights) + activations; "
    "θ0 is the problem's own tensor in MergedModel (no copy), so it is in the baseline",
    "smile_latency": "per batch: wall time of the body's forward over the T batches / T, "
    "torch.inference_mode; median over the repeats, interleaved with the plain body",
}


def load_problem(max_examples: int = MAX_EXAMPLES, batch_size: int = BATCH_SIZE) -> FusionProblem:
    """The ``text-minilm`` fusion problem on its test inputs (pool from the cache)."""
    from transformers.utils import logging as hf_logging

    from mergeforge.bench.fusion_problem import problem_from_pool
    from mergeforge.bench.pools import get_pool

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    pool = get_pool(POOL)
    return problem_from_pool(pool, "test", max_examples=max_examples, batch_size=batch_size).problem


def fixed_batches(problem: FusionProblem) -> list[Batch]:
    """The first unlabeled batch of every task: the batches every measurement reads."""
    for task in problem.tasks:
        task.require("unlabeled", "fusion_speed")
    return [task.unlabeled[0] for task in problem.tasks]


Step = Callable[[], float]


def plain_loss(problem: FusionProblem, batches: Sequence[Batch]) -> torch.Tensor:
    """Σ_t entropy(head_t(body(batch_t))) through the plain body, every parameter trainable."""
    body = problem.body.requires_grad_(True)
    pairs = zip(problem.tasks, batches, strict=True)
    return torch.stack([entropy(t.head(body(**b), b)) for t, b in pairs]).sum()


def plain_step(problem: FusionProblem, batches: Sequence[Batch]) -> Step:
    """One forward + backward of the plain body to all its parameters (see MEASUREMENT)."""

    def step() -> float:
        problem.body.zero_grad(set_to_none=True)
        loss = plain_loss(problem, batches)
        loss.backward()
        return float(loss.detach())

    return step


def adamerging_step(
    problem: FusionProblem, batches: Sequence[Batch], config: AdaMergingConfig | None = None
) -> tuple[Step, MergedModel, torch.Tensor]:
    """One layer-wise AdaMerging step, as ``adamerging.run`` takes it; also the model and λ."""
    config = config or AdaMergingConfig()
    model = MergedModel(problem)
    lam = model.coefficients("layer", config.init)  # (K, T)
    per_task = [[b] for b in batches]

    def step() -> float:
        def objective() -> torch.Tensor:
            return model.entropy(model.params(lam, clamp=config.clamp), per_task)

        history = train(
            [lam], objective, lr=config.lr, steps=1, algorithm=config.algorithm, lower="lr"
        )
        return history[-1]

    return step, model, lam


def wemoe_step(
    problem: FusionProblem, batches: Sequence[Batch], config: WEMoEConfig | None = None
) -> tuple[Step, torch.nn.Module]:
    """One WEMoE router-training step (``wemoe.train_step``, what ``wemoe.run`` loops over); also
    the module."""
    config = config or WEMoEConfig()
    module = upscale(problem, config)
    module.wemoe_hub.batch_reduce = config.batch_reduce
    optimizer = torch.optim.Adam([p for r in routers(module) for p in r.parameters()], lr=config.lr)

    def step() -> float:
        return train_step(module, problem, list(batches), optimizer, 1, config.NAME)

    return step, module


def time_interleaved(
    steps: dict[str, Step], repeats: int, warmup: int = WARMUP
) -> tuple[dict[str, list[float]], list[str]]:
    """Seconds of every call of every step, ``warmup`` untimed rounds first, then ``repeats``
    rounds, each round calling every step once, the order rotated by one each round; also the
    order of the timed calls."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    order: list[str] = []
    for r in range(warmup + repeats):
        rotated = names[r % len(names) :] + names[: r % len(names)]
        for name in rotated:
            t0 = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(elapsed)
                order.append(name)
    return times, order


def speed_summary(times: dict[str, list[float]], reference: str = "plain") -> dict[str, Any]:
    """Median and min per step and each step's median over the reference's median."""
    med = {n: statistics.median(ts) for n, ts in times.items()}
    return {
        "median_s": med,
        "min_s": {n: min(ts) for n, ts in times.items()},
        "ratio_vs_plain": {n: med[n] / med[reference] for n in times if n != reference},
    }


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back (glibc)


class PeakRSS:
    """Peak RSS increase over ``baseline`` (default: the RSS at entry, after freeing what can be
    freed) while the block runs: the kernel's peak mark, reset at entry where /proc allows it,
    and a 5 ms sampler thread."""

    def __init__(self, baseline: int | None = None) -> None:
        self._given = baseline

    def __enter__(self) -> PeakRSS:
        _release_free_memory()
        self.entry = _rss()
        self.baseline = self.entry if self._given is None else self._given
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self._peak, self._stop = self.entry, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            self._stop.wait(SAMPLE_INTERVAL_S)

    def _current_peak(self) -> int:
        hwm = _hwm() if self.hwm_reset else None
        return max(self._peak, _rss(), hwm or 0)

    def so_far(self) -> int:
        """The peak increase up to now."""
        return self._current_peak() - self.baseline

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = self._current_peak()
        self.increase = self.peak - self.baseline


@torch.no_grad()
def touch(problem: FusionProblem) -> None:
    """Read every tensor of θ0 and the experts once: tensors mapped from the weight files become
    resident now, not during the measured step (their pages would count as its memory)."""
    for state in (problem.base, *problem.experts):
        for tensor in state.values():
            tensor.sum()


def measure_memory(problem: FusionProblem, what: str) -> dict[str, Any]:
    """Peak RSS increases over one baseline (taken after ``touch``): of building ``what``'s state
    and of one step after it (plain: of its forward, the activation estimate, and of the whole
    pass); ``state_rss_increase_bytes``: what the built state holds."""
    if what not in STEPS:
        raise ValueError(f"unknown step {what!r}; one of {STEPS}")
    batches = fixed_batches(problem)
    out: dict[str, Any] = {"step": what, "resident_before_touch_bytes": _rss()}
    touch(problem)
    if what == "plain":
        with PeakRSS() as first:
            loss = plain_loss(problem, batches)
        out["forward_peak_increase_bytes"] = first.increase
        with PeakRSS(first.baseline) as second:
            loss.backward()
        step_peak = max(first.increase, second.increase)
    else:
        build = adamerging_step if what == "adamerging" else wemoe_step
        with PeakRSS() as first:
            step = build(problem, batches)[0]
        out["build_peak_increase_bytes"] = first.increase
        with PeakRSS(first.baseline) as second:
            step()
        out["state_rss_increase_bytes"] = second.entry - first.baseline
        step_peak = second.increase
    out.update(
        baseline_rss_bytes=first.baseline,
        step_peak_increase_bytes=step_peak,
        peak_rss_bytes=max(first.peak, second.peak),
        hwm_reset=first.hwm_reset and second.hwm_reset,
    )
    return out


def memory_in_subprocess(what: str, threads: int, timeout: float = 600) -> dict[str, Any]:
    """``measure_memory`` of ``what`` on the pool problem, in a fresh interpreter."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_memory",
        what,
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"memory child {what} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def model_bytes(problem: FusionProblem) -> tuple[int, int]:
    """(parameters, bytes) of the body."""
    params = list(problem.body.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def memory_summary(memory: dict[str, dict[str, Any]], tasks: int, nbytes: int) -> dict[str, Any]:
    """The (T+2) × model + activations bound and each step's peak increase against it."""
    activations = memory["plain"]["forward_peak_increase_bytes"]
    bound = (tasks + 2) * nbytes + activations
    algorithms = [k for k in ("adamerging", "wemoe") if k in memory]
    return {
        "model_bytes": nbytes,
        "tasks": tasks,
        "bound_without_activations_bytes": (tasks + 2) * nbytes,
        "activations_bytes": activations,
        "activations_estimated_as": MEASUREMENT["activations"],
        "bound_bytes": bound,
        "step_peak_increase_bytes": {k: v["step_peak_increase_bytes"] for k, v in memory.items()},
        "step_peak_vs_bound": {
            k: memory[k]["step_peak_increase_bytes"] / bound for k in algorithms
        },
        "within_bound": {k: memory[k]["step_peak_increase_bytes"] <= bound for k in algorithms},
        "build_peak_increase_bytes": {
            k: memory[k]["build_peak_increase_bytes"] for k in algorithms
        },
        "runs": memory,
    }


def smile_report(
    problem: FusionProblem, batches: Sequence[Batch], repeats: int,
    configs: dict[str, SmileConfig] | None = None, warmup: int = WARMUP,
) -> dict[str, Any]:  # fmt: skip
    """Extra parameters and per-batch inference latency of each SMILE model (``SMILE_CONFIGS``
    by default) vs the plain body."""
    configs = SMILE_CONFIGS if configs is None else configs
    problem.body.requires_grad_(False).zero_grad(set_to_none=True)
    models: dict[str, torch.nn.Module] = {"plain": problem.body}
    built: dict[str, dict[str, Any]] = {}
    for label, config in configs.items():
        t0 = time.perf_counter()
        result = smile_run(problem, config)
        models[label] = result.module
        body, extra = result.info["body_parameters"], result.info["extra_parameters"]
        built[label] = {
            "config": {"gate_k": config.gate_k, "k": config.k, "top_k": config.top_k},
            "build_s": time.perf_counter() - t0,
            "upscaled_linears": result.info["upscaled"],
            "body_parameters": body,
            "extra_parameters": extra,
            "extra_relative": extra / body,
        }

    def forward(module: torch.nn.Module) -> Step:
        def step() -> float:
            with torch.inference_mode():
                for b in batches:
                    module(**b)
            return 0.0

        return step

    times, _ = time_interleaved({k: forward(m) for k, m in models.items()}, repeats, warmup)
    per_batch = {k: statistics.median(ts) / len(batches) for k, ts in times.items()}
    for label in configs:
        built[label]["latency_per_batch_s"] = per_batch[label]
        built[label]["latency_vs_plain"] = per_batch[label] / per_batch["plain"]
    return {"plain_latency_per_batch_s": per_batch["plain"], "configs": built, "times_s": times}


def write_results(result: dict[str, Any], out_dir: Path) -> Path:
    """``fusion_speed-<UTC time>.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"fusion_speed-{stamp}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def headline(speed: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """The ratios and whether each target is met."""
    ratios = speed["ratio_vs_plain"]
    return {
        "adamerging_step_vs_plain": ratios["adamerging"],
        "wemoe_step_vs_plain": ratios["wemoe"],
        "targets": {
            f"adamerging step <= {SPEED_TARGET:g}x plain": ratios["adamerging"] <= SPEED_TARGET,
            f"wemoe step <= {SPEED_TARGET:g}x plain": ratios["wemoe"] <= SPEED_TARGET,
            "adamerging peak increase <= (T+2) x model + activations": memory["within_bound"].get(
                "adamerging"
            ),
            "wemoe peak increase <= (T+2) x model + activations": memory["within_bound"].get(
                "wemoe"
            ),
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    speed, mem, smile, head = (result[k] for k in ("speed", "memory", "smile", "headline"))
    mb = 2**20
    cfg = result["config"]
    print(f"\nfusion_speed on {POOL}: T={mem['tasks']}, batch {BATCH_SIZE}, "
          f"{cfg['threads']} threads, {cfg['repeats']} repeats")  # fmt: skip
    for name, med in speed["median_s"].items():
        ratio = speed["ratio_vs_plain"].get(name)
        print(f"  {name:<11} median {med:7.3f} s" + (f"  = {ratio:.2f}x plain" if ratio else ""))
    print(f"  memory: model {mem['model_bytes'] / mb:.0f} MiB, activations "
          f"{mem['activations_bytes'] / mb:.0f} MiB, bound (T+2) x model + activations "
          f"{mem['bound_bytes'] / mb:.0f} MiB")  # fmt: skip
    for name, inc in mem["step_peak_increase_bytes"].items():
        build = mem["build_peak_increase_bytes"].get(name)
        print(f"  {name:<11} step peak RSS increase {inc / mb:6.0f} MiB"
              + (f" (building its state: {build / mb:.0f} MiB)" if build else ""))  # fmt: skip
    print(f"  SMILE: plain body {smile['plain_latency_per_batch_s'] * 1e3:.1f} ms/batch")
    for label, s in smile["configs"].items():
        print(f"  SMILE {label:<15} +{s['extra_parameters'] / 1e6:.2f}M params "
              f"({s['extra_relative']:.2f}x body), {s['latency_per_batch_s'] * 1e3:.1f} ms/batch "
              f"= {s['latency_vs_plain']:.2f}x plain")  # fmt: skip
    print(f"headline: AdaMerging step {head['adamerging_step_vs_plain']:.2f}x, WEMoE step "
          f"{head['wemoe_step_vs_plain']:.2f}x a plain forward+backward "
          f"(target <= {SPEED_TARGET:g}x)")  # fmt: skip
    for target, met in head["targets"].items():
        print(f"  {target}: {'yes' if met else 'NO'}")


def run_benchmark(problem: FusionProblem, args: argparse.Namespace) -> dict[str, Any]:
    """Timing and SMILE in this process, on ``problem`` (memory is measured separately)."""
    batches = fixed_batches(problem)
    ada, _, _ = adamerging_step(problem, batches)
    we, _ = wemoe_step(problem, batches)
    steps = {"plain": plain_step(problem, batches), "adamerging": ada, "wemoe": we}
    times, order = time_interleaved(steps, args.repeats)
    speed = {**speed_summary(times), "times_s": times, "order": order}
    del steps, ada, we
    gc.collect()
    return {"speed": speed, "smile": smile_report(problem, batches, args.repeats)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=REPEATS, help=f"timed rounds (default {REPEATS})")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads ({THREADS})")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def run_config(problem: FusionProblem, args: argparse.Namespace) -> dict[str, Any]:
    """What was measured and how (the ``config`` of the results JSON)."""
    params, nbytes = model_bytes(problem)
    return {
        "pool": POOL, "split": "test", "batch_size": BATCH_SIZE, "max_examples": MAX_EXAMPLES,
        "tasks": [t.name for t in problem.tasks],
        "batch_shapes": [list(b["input_ids"].shape) for b in fixed_batches(problem)],
        "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": WARMUP,
        "adamerging": {"granularity": "layer", **asdict(AdaMergingConfig())},
        "wemoe": {k: v for k, v in asdict(WEMoEConfig()).items() if k != "mlp_modules"},
        "smile": {k: asdict(c) for k, c in SMILE_CONFIGS.items()},
        "body_parameters": params, "model_bytes": nbytes,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load_start = time.perf_counter(), os.getloadavg()
    memory = {}
    for what in STEPS:
        memory[what] = memory_in_subprocess(what, args.threads)
        print(
            f"memory {what}: step peak RSS +{memory[what]['step_peak_increase_bytes'] / 2**20:.0f} MiB"
        )
    problem = load_problem()
    measured = run_benchmark(problem, args)
    mem = memory_summary(memory, problem.num_tasks, model_bytes(problem)[1])
    result = {
        "benchmark": "fusion_speed",
        "run_info": _runinfo.run_info(),
        "note": args.note,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": run_config(problem, args),
        "measurement": MEASUREMENT,
        "speed": measured["speed"],
        "memory": mem,
        "smile": measured["smile"],
        "headline": headline(measured["speed"], mem),
        "total_s": time.perf_counter() - t0,
    }
    path = write_results(result, args.out)
    print_summary(result)
    print(f"\nwrote {path} ({result['total_s']:.0f} s)")
    return 0


def memory_main(argv: list[str]) -> int:
    """Child process: ``measure_memory`` of one step kind on the pool problem, as one JSON line."""
    p = argparse.ArgumentParser(prog="fusion_speed.py _memory")
    p.add_argument("what", choices=STEPS)
    p.add_argument("--threads", type=int, default=THREADS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = load_problem()
    print(json.dumps(measure_memory(problem, args.what)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_memory":
        sys.exit(memory_main(sys.argv[2:]))
    sys.exit(main())

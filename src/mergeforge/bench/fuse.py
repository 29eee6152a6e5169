"""``mergeforge fuse CONFIG.yaml OUT_DIR``: a fusion algorithm on a user's own models and data.

CONFIG.yaml is a user pool (``bench.user_pools``: ``name``, ``base``, ``tasks`` with each task's
fine-tuned classifier and data files, paths relative to the YAML) plus::

    algorithm: adamerging          # mergeforge methods lists the fusion algorithms
    parameters: {steps: 500, granularity: layer}   # the algorithm's config fields (optional)
    device: cpu                    # or cuda (optional; --device overrides it)

The run: check the algorithm, its parameters, the device and OUT_DIR (nothing is loaded before
they pass); load the pool; build the fusion problem from the split the algorithm reads
(``fusion_problem.ALGORITHM_SPLIT``: test inputs for test-time adaptation, validation inputs for
RegMean/Fisher/Twin-Merging since user pools have no training split, none for SMILE); run it with a
progress bar (step, loss, time left); measure every task's validation and test accuracy of the
fused model with each task's own head; write OUT_DIR (``bench.fuse_output``) atomically. Any error
leaves OUT_DIR as it was (absent, or untouched when it existed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergeforge import __version__
from mergeforge.bench.fuse_output import (
    FORMAT,
    Head,
    extract_head,
    full_state,
    model_card,
    recipe_yaml,
    tokenizer_source,
    weight_files,
    write_fused_dir,
)
from mergeforge.bench.pool import CACHE_ROOT, Pool
from mergeforge.errors import FusionError
from mergeforge.fusion.data import batch_size
from mergeforge.fusion.losses import Progress
from mergeforge.fusion.results import DynamicResult, StaticResult
from mergeforge.fusion.spec import FusionSpec

FUSE_KEYS = ("algorithm", "parameters", "device")
MAX_EXAMPLES = 256
BATCH_SIZE = 16
DATA_SEED = 0


@dataclass(frozen=True)
class FuseRequest:
    """What CONFIG.yaml asks for, checked: the algorithm, its config and the device."""

    path: Path
    spec: FusionSpec
    config: Any
    device: str
    base: Path
    """The YAML's ``base`` directory (where the tokenizer is taken from)."""


@dataclass(frozen=True)
class FuseOutcome:
    """What ``fuse`` did: where, the result itself, ``accuracy[split][task]`` and timings."""

    out_dir: Path
    kind: str
    result: StaticResult | DynamicResult
    accuracy: dict[str, dict[str, float]]
    fuse_seconds: float
    eval_seconds: float


def read_request(path: str | Path, device: str | None = None) -> FuseRequest:
    """CONFIG.yaml's algorithm, parameters (``FusionError`` naming the bad one) and device
    (``device`` overrides the YAML's; default cpu; cuda without a GPU is an error)."""
    import yaml

    from mergeforge.engine.output import check_device
    from mergeforge.errors import PoolError
    from mergeforge.fusion.registry import FUSION_REGISTRY, get_fusion

    p = Path(path).expanduser()
    if not p.is_file():
        raise PoolError(f"fuse config {p} does not exist; check the path.")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise PoolError(f"fuse config {p} is not valid YAML: {exc}") from None
    if not isinstance(doc, Mapping) or "algorithm" not in doc:
        known = ", ".join(s.name for s in FUSION_REGISTRY)
        raise FusionError(
            f"{p}: no `algorithm:`; a fuse config is a user pool (name, base, tasks) plus "
            f"`algorithm: NAME` (one of {known}) and optional `parameters:` and `device:`"
        )
    spec = get_fusion(str(doc["algorithm"]))
    params = doc.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise FusionError(f"{p}: `parameters` must be a mapping of {spec.name}'s fields")
    config = spec.make_config(dict(params))
    dev = str(device or doc.get("device") or "cpu")
    check_device(dev)
    return FuseRequest(p, spec, config, dev, (p.parent / str(doc.get("base", ""))).expanduser())


@contextmanager
def progress_bar(desc: str, enabled: bool) -> Iterator[Progress]:
    """A tqdm bar driven by ``progress(step, total, loss)``: step of total, loss, time left."""
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)

    def progress(step: int, total: int, loss: float) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix_str(f"loss {loss:.4g}")

    try:
        yield progress
    finally:
        bar.close()


def fuse(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    cache_root: str | Path = CACHE_ROOT,
) -> FuseOutcome:
    """Run CONFIG.yaml's algorithm on its pool and write the fused model to ``out_dir``
    (module docstring). ``cache_root``: where the pool's extracted encoders are cached."""
    from mergeforge.bench.fusion_problem import ALGORITHM_SPLIT, problem_from_pool
    from mergeforge.bench.user_pools import load_user_pool
    from mergeforge.engine.output import check_output_dir

    req = read_request(config_path, device)
    out = Path(out_dir).expanduser().absolute()
    check_output_dir(out, overwrite)
    pool = load_user_pool(req.path, cache_root=cache_root)
    split = ALGORITHM_SPLIT.get(req.spec.name)
    built = problem_from_pool(
        pool,
        split,
        max_examples=MAX_EXAMPLES,
        batch_size=BATCH_SIZE,
        seed=DATA_SEED,
        device=req.device,
    )
    t0 = time.perf_counter()
    with progress_bar(req.spec.name, progress) as bar:
        result = req.spec.run(built.problem, req.config, device=req.device, progress=bar)
    fuse_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    models, accuracy, state = _evaluate(pool, result)
    eval_s = time.perf_counter() - t1
    heads = [
        extract_head(t.name, models[t.name], t.data.label_names, t.model_dir) for t in pool.tasks
    ]
    record = _record(req, pool, built, result, accuracy, heads, (fuse_s, eval_s))
    recipe = None
    if isinstance(result, StaticResult) and result.coefficients is not None:
        encoders = {t.name: t.encoder_dir for t in pool.tasks}
        recipe = recipe_yaml(result.coefficients, pool.base_dir, encoders, result.algorithm)
        record["recipe"] = "recipe.yaml"
    write_fused_dir(
        out, state, config_from=pool.base_dir, record=record, card=model_card(record),
        heads=heads, recipe=recipe, overwrite=overwrite,
        tokenizer_from=tokenizer_source([req.base, *(t.model_dir for t in pool.tasks)]),
    )  # fmt: skip
    return FuseOutcome(out, record["kind"], result, accuracy, fuse_s, eval_s)


def _evaluate(
    pool: Pool, result: StaticResult | DynamicResult
) -> tuple[dict[str, Any], dict[str, dict[str, float]], dict[str, Any]]:
    """(task models, ``{split: {task: accuracy}}``, tensors to write): a static result's full
    encoder state (θ0's tensors with the fused ones in place) under every task head; a dynamic
    module (moved to the CPU) in place of every task's encoder."""
    from mergeforge.bench.evaluate import Evaluator, load_encoder_state, load_task_models
    from mergeforge.loading import EncoderAdapter

    models = load_task_models(pool)
    evaluators = {s: Evaluator(pool, s, models=models) for s in ("validation", "test")}
    if isinstance(result, StaticResult):
        state = full_state(load_encoder_state(pool.base_dir), result.state)
        return models, {s: ev.evaluate(state) for s, ev in evaluators.items()}, state
    module = result.module.to("cpu").eval()
    encoder = EncoderAdapter(module)
    accuracy = {s: ev.evaluate_module(encoder) for s, ev in evaluators.items()}
    return models, accuracy, dict(module.state_dict())


def _history(history: tuple[float, ...]) -> dict[str, Any]:
    if not history:
        return {"steps": 0}
    return {
        "steps": len(history),
        "first_loss": history[0],
        "final_loss": history[-1],
        "min_loss": min(history),
        "loss": list(history),
    }


def _record(
    req: FuseRequest,
    pool: Pool,
    built: Any,
    result: StaticResult | DynamicResult,
    accuracy: dict[str, dict[str, float]],
    heads: list[Head],
    seconds: tuple[float, float],
) -> dict[str, Any]:
    """fusion.json: what was fused, how, on which data, with what result."""
    from mergeforge.bench.fusion_problem import ALGORITHM_SPLIT

    spec, tasks = req.spec, built.problem.tasks
    record: dict[str, Any] = {
        "format": FORMAT,
        "kind": "static" if isinstance(result, StaticResult) else "dynamic",
        "algorithm": spec.name,
        "category": spec.category,
        "paper": spec.paper,
        "doc": spec.doc,
        "parameters": asdict(req.config),
        "pool": pool.name,
        "config_file": str(req.path.resolve()),
        "tasks": [t.name for t in pool.tasks],
        "data": {
            "reads": spec.data,
            "split": ALGORITHM_SPLIT.get(spec.name),
            "used": built.data_note,
            "examples": {t.name: sum(batch_size(b) for b in t.unlabeled) for t in tasks},
            "max_examples": MAX_EXAMPLES,
            "batch_size": BATCH_SIZE,
            "seed": DATA_SEED,
        },
        "history": _history(result.history),
        "accuracy": accuracy,
        "evaluated_on": "every example of each task's validation and test files",
        "inputs": {
            "base": weight_files(req.base),
            "tasks": {t.name: weight_files(t.model_dir) for t in pool.tasks},
        },
        "heads": {
            h.task: {"tensors": f"heads/{h.task}.safetensors", "config": f"heads/{h.task}.json"}
            for h in heads
        },
        "info": result.info,
        "device": req.device,
        "seconds": {"fuse": seconds[0], "evaluate": seconds[1]},
        "mergeforge": __version__,
    }
    if isinstance(result, DynamicResult):
        config = next(m.config for m in result.module.modules() if hasattr(m, "config"))
        record.update(
            loader=result.loader, description=result.description, body_class="AutoModel",
            attn_implementation=getattr(config, "_attn_implementation", None),
        )  # fmt: skip
    return record

"""RegMean and RegMean++: linear layers merged in closed form from the Grams of their inputs.

RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
arXiv 2212.09849): each linear layer y = W x of the merged model should reproduce every expert's
outputs on that expert's own inputs, min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², solved by

    W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,   transposed back to (out, in),
    G_i = X_iᵀ X_i / n_i,   G̃_i = α G_i + (1 − α) diag(G_i)

(G_i as FusionBench's running mean over the n_i input rows; α = ``alpha``, FusionBench's
``reduce_non_diagonal_ratio``, shrinks the off-diagonal entries; α = 1 is the exact regression
solution, α = 0 a per-input-feature weighted average). Every other fused tensor (biases,
LayerNorms, embeddings, weights of non-Linear modules) is the plain average of the experts.
"Linear layers" are the ``nn.Linear`` modules of the body whose weight is fused; task heads are
not in the body. The system is symmetric positive semi-definite: solved by Cholesky in float64
(the solution ``torch.linalg.solve`` gives; FusionBench uses ``torch.inverse`` in float32).
Two departures where FusionBench would return inf/NaN or noise: an input feature that is 0 on
every input (all-MiniLM-L6-v2's last LayerNorm has gains of 1e-33, so the pooler sees exact
zeros) leaves its weight column undetermined, and that column is the experts' average; a system
still singular after that (α = 1 with fewer rows than inputs, collinear features) is a
``FusionError`` unless ``ridge`` > 0 adds ridge · mean(diag) · I.

RegMean++ (arXiv 2508.03121): the same solve, but the inputs of layer l are computed through the
*already merged* earlier layers, so each layer corrects for what the merge did before it. The
linear layers are grouped by block (the first numbered component of the module name,
``encoder.layer.3``; a Linear outside numbered blocks is its own group) and the groups are merged
in the order their first Linear is called in a forward pass. For group g and expert i the body
runs on task i's inputs with: fused tensors outside every group (embeddings, final norms) and
all earlier groups merged (plain average / RegMean), group g itself and later ones expert i's —
as FusionBench, where layer l of expert i reads the merged layer l − 1's outputs. Each pass stops
once group g's last Linear has run; cost ≈ Σ_g depth(g) / depth forward passes per task, about
half a full forward per group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mergeforge.errors import FusionError
from mergeforge.fusion.data import FusionProblem
from mergeforge.fusion.hooks import (
    body_tensors,
    call_order,
    collect_grams,
    example_batches,
    linear_modules,
    weight_name,
)
from mergeforge.fusion.losses import Progress
from mergeforge.fusion.results import StaticResult
from mergeforge.fusion.spec import FusionSpec
from mergeforge.methods.linear import linear

PAPER = "https://arxiv.org/abs/2212.09849"
PAPER_PP = "https://arxiv.org/abs/2508.03121"
DEAD_RTOL = torch.finfo(torch.float32).eps
"""An input feature whose Gram diagonal is ≤ this × the largest is 0 at float32 precision on every
input (e.g. a LayerNorm gain of 0): its weight column is not determined by the data."""
SINGULAR_RTOL = 1e-6
"""A Cholesky pivot ≤ this × its own diagonal entry (the share of a feature's energy that the
features before it do not explain) means the Gram sum is singular at the precision of float32
activations. With α < 1 the share is ≥ 1 − α, so only α close to 1 can trip it."""


@dataclass(frozen=True)
class RegMeanConfig:
    """Parameters of ``regmean`` and ``regmean_pp``.

    * ``alpha``: α, the factor on the Grams' off-diagonal entries (FusionBench
      ``reduce_non_diagonal_ratio``; its generic default 0.1, its CLIP configs 0.95, GPT-2 0.6);
      in [0, 1].
    * ``examples``: inputs of each task whose activations are used (FusionBench 256; all of them
      when the task has fewer).
    * ``batch_size``: split the task's batches into chunks of at most this many inputs (memory
      only: the Grams are sums); ``None`` uses them as given.
    * ``ridge``: when > 0, ridge · mean(diag) · I is added to every summed Gram before solving
      (needed when, with α = 1, a layer's inputs span fewer dimensions than it has); 0 solves
      the plain system and stops with an error if it is singular.
    * ``include_padding``: also count the activations at padding positions (FusionBench does;
      by default rows with ``attention_mask`` 0 are left out).
    * ``seed``: order in which a task's batches are read (which inputs, when it has more than
      ``examples``).
    """

    alpha: float = 0.1
    examples: int = 256
    batch_size: int | None = None
    ridge: float = 0.0
    include_padding: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise FusionError(f"regmean: alpha={self.alpha} must lie in [0, 1]")
        if self.examples < 1:
            raise FusionError(f"regmean: examples={self.examples} must be an integer ≥ 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise FusionError(f"regmean: batch_size={self.batch_size} must be ≥ 1 (or null)")
        if not 0.0 <= self.ridge < float("inf"):
            raise FusionError(f"regmean: ridge={self.ridge} must be a finite number ≥ 0")


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries times α, diagonal unchanged."""
    out = gram * alpha  # (d, d)
    out.diagonal().copy_(gram.diagonal())
    return out


def solve_normal(lhs: Tensor, rhs: Tensor, mean: Tensor, ridge: float, module: str) -> Tensor:
    """``(out, in)``: W*ᵀ = (lhs + ridge · mean(diag) · I)⁻¹ rhs, transposed; ``lhs`` ``(in, in)``
    symmetric PSD, ``rhs`` ``(in, out)``. Input features that are 0 on every input (diagonal ≤
    DEAD_RTOL × the largest) leave their weight column undetermined: those columns are the
    experts' average ``mean`` ``(out, in)``, the rest is solved by Cholesky in float64.
    ``FusionError`` when the rest is singular."""
    a, b = lhs.double(), rhs.double()  # (in, in), (in, out)
    diag = a.diagonal()  # (in,)
    live = diag > DEAD_RTOL * float(diag.max())  # (in,)
    if not bool(live.any()):
        return mean.float()
    a, b = a[live][:, live], b[live]  # (live, live), (live, out)
    if ridge > 0:
        a.diagonal().add_(ridge * float(a.diagonal().mean()))
    chol, info = torch.linalg.cholesky_ex(a)  # (live, live) lower
    ratio = chol.diagonal().square() / a.diagonal()  # (live,) pivot / own diagonal entry
    if int(info) > 0 or float(ratio.min()) <= SINGULAR_RTOL:
        raise FusionError(
            f"regmean: the summed Gram of the inputs of layer {module!r} is singular (its "
            "inputs span fewer dimensions than the layer has: too few examples, or features "
            "that are linear combinations of others); set ridge (e.g. 1e-4), lower alpha below "
            "1, or give more examples"
        )
    out = mean.double().clone()  # (out, in)
    out[:, live] = torch.cholesky_solve(b, chol).T  # (out, live)
    return out.float()


class RegressionSums:
    """Σ_i G̃_i, Σ_i G̃_i W_iᵀ and Σ_i W_i of one linear layer, folded in one expert at a time
    (float32)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.lhs: Tensor | None = None  # (in, in)
        self.rhs: Tensor | None = None  # (in, out)
        self.total: Tensor | None = None  # (out, in)
        self.count = 0

    def add(self, gram: Tensor, weight: Tensor) -> None:
        """Fold in one expert's Gram ``(in, in)`` and weight ``(out, in)``."""
        g = shrink(gram.float(), self.alpha)  # (in, in)
        w = weight.to(g.device, torch.float32)  # (out, in)
        gw = g @ w.T  # (in, out)
        if self.lhs is None or self.rhs is None or self.total is None:
            self.lhs, self.rhs, self.total = g, gw, w.clone()
        else:
            self.lhs.add_(g)
            self.rhs.add_(gw)
            self.total.add_(w)
        self.count += 1

    def solve(self, ridge: float, module: str) -> Tensor:
        """W* ``(out, in)``, float32."""
        assert self.lhs is not None and self.rhs is not None and self.total is not None
        return solve_normal(self.lhs, self.rhs, self.total / self.count, ridge, module)


def regmean_merge(
    weights: Sequence[Tensor], grams: Sequence[Tensor], *, alpha: float, ridge: float = 0.0
) -> Tensor:
    """W* of one linear layer from the experts' weights ``(out, in)`` and Grams ``(in, in)``."""
    sums = RegressionSums(alpha)
    for w, g in zip(weights, grams, strict=True):
        sums.add(g, w)
    return sums.solve(ridge, "")


def _average(problem: FusionProblem, names: Sequence[str]) -> dict[str, Tensor]:
    """The experts' plain average of ``names``, float32."""
    ones = [1.0] * problem.num_tasks
    return {n: linear([e[n].float() for e in problem.experts], None, weight=ones) for n in names}


@dataclass(frozen=True)
class _Setup:
    modules: tuple[str, ...]
    plans: tuple[tuple[list[dict[str, Tensor]], int], ...]
    defaults: dict[str, Tensor]
    device: torch.device


def _setup(
    problem: FusionProblem, config: RegMeanConfig, algorithm: str, device: torch.device | str
) -> _Setup:
    """The fused linear layers, each task's batches and the body's tensors (θ0 where fused)."""
    for task in problem.tasks:
        task.require("unlabeled", algorithm)
    modules = tuple(linear_modules(problem.body, problem.names))
    if not modules:
        raise FusionError(
            f"{algorithm}: the body has no nn.Linear whose weight is fused, so there is "
            "nothing to solve; use a data-free average instead"
        )
    plans = tuple(
        example_batches(t.unlabeled, config.examples, config.seed, config.batch_size)
        for t in problem.tasks
    )
    defaults = body_tensors(problem.body, device)
    defaults.update({n: t.to(device) for n, t in problem.base.items() if n in defaults})
    return _Setup(modules, plans, defaults, torch.device(device))


class _Ticker:
    """Calls ``progress(done, total, 0.0)`` once per forward pass (closed form: no loss)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, 0.0)


def _fold(
    problem: FusionProblem,
    setup: _Setup,
    config: RegMeanConfig,
    modules: Sequence[str],
    fixed: Mapping[str, Tensor],
    ticker: _Ticker,
    stop_after_calls: int | None = None,
) -> dict[str, RegressionSums]:
    """Each expert's Grams of ``modules`` on its own task (body tensors: θ0 ← expert ← ``fixed``),
    folded into the regression sums."""
    sums = {m: RegressionSums(config.alpha) for m in modules}
    for expert, (chunks, _) in zip(problem.experts, setup.plans, strict=True):
        own = {n: expert[n].to(setup.device) for n in problem.names}
        params = {**setup.defaults, **own, **fixed}
        grams = collect_grams(
            problem.body, params, chunks, modules, device=setup.device,
            include_padding=config.include_padding, stop_after_calls=stop_after_calls,
            on_batch=ticker,
        )  # fmt: skip
        for m, gram in grams.items():
            sums[m].add(gram.mean(), expert[weight_name(m)])
    return {m: s for m, s in sums.items() if s.lhs is not None}


def _result(
    algorithm: str,
    problem: FusionProblem,
    merged: Mapping[str, Tensor],
    setup: _Setup,
    config: RegMeanConfig,
    extra: dict[str, object],
) -> StaticResult:
    state = {n: merged[n].to(problem.base[n].device, problem.base[n].dtype) for n in problem.names}
    info = {
        "examples": {t.name: n for t, (_, n) in zip(problem.tasks, setup.plans, strict=True)},
        "linear_layers": len(setup.modules),
        "config": asdict(config),
        **extra,
    }
    return StaticResult(algorithm, state, None, (), info)


def run(
    problem: FusionProblem,
    config: RegMeanConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> StaticResult:
    """RegMean (module docstring): every expert's Grams on its own task, one closed-form solve
    per linear layer, the plain average elsewhere."""
    setup = _setup(problem, config, "regmean", device)
    ticker = _Ticker(progress, sum(len(c) for c, _ in setup.plans))
    sums = _fold(problem, setup, config, setup.modules, {}, ticker)
    merged = _average(problem, problem.names)
    for module, s in sums.items():
        merged[weight_name(module)] = s.solve(config.ridge, module)
    unreached = [m for m in setup.modules if m not in sums]
    return _result("regmean", problem, merged, setup, config, {"averaged_linear": unreached})


@dataclass(frozen=True)
class LayerGroup:
    """Linear layers merged together by RegMean++: ``block`` (module-name prefix), its
    ``modules`` in call order, ``calls`` (how often they run in one forward pass) and the fused
    tensors under the block (``params``)."""

    block: str
    modules: tuple[str, ...]
    calls: int
    params: tuple[str, ...]


def block_of(module: str) -> str:
    """The module name up to its first numbered component (``encoder.layer.3.attention.self.query``
    → ``encoder.layer.3``), or the whole name when it has none."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module


def layer_groups(order: Sequence[str], names: Sequence[str]) -> list[LayerGroup]:
    """Groups of the linear layers in ``order`` (their calls in one forward pass), in the order
    of each group's first call; ``names`` are the fused tensors to assign to blocks."""
    members: dict[str, list[str]] = {}
    calls: dict[str, int] = {}
    for module in order:
        block = block_of(module)
        members.setdefault(block, [])
        if module not in members[block]:
            members[block].append(module)
        calls[block] = calls.get(block, 0) + 1
    groups = []
    for block, modules in members.items():
        prefix = f"{block}." if block else ""
        params = tuple(n for n in names if n.startswith(prefix))
        groups.append(LayerGroup(block, tuple(modules), calls[block], params))
    return groups


def run_pp(
    problem: FusionProblem,
    config: RegMeanConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> StaticResult:
    """RegMean++ (module docstring): layer groups merged one after another, each from Grams of
    inputs computed through the groups merged before it."""
    setup = _setup(problem, config, "regmean_pp", device)
    dev = setup.device
    first = setup.plans[0][0][0]
    order = call_order(problem.body, setup.defaults, {k: v.to(dev) for k, v in first.items()},
                       setup.modules)  # fmt: skip
    groups = layer_groups(order, problem.names)
    grouped = {n for g in groups for n in g.params}
    free = [n for n in problem.names if n not in grouped]
    as_used = {n: problem.base[n].dtype for n in problem.names}
    merged = {n: v.to(dev, as_used[n]) for n, v in _average(problem, free).items()}
    ticker = _Ticker(progress, len(groups) * sum(len(c) for c, _ in setup.plans))
    for group in groups:
        sums = _fold(problem, setup, config, group.modules, merged, ticker, group.calls)
        solved = _average(problem, group.params)
        for module, s in sums.items():
            solved[weight_name(module)] = s.solve(config.ridge, module)
        merged.update({n: v.to(dev, as_used[n]) for n, v in solved.items()})
    unreached = [m for m in setup.modules if m not in order]
    extra = {"averaged_linear": unreached, "groups": [g.block for g in groups]}
    return _result("regmean_pp", problem, merged, setup, config, extra)


def _spec(name: str, fn: object, paper: str, doc: str) -> FusionSpec:
    return FusionSpec(
        name=name,
        category="needs-data",
        config=RegMeanConfig,
        run=fn,  # type: ignore[arg-type]
        data="each task's unlabeled inputs (activations of every linear layer; forward only)",
        paper=paper,
        doc=doc,
    )


SPECS: tuple[FusionSpec, ...] = (
    _spec("regmean", run, PAPER, "closed-form least-squares merge of every linear layer"),
    _spec(
        "regmean_pp",
        run_pp,
        PAPER_PP,
        "RegMean with each layer's inputs computed through the already merged earlier layers",
    ),
)

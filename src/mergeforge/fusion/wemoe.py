"""WEMoE and E-WEMoE: MLPs upscaled into weight-ensembling MoE modules whose routers are trained
by test-time entropy minimisation on unlabeled test inputs.

WEMoE (Tang et al. 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
arXiv 2402.00433):

* every tensor outside the MLPs is merged statically by task arithmetic:
  θ = θ0 + λ Σ_t τ_t  (λ = ``init_lambda``);
* every MLP's Linear layers get ``W(x) = W0 + Σ_t r_t(x) τ_t`` (biases likewise) with r(x) ∈ R^T a
  router (depth 0/1/2) applied to each token of the MLP's input and averaged over tokens
  (``fusion.wemoe_modules``); the router's output bias starts at λ (and, by default, its output
  weights at 0), so the initial model *is* task arithmetic at λ;
* the routers (only they) are trained with Adam on Σ_t mean_x H(softmax(head_t(model(x)))) over
  one unlabeled batch per task and step, with r averaged over the batch (``batch_reduce``); the
  returned model routes every sample by itself.

E-WEMoE (Shen et al. 2024, "Efficient and Effective Weight-Ensembling Mixture of Experts for
Multi-Task Model Merging", arXiv 2410.21804): the same, with each MLP task-vector tensor pruned to
its largest magnitudes (``τ ⊙ [|τ| > quantile(|τ|, tv_prune_ratio)]``, per task and tensor) and
one router shared by all MLPs.

The result is a :class:`DynamicResult`; :func:`rebuild` recreates the module from a fresh body of
the base architecture (holding θ0) and the saved tensors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mergeforge.errors import FusionError
from mergeforge.fusion.data import Batch, FusionProblem, cycle, to_device
from mergeforge.fusion.losses import Progress, check_finite, entropy
from mergeforge.fusion.results import DynamicResult
from mergeforge.fusion.spec import FusionSpec
from mergeforge.fusion.wemoe_modules import (
    WEMoELinear,
    find_mlps,
    install,
    prune_magnitude,
    routed_layers,
    routers,
)

DATA = "unlabeled test inputs (test-time adaptation)"
LOADER = "mergeforge.fusion.wemoe.rebuild"
ROUTER_INPUT = (
    "each router reads its MLP's input per token and averages over the non-padding tokens of the "
    "call's attention_mask (all tokens when the call has none); batch-averaged while training, "
    "per sample at inference"
)


@dataclass(frozen=True)
class WEMoEConfig:
    """Parameters of ``wemoe``.

    * ``init_lambda`` — λ of the static task arithmetic outside the MLPs and the routers' initial
      output (0.3, the paper's and FusionBench's).
    * ``router_hidden_layers`` — router depth: 0 a learned constant per MLP (AdaMerging on the
      MLPs), 1 ``Linear(d, T)``, 2 ``Linear(d, d) → ReLU → Linear(d, T)`` (default).
    * ``lr`` — Adam learning rate of the router parameters (1e-4).
    * ``steps`` — optimisation steps, each reading one unlabeled batch per task (1000; 0 returns
      the initial model, task arithmetic at ``init_lambda``).
    * ``batch_reduce`` — while training, average the routing weights over the batch so each MLP
      builds one weight matrix per batch (FusionBench default true); inference is per sample.
    * ``output_init_std`` — std of the router's output-layer weights at initialisation: 0
      (default) makes the initial model exactly task arithmetic; 0.01 is the paper/FusionBench's
      (approximately task arithmetic). Hidden-layer weights always start ~ N(0, 0.01²).
    * ``mlp_modules`` — the Linear layers of one MLP as dotted paths relative to its block, the
      one reading the MLP input first (e.g. ``["mlp.fc1", "mlp.fc2"]``); empty: found from the
      architecture table ``wemoe_modules.MLP_PATTERNS`` (BERT, CLIP, Llama, T5, OPT).
    * ``seed`` — seeds router initialisation and the order of the batches.
    """

    NAME: ClassVar[str] = "wemoe"
    SHARED_ROUTER: ClassVar[bool] = False

    init_lambda: float = 0.3
    router_hidden_layers: int = 2
    lr: float = 1e-4
    steps: int = 1000
    batch_reduce: bool = True
    output_init_std: float = 0.0
    mlp_modules: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.mlp_modules, list):
            object.__setattr__(self, "mlp_modules", tuple(self.mlp_modules))
        problems = _problems(self)
        if problems:
            raise FusionError(f"{self.NAME}: bad parameters: " + "; ".join(problems))

    def prune_ratio(self) -> float:
        """Fraction of each MLP task-vector tensor pruned (0: none)."""
        return 0.0


@dataclass(frozen=True)
class EWEMoEConfig(WEMoEConfig):
    """Parameters of ``e_wemoe``: those of ``wemoe`` plus

    * ``tv_prune_ratio`` — fraction r of each MLP task-vector tensor set to zero, per task and
      tensor: keep ``|τ| > quantile(|τ|, r)`` (0.9 keeps 10 %; 0 prunes nothing).

    One router is shared by all MLPs.
    """

    NAME: ClassVar[str] = "e_wemoe"
    SHARED_ROUTER: ClassVar[bool] = True

    tv_prune_ratio: float = 0.9

    def prune_ratio(self) -> float:
        return self.tv_prune_ratio


def _problems(config: WEMoEConfig) -> list[str]:
    """Every invalid field of ``config``, as 'field=value (allowed)'."""
    checks: list[tuple[str, bool, str]] = [
        ("init_lambda", _is_real(config.init_lambda), "a finite number"),
        ("router_hidden_layers", config.router_hidden_layers in (0, 1, 2), "0, 1 or 2"),
        ("lr", _is_real(config.lr) and config.lr > 0, "a finite number > 0"),
        ("steps", _is_int(config.steps) and config.steps >= 0, "an integer ≥ 0"),
        ("batch_reduce", isinstance(config.batch_reduce, bool), "true or false"),
        (
            "output_init_std",
            _is_real(config.output_init_std) and config.output_init_std >= 0,
            "a finite number ≥ 0",
        ),
        (
            "mlp_modules",
            isinstance(config.mlp_modules, tuple)
            and all(isinstance(m, str) and m for m in config.mlp_modules),
            "a list of non-empty dotted module paths",
        ),
        ("seed", _is_int(config.seed), "an integer"),
    ]
    if isinstance(config, EWEMoEConfig):
        r = config.tv_prune_ratio
        checks.append(("tv_prune_ratio", _is_real(r) and 0 <= r < 1, "a number in [0, 1)"))
    return [
        f"{name}={getattr(config, name)!r} (allowed: {allowed})"
        for name, ok, allowed in checks
        if not ok
    ]


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def run(
    problem: FusionProblem,
    config: WEMoEConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> DynamicResult:
    """Upscale ``problem.body`` into a WEMoE (E-WEMoE for an :class:`EWEMoEConfig`) and train its
    routers by test-time entropy minimisation (see the module docstring)."""
    name = config.NAME
    if config.steps:
        for task in problem.tasks:
            task.require("unlabeled", name)
    module = upscale(problem, config, device)
    hub = module.wemoe_hub
    trainable = [p for r in routers(module) for p in r.parameters()]
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    streams = [cycle(t.unlabeled, config.seed + i) for i, t in enumerate(problem.tasks)]
    history: list[float] = []
    hub.batch_reduce = config.batch_reduce
    try:
        for step in range(1, config.steps + 1):
            batches = [to_device(next(stream), device) for stream in streams]
            history.append(train_step(module, problem, batches, optimizer, step, name))
            if progress is not None:
                progress(step, config.steps, history[-1])
    finally:
        hub.batch_reduce = False
    module.requires_grad_(False)
    return DynamicResult(
        algorithm=name,
        module=module,
        tensors=module.state_dict(),
        description=describe(module, problem, config),
        loader=LOADER,
        history=tuple(history),
        info=_info(module, config),
    )


def train_step(
    module: nn.Module,
    problem: FusionProblem,
    batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    step: int,
    name: str,
) -> float:
    """One router step: Σ_t H(head_t(module(x_t))) over task t's batch ``batches[t]`` (each
    task's graph backpropagated and freed in turn), then ``optimizer.step()``; the summed loss
    (``FusionError`` naming ``step`` when it is not finite)."""
    optimizer.zero_grad(set_to_none=True)
    total: Tensor | float = 0.0
    for task, batch in zip(problem.tasks, batches, strict=True):
        loss = entropy(task.head(module(**batch), batch))
        loss.backward()  # gradients add up over tasks; each task's graph is freed
        total = loss.detach() + total
    value = check_finite(total, step, name, "lr")
    optimizer.step()
    return value


def upscale(
    problem: FusionProblem, config: WEMoEConfig, device: torch.device | str = "cpu"
) -> nn.Module:
    """A copy of the body with non-MLP tensors at task arithmetic (λ = ``init_lambda``) and every
    MLP Linear routed, its routers initialised (seeded) and trainable, everything else frozen."""
    body = copy.deepcopy(problem.body).to(device).eval()
    members, prefixes = find_mlps(body, config.mlp_modules)
    routed = {f"{p}.{m}" if p else m for p in prefixes for m in members}
    _load_task_arithmetic(body, problem, config.init_lambda, skip=routed)
    install(
        body,
        members,
        prefixes,
        problem.num_tasks,
        config.router_hidden_layers,
        config.SHARED_ROUTER,
    )
    body.requires_grad_(False)
    for path, layer in routed_layers(body):
        _fill(layer, path, problem, config.prune_ratio())
    gen = torch.Generator().manual_seed(config.seed)
    for router in routers(body):
        router.initialise(config.init_lambda, config.output_init_std, gen)
        router.requires_grad_(True)
    return body


def _stacked_tv(problem: FusionProblem, name: str) -> Tensor:
    """``(T, *shape)``: τ_t of one tensor, as ``data.task_vectors`` computes it."""
    base = problem.base[name].float()
    return torch.stack([e[name].float() - base for e in problem.experts])


@torch.no_grad()
def _load_task_arithmetic(
    body: nn.Module, problem: FusionProblem, lam: float, skip: set[str]
) -> None:
    """θ0 + λ Σ_t τ_t into every fused parameter outside ``skip`` (module paths), θ0 into the
    body's other parameters that the base model has."""
    fused = set(problem.names)
    for name, param in body.named_parameters():
        if name.rpartition(".")[0] in skip:
            continue
        if name in fused:
            merged = problem.base[name].float() + lam * _stacked_tv(problem, name).sum(dim=0)
            param.copy_(merged)
        elif name in problem.base:
            param.copy_(problem.base[name])


@torch.no_grad()
def _fill(layer: WEMoELinear, path: str, problem: FusionProblem, ratio: float) -> None:
    """W0, b0 from θ0 and the (pruned) stacked task vectors of one routed Linear; a bias that is
    not fused keeps zero task vectors (it stays at θ0)."""
    weight, bias = f"{path}.weight", f"{path}.bias"
    if weight not in problem.names:
        raise FusionError(
            f"WEMoE routes the MLP layer {path!r}, but its weight is not among the fused tensors; "
            "fuse it, or name other MLP layers with mlp_modules"
        )
    layer.base_weight.copy_(problem.base[weight])
    layer.task_weight.copy_(prune_magnitude(_stacked_tv(problem, weight), ratio))  # (T, out, in)
    if layer.base_bias is not None:
        layer.base_bias.copy_(problem.base[bias])
        if bias in problem.names:
            layer.task_bias.copy_(prune_magnitude(_stacked_tv(problem, bias), ratio))  # (T, out)


def describe(module: nn.Module, problem: FusionProblem, config: WEMoEConfig) -> dict[str, Any]:
    """The JSON-able description :func:`rebuild` reads."""
    hub = module.wemoe_hub
    return {
        "algorithm": config.NAME,
        "config": _config_dict(config),
        "tasks": [t.name for t in problem.tasks],
        "num_tasks": problem.num_tasks,
        "mlp_modules": list(hub.members),
        "mlps": list(hub.mlps),
        "router_hidden_layers": config.router_hidden_layers,
        "shared_router": config.SHARED_ROUTER,
        "router_input": ROUTER_INPUT,
    }


def _config_dict(config: WEMoEConfig) -> dict[str, Any]:
    """The config's fields, JSON-able (tuples as lists)."""
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _info(module: nn.Module, config: WEMoEConfig) -> dict[str, Any]:
    trainable = sum(p.numel() for r in routers(module) for p in r.parameters())
    total = sum(t.numel() for t in module.state_dict().values())
    return {
        "data": DATA,
        "steps": config.steps,
        "routed_linears": len(routed_layers(module)),
        "router_parameters": trainable,
        "total_tensor_elements": total,
        "router_input": ROUTER_INPUT,
        "config": _config_dict(config),
    }


REQUIRED = (
    "algorithm",
    "num_tasks",
    "mlp_modules",
    "mlps",
    "router_hidden_layers",
    "shared_router",
)


def rebuild(body: nn.Module, description: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    """The WEMoE module described by ``description`` on ``body`` (a fresh body of the base
    architecture, θ0 loaded by the caller), its tensors loaded strictly; eval mode, per-sample
    routing, nothing trainable. Outputs are bit-identical to the module ``run`` returned."""
    missing = [k for k in REQUIRED if k not in description]
    if missing or description.get("algorithm") not in ("wemoe", "e_wemoe"):
        raise FusionError(
            f"not a WEMoE description (algorithm {description.get('algorithm')!r}, missing "
            f"keys {missing}); it was not written by mergeforge's wemoe/e_wemoe"
        )
    members = tuple(description["mlp_modules"])
    install(
        body, members, list(description["mlps"]), int(description["num_tasks"]),
        int(description["router_hidden_layers"]), bool(description["shared_router"]),
    )  # fmt: skip
    try:
        body.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise FusionError(
            f"the saved WEMoE tensors do not fit the body ({type(body).__name__}): {err}"
        ) from err
    return body.eval().requires_grad_(False)


SPECS: tuple[FusionSpec, ...] = (
    FusionSpec(
        name="wemoe",
        category="dynamic",
        config=WEMoEConfig,
        run=run,
        data=DATA,
        paper="https://arxiv.org/abs/2402.00433",
        doc="Weight-ensembling MoE: MLPs mixed per sample by routers trained on test-time entropy",
    ),
    FusionSpec(
        name="e_wemoe",
        category="dynamic",
        config=EWEMoEConfig,
        run=run,
        data=DATA,
        paper="https://arxiv.org/abs/2410.21804",
        doc="Efficient WEMoE: pruned MLP task vectors and one router shared by all MLPs",
    ),
)

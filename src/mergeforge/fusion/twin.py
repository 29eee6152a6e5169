"""Twin-Merging: a shared merged expert plus compressed exclusive knowledge, mixed per input.

Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging",
arXiv 2406.15479 (official code: github.com/LZY-the-boys/Twin-Merging). FusionBench 0.2.33 has
no implementation.

    θ* = Merge(θ_1 … θ_T)            shared expert: task arithmetic θ0 + λ Σ_t τ_t (λ 0.3), or TIES
    v_t = θ_t − θ*                    exclusive ("twin") vector of task t
    v_t ≈ U_r diag(s_r) V_rᵀ          per 2-D tensor, r = ⌊(1 − mask_rate)·min(m, n)⌋; others kept
    w(x) = softmax(router(h(x)))      h(x) = θ*'s last hidden state, mean over real tokens
    θ(x) = θ* + Σ_t w_t(x) v_t        the body runs with θ(x) for input x

The router (``Linear(d, 2d)–BN–LeakyReLU–Dropout–Linear(2d, 2d)–BN–LeakyReLU–Dropout–
Linear(2d, T)``, as the official code) is trained with cross-entropy to predict which task an
input came from: only the tasks' inputs and their task identity are used, never class labels.
θ(x) is applied as per-sample corrections of θ*'s module outputs (``fusion.twin_apply``), or, for
modules those do not cover, by running each distinct routing weight's samples alone.
Deviations from the official code: no held-out split and best-validation checkpoint (the router
trains a fixed number of epochs, and the result reports its routing-set accuracy); a rank-r
factorisation that would not be smaller than the dense tensor is stored dense.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mergeforge.errors import FusionError
from mergeforge.fusion import twin_apply
from mergeforge.fusion.data import Batch, FusionProblem, StateDict, mean_hidden, to_device
from mergeforge.fusion.losses import Progress, check_finite
from mergeforge.fusion.results import DynamicResult
from mergeforge.fusion.spec import FusionSpec
from mergeforge.methods.task_arithmetic import task_arithmetic
from mergeforge.methods.ties import ties

PAPER = "https://arxiv.org/abs/2406.15479"
DATA = "routing set: inputs of every task with their task identity"


@dataclass(frozen=True)
class TwinConfig:
    """Twin-Merging's parameters.

    shared: the shared expert's merge, ``task_arithmetic`` or ``ties`` (mergeforge's per-tensor
        functions: TIES trims per tensor, elects signs by sum, disjoint mean).
    shared_lambda: λ of the shared merge (0.3; the official RoBERTa scripts use 0.29; use ≈ 1
        for ``ties``, a disjoint mean).
    ties_density: fraction of each task vector TIES keeps (0 < density ≤ 1), for ``ties`` only.
    mask_rate: fraction of each 2-D twin vector's rank dropped (0 ≤ mask_rate ≤ 1; 0 keeps it
        exactly, 1 drops 2-D twin vectors).
    epochs, lr, batch_size: router training (Adam, cross-entropy on task identity); batch ≥ 2
        (batch norm).
    dropout: the router's dropout probability (0 ≤ p < 1).
    seed: seeds the router's initialisation, dropout and shuffling.
    """

    shared: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    shared_lambda: float = 0.3
    ties_density: float = 0.2
    mask_rate: float = 0.9
    epochs: int = 50
    lr: float = 5e-4
    batch_size: int = 32
    dropout: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("shared", self.shared in ("task_arithmetic", "ties"), "task_arithmetic or ties"),
            ("shared_lambda", math.isfinite(self.shared_lambda), "a finite number"),
            ("ties_density", 0 < self.ties_density <= 1, "0 < density ≤ 1"),
            ("mask_rate", 0 <= self.mask_rate <= 1, "0 ≤ mask_rate ≤ 1"),
            ("epochs", self.epochs >= 1, "≥ 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "> 0"),
            ("batch_size", self.batch_size >= 2, "≥ 2 (the router uses batch norm)"),
            ("dropout", 0 <= self.dropout < 1, "0 ≤ dropout < 1"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise FusionError(
                    f"twin_merging: {name} {getattr(self, name)!r} is out of range; allowed: "
                    f"{allowed}"
                )


def make_router(hidden: int, tasks: int, dropout: float) -> nn.Sequential:
    """The official router MLP: d → 2d → 2d → T with batch norm, LeakyReLU and dropout."""
    width = 2 * hidden
    return nn.Sequential(
        nn.Linear(hidden, width), nn.BatchNorm1d(width), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(width, tasks),
    )  # fmt: skip


def _key(name: str) -> str:
    return name.replace(".", "__")


class TwinModule(nn.Module):
    """The body with θ*, the router, and per fused tensor its twin vectors: buffer ``twin.<key>``
    ``(T, *shape)`` (dense) or ``twin.<key>__a (T, m, r)`` and ``twin.<key>__b (T, r, n)``
    (factored: v_t = a_t b_t). ``layout`` is ``{name: rank}`` (−1: dense). Called like the body;
    returns the body's outputs with each sample's θ(x)."""

    def __init__(self, body: nn.Module, router: nn.Module, layout: Mapping[str, int], tasks: int):
        super().__init__()
        self.body, self.router, self.layout = body, router, dict(layout)
        self.twin = nn.Module()
        for name, rank in self.layout.items():
            p = body.get_parameter(name)
            like = {"dtype": p.dtype, "device": p.device}
            if rank < 0:
                self.twin.register_buffer(_key(name), torch.zeros(tasks, *p.shape, **like))
            else:
                m, n = p.shape
                self.twin.register_buffer(_key(name) + "__a", torch.zeros(tasks, m, rank, **like))
                self.twin.register_buffer(_key(name) + "__b", torch.zeros(tasks, rank, n, **like))

    def twin_vector(self, name: str, w: Tensor) -> Tensor:
        """Σ_t w_t v_t of tensor ``name`` for routing weights ``w (T,)``."""
        if self.layout[name] < 0:
            v = getattr(self.twin, _key(name))  # (T, *shape)
            return torch.tensordot(w.to(v.dtype), v, dims=1)
        a = getattr(self.twin, _key(name) + "__a")  # (T, m, r)
        b = getattr(self.twin, _key(name) + "__b")  # (T, r, n)
        wa = (a * w.to(a.dtype)[:, None, None]).permute(1, 0, 2).flatten(1)  # (m, T·r)
        return wa @ b.flatten(0, 1)  # (m, n)

    def twin_tensors(self) -> dict[str, twin_apply.ModuleTwins]:
        """``{module path: {attribute: [dense] or [a, b]}}`` of every tensor's twin vectors."""
        named = {}
        for name, rank in self.layout.items():
            keys = [_key(name)] if rank < 0 else [_key(name) + "__a", _key(name) + "__b"]
            named[name] = [getattr(self.twin, k) for k in keys]
        return twin_apply.owners(named)

    def params_for(self, w: Tensor) -> StateDict:
        """θ(x) = θ* + Σ_t w_t v_t for every tensor with twin vectors."""
        return {n: self.body.get_parameter(n) + self.twin_vector(n, w) for n in self.layout}

    @torch.no_grad()
    def route(self, batch: Batch) -> Tensor:
        """``w (N, T)``: softmax of the router on θ*'s mean-pooled last hidden states."""
        return torch.softmax(self.router(mean_hidden(self.body(**batch), batch)), dim=-1)

    def forward(self, **batch: Tensor) -> Any:
        """The body's outputs with θ(x) per sample: θ*'s modules plus per-sample corrections
        (``fusion.twin_apply``) where the body allows, else one call per distinct ``w``."""
        w = self.route(batch)  # (N, T)
        twins = self.twin_tensors()
        if twin_apply.supports(self.body, twins):
            try:
                with twin_apply.hooked(self.body, twins, w):
                    return self.body(**batch)
            except twin_apply.NotBatchFirst:
                pass
        return self.materialised(batch, w)

    def materialised(self, batch: Batch, w: Tensor) -> Any:
        """The outputs with θ(x) synthesised for each distinct row of ``w (N, T)`` and the body
        run on those samples alone (the reference the corrections are tested against)."""
        groups, inverse = torch.unique(w, dim=0, return_inverse=True)  # (G, T), (N,)
        parts = []
        for g in range(groups.shape[0]):
            idx = torch.nonzero(inverse == g).squeeze(1)  # (n_g,)
            sub = {k: v[idx] for k, v in batch.items()}
            parts.append((idx, functional_call(self.body, self.params_for(groups[g]), (), sub)))
        if len(parts) == 1:
            return parts[0][1]
        return _reassemble(parts, w.shape[0])


def _reassemble(parts: list[tuple[Tensor, Any]], n: int) -> Any:
    """The outputs of sub-batches (``(indices, outputs)``) put back in batch order: tensors with
    one row per sample are scattered, containers recursed into."""
    first = parts[0][1]
    if first is None:
        return None
    if isinstance(first, Tensor):
        if not all(o.dim() and o.shape[0] == i.numel() for i, o in parts):
            raise FusionError("twin_merging: a body output has no per-sample first dimension")
        out = first.new_empty((n, *first.shape[1:]))
        for i, o in parts:
            out[i] = o
        return out
    if isinstance(first, Mapping):
        return type(first)(**{k: _reassemble([(i, o[k]) for i, o in parts], n) for k in first})
    if isinstance(first, (tuple, list)):
        items = [_reassemble([(i, o[j]) for i, o in parts], n) for j in range(len(first))]
        return type(first)(items)
    raise FusionError(
        f"twin_merging: cannot put body outputs of type {type(first).__name__} back together "
        "after routing samples separately"
    )


def shared_expert(problem: FusionProblem, config: TwinConfig) -> StateDict:
    """θ* per fused tensor, by ``mergeforge.methods`` task arithmetic or TIES (fp32, cast back)."""
    t = problem.num_tasks
    out = {}
    for n in problem.names:
        xs, b = [e[n].float() for e in problem.experts], problem.base[n].float()
        lam = {"lambda": config.shared_lambda}
        if config.shared == "ties":
            merged = ties(xs, b, weight=[1.0] * t, density=[config.ties_density] * t, **lam)
        else:
            merged = task_arithmetic(xs, b, weight=[1.0] * t, **lam)
        out[n] = merged.to(problem.base[n].dtype)
    return out


def compress(v: Tensor, mask_rate: float) -> tuple[int, list[Tensor]]:
    """``(rank, tensors)`` storing twin vectors ``v (T, *shape)``: a 2-D tensor keeps rank
    r = ⌊(1 − mask_rate)·min(m, n)⌋ by truncated SVD as ``[a (T, m, r), b (T, r, n)]``; ``(−1,
    [v])`` dense when the tensor is not 2-D, r = min(m, n) (exact), or the factors are not
    smaller; ``(0, [])`` when r = 0 (nothing kept)."""
    if v.dim() != 3:
        return -1, [v]
    m, n = v.shape[1:]
    p = min(m, n)
    r = math.floor((1 - mask_rate) * p + 1e-9)  # 1e-9: (1 − 0.9)·10 is 0.99999… in floats
    if r >= p:
        return -1, [v]
    if r == 0:
        return 0, []
    u, s, vh = torch.linalg.svd(v.float(), full_matrices=False)  # (T, m, p), (T, p), (T, p, n)
    a = (u[..., :r] * s[:, None, :r]).to(v.dtype)  # (T, m, r)
    b = vh[:, :r].to(v.dtype)  # (T, r, n)
    if r * (m + n) >= m * n:
        return -1, [a @ b]
    return r, [a, b]


def routing_set(
    problem: FusionProblem, body: nn.Module, device: str | torch.device
) -> tuple[Tensor, Tensor]:
    """``(features (M, d), task ids (M,))``: θ*'s mean-pooled last hidden states of every task's
    labelled inputs (else its unlabeled ones), labelled with the task's index."""
    feats, ids = [], []
    with torch.no_grad():
        for t, task in enumerate(problem.tasks):
            batches = [b for b, _ in task.labelled] or list(task.unlabeled)
            for batch in batches:
                b = to_device(batch, device)
                h = mean_hidden(body(**b), b).float()  # (N, d)
                feats.append(h)
                ids.append(torch.full((h.shape[0],), t, dtype=torch.long, device=h.device))
    return torch.cat(feats), torch.cat(ids)


def train_router(
    x: Tensor, y: Tensor, tasks: int, config: TwinConfig, progress: Progress | None
) -> tuple[nn.Sequential, list[float]]:
    """The router trained by Adam on cross-entropy(router(x), y); the mean loss per epoch.
    Seeded without touching the global RNG (``fork_rng``)."""
    devices = []
    if x.device.type == "cuda":
        devices = [torch.cuda.current_device() if x.device.index is None else x.device.index]
    history: list[float] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        router = make_router(x.shape[1], tasks, config.dropout).to(x.device).train()
        opt = torch.optim.Adam(router.parameters(), lr=config.lr)
        order = torch.Generator().manual_seed(config.seed)
        step = 0
        for epoch in range(config.epochs):
            perm = torch.randperm(x.shape[0], generator=order).to(x.device)  # (M,)
            losses = []
            for start in range(0, x.shape[0], config.batch_size):
                idx = perm[start : start + config.batch_size]
                if idx.numel() < 2:  # batch norm cannot train on one sample
                    continue
                loss = F.cross_entropy(router(x[idx]), y[idx])
                step += 1
                losses.append(check_finite(loss.detach(), step, "twin_merging", "lr"))
                opt.zero_grad()
                loss.backward()
                opt.step()
            history.append(sum(losses) / len(losses))
            if progress is not None:
                progress(epoch + 1, config.epochs, history[-1])
    return router.eval(), history


def run(
    problem: FusionProblem,
    config: TwinConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> DynamicResult:
    """Twin-Merging of ``problem`` (module docstring); ``progress`` after each router epoch."""
    for task in problem.tasks:
        if not task.labelled and not task.unlabeled:
            task.require("labelled", "twin_merging (its router learns which task an input is from)")
    shared = shared_expert(problem, config)
    body = copy.deepcopy(problem.body).to(device).eval()
    body.load_state_dict(shared, strict=False)
    stored = {}
    for n in problem.names:
        v = torch.stack([e[n].to(device) - shared[n].to(device) for e in problem.experts])  # (T, …)
        rank, tensors = compress(v, config.mask_rate)
        if rank != 0:
            stored[n] = (rank, tensors)
    x, y = routing_set(problem, body, device)
    if x.shape[0] < 2:
        raise FusionError("twin_merging: the routing set has fewer than 2 inputs; give more")
    router, history = train_router(x, y, problem.num_tasks, config, progress)
    layout = {n: rank for n, (rank, _) in stored.items()}
    module = TwinModule(body, router, layout, problem.num_tasks).eval()
    with torch.no_grad():
        for n, (rank, tensors) in stored.items():
            keys = [_key(n)] if rank < 0 else [_key(n) + "__a", _key(n) + "__b"]
            for key, t in zip(keys, tensors, strict=True):
                getattr(module.twin, key).copy_(t)
        accuracy = float((router(x).argmax(dim=1) == y).float().mean())
    description = {
        "algorithm": "twin_merging",
        "config": asdict(config),
        "tasks": [t.name for t in problem.tasks],
        "hidden_size": int(x.shape[1]),
        "layout": layout,
    }
    info = {
        "data": DATA,
        "routing_inputs": int(x.shape[0]),
        "router_accuracy": accuracy,
        "twin_parameters": sum(b.numel() for b in module.twin.buffers()),
        "body_parameters": sum(p.numel() for p in body.parameters()),
    }
    return DynamicResult(
        "twin_merging", module, module.state_dict(), description,
        "mergeforge.fusion.twin.rebuild", tuple(history), info,
    )  # fmt: skip


def rebuild(
    body: nn.Module, description: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> nn.Module:
    """The Twin-Merging model of ``description`` on ``body`` (a fresh body of the base
    architecture): router and empty twin buffers of the saved layout, every tensor loaded
    strictly (θ* included)."""
    tasks = len(description["tasks"])
    cfg = description["config"]
    router = make_router(description["hidden_size"], tasks, cfg["dropout"])
    router.to(next(body.parameters()).device)
    module = TwinModule(body, router, description["layout"], tasks)
    module.load_state_dict(dict(tensors), strict=True)
    return module.eval()


SPECS: tuple[FusionSpec, ...] = (
    FusionSpec(
        name="twin_merging",
        category="dynamic",
        config=TwinConfig,
        run=run,
        data=DATA,
        paper=PAPER,
        doc="shared merged expert plus per-task SVD-compressed twin vectors, mixed per input by "
        "a router trained on task identity",
    ),
)

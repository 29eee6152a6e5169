"""SMILE: zero-shot sparse mixture of low-rank experts, one MoE linear per fine-tuned ``nn.Linear``.

Tang et al. 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
Pre-Trained Foundation Models", arXiv 2408.10174; reference code FusionBench 0.2.33
``fusion_bench/models/smile_moe/linear_from_module.py`` (``SmileMoELinear``, ``SmileGate``).

For every selected ``nn.Linear`` (``W0 (out, in)``, ``b0``) and experts ``W_t``, ``b_t``::

    ΔW_t = W_t − W0 = U_t diag(s_t) V_tᵀ            (thin SVD, fp32)
    expert t:  E_t(x) = U_t[:, :k] (diag(s_t[:k]) V_t[:, :k]ᵀ x) + Δb_t     (k = −1: ΔW_t x + Δb_t)
    router:    r_t(x) = ‖V_t[:, :gate_k]ᵀ x‖₂         (routing_use_diff false: SVD of W_t instead)
    p(x) = softmax(r(x)),  S = top_k of p,  w_t = p_t / Σ_{s∈S} p_s
    y = W0 x + b0 + Σ_{t∈S} w_t E_t(x)                 (per token)

With one expert the router is skipped (w = 1), so full rank reproduces the fine-tuned layer.
A layer whose ΔW_t are all exactly zero stays a plain ``nn.Linear``. Every other fused tensor is
θ0, or the experts' mean with ``average_experts``. Ranks are capped at ``min(out, in)``: the
singular vectors with a singular value (FusionBench's full-matrix SVD lets ``gate_k`` reach
``in``, using null-space vectors that LAPACK picks arbitrarily). No data and no training.

Extra parameters per upscaled layer: ``T·(k·(out + in) + gate_k·in)`` (``T·out·in`` for
``k = −1``) plus ``T·out`` for the bias deltas.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergeforge.errors import FusionError
from mergeforge.fusion.data import FusionProblem, StateDict
from mergeforge.fusion.losses import Progress
from mergeforge.fusion.results import DynamicResult
from mergeforge.fusion.spec import FusionSpec

PAPER = "https://arxiv.org/abs/2408.10174"


@dataclass(frozen=True)
class SmileConfig:
    """SMILE's parameters (defaults: FusionBench's ``smile_upscaling`` YAML).

    gate_k: singular vectors per expert in the router (≥ 1; capped at ``min(out, in)``).
    k: rank of each expert's low-rank ΔW (≥ 1, capped at ``min(out, in)``); −1 keeps the full ΔW.
    top_k: experts mixed per token (1 ≤ top_k ≤ number of tasks).
    routing_use_diff: route with the SVD of ΔW_t (true) or of the fine-tuned W_t (false).
    average_experts: the tensors that are not upscaled are the experts' mean (else θ0).
    include: regex searched in each ``nn.Linear``'s dotted name; empty selects every ``nn.Linear``
        whose weight is fused.
    exclude: regex of ``nn.Linear`` names left out (default: a causal LM's ``lm_head``, as
        FusionBench's LLM upscaling leaves it).
    """

    gate_k: int = 1
    k: int = 128
    top_k: int = 1
    routing_use_diff: bool = True
    average_experts: bool = False
    include: str = ""
    exclude: str = r"(^|\.)lm_head$"

    def __post_init__(self) -> None:
        if self.gate_k < 1:
            raise FusionError(f"smile: gate_k must be ≥ 1 (router rank), got {self.gate_k}")
        if self.k == 0 or self.k < -1:
            raise FusionError(f"smile: k must be ≥ 1 or −1 (full ΔW), got {self.k}")
        if self.top_k < 1:
            raise FusionError(f"smile: top_k must be ≥ 1 (experts per token), got {self.top_k}")
        for field_name in ("include", "exclude"):
            try:
                re.compile(getattr(self, field_name))
            except re.error as exc:
                raise FusionError(
                    f"smile: {field_name} {getattr(self, field_name)!r} is not a valid regular "
                    f"expression ({exc})"
                ) from None


class SmileLinear(nn.Module):
    """The MoE linear of the module docstring. Tensors: ``base`` (the ``nn.Linear`` W0, b0),
    ``gate (T·gate_rank, in)``, ``u (T, out, rank)`` and ``svh (T, rank, in)`` (or ``delta
    (T, out, in)`` when ``rank`` is −1) and ``bias_delta (T, out)`` when the bias is fused.
    Built empty here; ``upscale_linear`` fills it, ``load_state_dict`` refills it."""

    def __init__(
        self, base: nn.Linear, num_experts: int, rank: int, gate_rank: int, top_k: int,
        bias_delta: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        out_f, in_f = base.out_features, base.in_features
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.base = base
        self.num_experts, self.rank = num_experts, rank
        self.gate_rank, self.top_k = gate_rank, top_k
        self.gate = nn.Parameter(torch.empty(num_experts * gate_rank, in_f, **like))
        if rank < 0:
            self.delta = nn.Parameter(torch.empty(num_experts, out_f, in_f, **like))
        else:
            self.u = nn.Parameter(torch.empty(num_experts, out_f, rank, **like))
            self.svh = nn.Parameter(torch.empty(num_experts, rank, in_f, **like))
        self.bias_delta = (
            nn.Parameter(torch.empty(num_experts, out_f, **like)) if bias_delta else None
        )

    @property
    def weight(self) -> Tensor:
        """W0, so code that reads ``layer.weight.dtype`` / ``.device`` still works."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def routing(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights (n, top_k), experts (n, top_k))`` for tokens ``h (n, in)``."""
        n = h.shape[0]
        if self.num_experts == 1:
            return h.new_ones(n, 1), torch.zeros(n, 1, dtype=torch.long, device=h.device)
        logits = F.linear(h, self.gate).view(n, self.num_experts, self.gate_rank)  # (n, T, g)
        probs = torch.softmax(logits.norm(p=2, dim=2), dim=1)  # (n, T)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (n, top_k)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def expert(self, t: int, h: Tensor) -> Tensor:
        """``E_t(h) (n, out)`` for tokens ``h (n, in)``."""
        db = None if self.bias_delta is None else self.bias_delta[t]
        if self.rank < 0:
            return F.linear(h, self.delta[t], db)
        return F.linear(F.linear(h, self.svh[t]), self.u[t], db)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        h = x.reshape(-1, self.base.in_features)  # (n, in)
        weights, experts = self.routing(h)  # (n, top_k)
        in_f, out_f = self.base.in_features, self.base.out_features
        if 0 < self.num_experts * self.rank * (in_f + out_f) <= 2 * in_f * out_f:
            mixed = self._mix_low_rank(h, weights, experts)  # at most twice the cost of W0 x
        else:
            mixed = self._mix_selected(h, weights, experts)
        return y + mixed.to(y.dtype).view(*x.shape[:-1], -1)

    def _mix_low_rank(self, h: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Σ_t w_t E_t(h) as two dense products over all T·k expert directions, with w_t = 0
        for unselected experts: no gather/scatter; used while T·k·(in + out) ≤ 2·in·out, i.e. at
        most twice the cost of the base layer."""
        n, t, k = h.shape[0], self.num_experts, self.rank
        gates = torch.zeros(n, t, dtype=h.dtype, device=h.device)
        gates.scatter_(1, experts, weights)  # (n, T): w_t, 0 off the top_k
        z = F.linear(h, self.svh.flatten(0, 1)).view(n, t, k)  # (n, T, k)
        out = torch.einsum("ntk,tok->no", z * gates[:, :, None], self.u)  # (n, out)
        return out if self.bias_delta is None else out + gates @ self.bias_delta

    def _mix_selected(self, h: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Σ_t w_t E_t(h) computing each expert only on the tokens routed to it."""
        mixed = h.new_zeros(h.shape[0], self.base.out_features)  # (n, out)
        for t in range(self.num_experts):
            rows, slot = torch.where(experts == t)  # (m,)
            if rows.numel():
                out = self.expert(t, h[rows]) * weights[rows, slot, None]  # (m, out)
                mixed.index_add_(0, rows, out)
        return mixed

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, rank={self.rank}, gate_rank={self.gate_rank}, "
            f"top_k={self.top_k}"
        )


def _svd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in fp32: ``(U (out, p), s (p,), Vh (p, in))``, p = min(out, in)."""
    return torch.linalg.svd(w.float(), full_matrices=False)


@torch.no_grad()
def upscale_linear(
    linear: nn.Linear, w0: Tensor, b0: Tensor | None, weights: list[Tensor],
    biases: list[Tensor] | None, config: SmileConfig,
) -> SmileLinear | None:  # fmt: skip
    """The ``SmileLinear`` around ``linear`` (set to W0 = ``w0`` and, when the bias is fused,
    b0 = ``b0``) for the experts' ``weights`` (and fused ``biases``); ``None``, with ``linear``
    untouched, when every ΔW_t is exactly zero."""
    deltas = [
        w.to(linear.weight.device).float() - w0.to(linear.weight.device).float() for w in weights
    ]  # T × (out, in)
    if not any(bool(d.any()) for d in deltas):
        return None
    linear.weight.copy_(w0)
    if b0 is not None and linear.bias is not None:
        linear.bias.copy_(b0)
    p = min(w0.shape)
    rank = -1 if config.k < 0 else min(config.k, p)
    gate_rank = min(config.gate_k, p)
    layer = SmileLinear(linear, len(deltas), rank, gate_rank, config.top_k, biases is not None)
    gates, us, svhs = [], [], []
    for t, d in enumerate(deltas):
        u, s, vh = _svd(d)  # (out, p), (p,), (p, in)
        gate_vh = vh if config.routing_use_diff else _svd(weights[t].to(d.device))[2]
        gates.append(gate_vh[:gate_rank])  # (g, in)
        if rank > 0:
            us.append(u[:, :rank])  # (out, k)
            svhs.append(s[:rank, None] * vh[:rank])  # (k, in)
    layer.gate.copy_(torch.cat(gates))  # (T·g, in)
    if rank < 0:
        layer.delta.copy_(torch.stack(deltas))  # (T, out, in)
    else:
        layer.u.copy_(torch.stack(us))  # (T, out, k)
        layer.svh.copy_(torch.stack(svhs))  # (T, k, in)
    if biases is not None and layer.bias_delta is not None and linear.bias is not None:
        b = linear.bias.float()  # (out,)
        layer.bias_delta.copy_(torch.stack([e.to(b.device).float() - b for e in biases]))
    return layer


def select_linears(body: nn.Module, names: tuple[str, ...], config: SmileConfig) -> list[str]:
    """Dotted names of the ``nn.Linear`` submodules to upscale: weight fused, ``include``
    matches (or is empty), ``exclude`` does not."""
    fused = set(names)
    include = re.compile(config.include) if config.include else None
    exclude = re.compile(config.exclude) if config.exclude else None
    return [
        name
        for name, m in body.named_modules()
        if isinstance(m, nn.Linear)
        and name
        and f"{name}.weight" in fused
        and (include is None or include.search(name))
        and not (exclude is not None and exclude.search(name))
    ]


def _start_state(problem: FusionProblem, average: bool) -> StateDict:
    """θ0 for every fused tensor, or the experts' mean where ``average``."""
    if not average:
        return {n: problem.base[n] for n in problem.names}
    return {
        n: torch.stack([e[n].float() for e in problem.experts]).mean(0).to(problem.base[n].dtype)
        for n in problem.names
    }


def run(
    problem: FusionProblem,
    config: SmileConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> DynamicResult:
    """Upscale a copy of ``problem.body`` (see the module docstring); ``progress(i, n, 0.0)``
    after each linear layer (no loss: SMILE does not train)."""
    if config.top_k > problem.num_tasks:
        raise FusionError(
            f"smile: top_k {config.top_k} is more than the {problem.num_tasks} experts; use "
            f"1 ≤ top_k ≤ {problem.num_tasks}"
        )
    targets = select_linears(problem.body, problem.names, config)
    if not targets:
        raise FusionError(
            "smile: no nn.Linear of the body has a fused weight matching include "
            f"{config.include!r} and not exclude {config.exclude!r}; nothing to upscale"
        )
    module = copy.deepcopy(problem.body).to(device).eval()
    module.load_state_dict(_start_state(problem, config.average_experts), strict=False)
    body_params = sum(p.numel() for p in module.parameters())
    replaced: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(targets):
        weight, bias = f"{name}.weight", f"{name}.bias"
        fused_bias = bias in problem.names  # then the MoE adds Δb_t to b0 = θ0's bias
        layer = upscale_linear(
            module.get_submodule(name), problem.base[weight],
            problem.base[bias] if fused_bias else None, [e[weight] for e in problem.experts],
            [e[bias] for e in problem.experts] if fused_bias else None, config,
        )  # fmt: skip
        if layer is not None:
            module.set_submodule(name, layer)
            replaced[name] = _layer_description(layer)
        if progress is not None:
            progress(i + 1, len(targets), 0.0)
    extra = sum(p.numel() for p in module.parameters()) - body_params
    description = {
        "algorithm": "smile",
        "config": asdict(config),
        "tasks": [t.name for t in problem.tasks],
        "modules": replaced,
    }
    info = {
        "data": "none (zero-shot)",
        "upscaled": len(replaced),
        "left_plain": [n for n in targets if n not in replaced],
        "body_parameters": body_params,
        "extra_parameters": extra,
    }
    return DynamicResult(
        "smile", module, module.state_dict(), description, "mergeforge.fusion.smile.rebuild",
        info=info,
    )  # fmt: skip


def _layer_description(layer: SmileLinear) -> dict[str, Any]:
    return {
        "experts": layer.num_experts,
        "rank": layer.rank,
        "gate_rank": layer.gate_rank,
        "top_k": layer.top_k,
        "bias_delta": layer.bias_delta is not None,
    }


def rebuild(
    body: nn.Module, description: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> nn.Module:
    """The SMILE model of ``description`` on ``body`` (a fresh body of the base architecture):
    the same ``nn.Linear`` modules replaced by empty ``SmileLinear`` layers, then every tensor
    loaded strictly, so outputs equal the saved model's bit for bit."""
    for name, d in description["modules"].items():
        linear = body.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise FusionError(
                f"smile: the body has no nn.Linear {name!r} to rebuild; it is not of the "
                "architecture the SMILE model was made from"
            )
        layer = SmileLinear(
            linear, d["experts"], d["rank"], d["gate_rank"], d["top_k"], d["bias_delta"]
        )
        body.set_submodule(name, layer)
    body.load_state_dict(dict(tensors), strict=True)
    return body.eval()


def extra_parameters(
    in_f: int, out_f: int, experts: int, rank: int, gate_rank: int, bias: bool
) -> int:
    """Parameters a ``SmileLinear`` adds to the ``nn.Linear`` it replaces (module docstring)."""
    per_expert = out_f * in_f if rank < 0 else rank * (out_f + in_f)
    return experts * (per_expert + gate_rank * in_f + (out_f if bias else 0))


SPECS: tuple[FusionSpec, ...] = (
    FusionSpec(
        name="smile",
        category="dynamic",
        config=SmileConfig,
        run=run,
        data="none (zero-shot)",
        paper=PAPER,
        doc="every fine-tuned nn.Linear becomes a sparse MoE of low-rank SVD experts with an "
        "SVD router (training-free)",
    ),
)

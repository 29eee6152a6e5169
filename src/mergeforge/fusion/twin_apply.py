"""Twin-Merging's per-input weights applied as per-sample corrections, never materialised.

θ(x) = θ* + Σ_t w_t(x) v_t differs per input, so the plain way runs every sample alone with its
own weights — T·r·m·n FLOPs to synthesise each r-rank m×n tensor, per sample, more than the
forward pass itself. Every body module whose twin tensors are a ``Linear``'s, an ``Embedding``'s
or a ``LayerNorm``'s instead keeps θ* and adds the correction of its output, per sample n:

    Linear     y_n = x_n W*ᵀ + b* + Σ_t w_nt ((x_n b_tᵀ) a_tᵀ + β_t)    v_t = a_t b_t (factored)
                                 … + x_n (Σ_t w_nt V_t)ᵀ                  (dense V_t)
    Embedding  e_n = E*[i_n] + Σ_t w_nt a_t[i_n] b_t                     (or V_t[i_n])
    LayerNorm  y_n = ν(x_n) ⊙ (γ* + Σ_t w_nt g_t) + (β* + Σ_t w_nt h_t)   ν: normalisation

which is θ(x) exactly (up to float rounding) at about twice the forward's cost for a whole batch
at once. The hooks live only for one call (``hooked``). The caller falls back to the plain way
when :func:`supports` is false or a hooked module's input does not have the batch as its first
dimension (:class:`NotBatchFirst`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Twin tensors of a module, by attribute: ("weight" | "bias") -> [dense] or [a, b] (factored).
ModuleTwins = dict[str, list[Tensor]]
Hook = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]


def owners(names: Mapping[str, list[Tensor]]) -> dict[str, ModuleTwins]:
    """``{module path: {attribute: tensors}}`` of the twin tensors named ``path.attribute``."""
    out: dict[str, ModuleTwins] = {}
    for name, tensors in names.items():
        path, _, attr = name.rpartition(".")
        out.setdefault(path, {})[attr] = tensors
    return out


def supports(body: nn.Module, twins: Mapping[str, ModuleTwins]) -> bool:
    """True when every module with twin tensors is one the hooks handle: a ``Linear``, an
    ``Embedding`` without ``max_norm``, or a ``LayerNorm`` over the last dimension, with twin
    tensors only for its ``weight`` and ``bias``."""
    for path, attrs in twins.items():
        module = body.get_submodule(path)
        if not set(attrs) <= {"weight", "bias"}:
            return False
        if isinstance(module, nn.Embedding):
            ok = module.max_norm is None and set(attrs) == {"weight"}
        elif isinstance(module, nn.LayerNorm):
            ok = len(module.normalized_shape) == 1 and module.elementwise_affine
        else:
            ok = type(module) is nn.Linear
        if not ok:
            return False
    return True


def _mix(w: Tensor, v: Tensor) -> Tensor:
    """Σ_t w_nt v_t for every sample: ``w (N, T)``, ``v (T, *shape)`` → ``(N, *shape)``."""
    return torch.tensordot(w.to(v.dtype), v, dims=1)


class NotBatchFirst(Exception):
    """A hooked module saw an input whose first dimension is not the batch's: the caller must
    fall back to materialising θ(x) per sample."""


def _batch_first(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """``x`` with the batch as its first dimension: as is, or expanded from a first dimension of
    1 that broadcasts over the batch (BERT's ``position_ids (1, L)``); else ``NotBatchFirst``."""
    n = w.shape[0]
    if x.dim() >= 2 and x.shape[0] == 1 and n > 1:
        return x.expand(n, *x.shape[1:])
    if x.dim() < 2 or x.shape[0] != n:
        raise NotBatchFirst(f"{type(module).__name__} input {tuple(x.shape)}, batch {n}")
    return x


def _linear_hook(twins: ModuleTwins, w: Tensor) -> Hook:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        n = w.shape[0]
        x = _batch_first(module, inputs[0], w).reshape(n, -1, inputs[0].shape[-1])  # (N, L, in)
        out = out.expand(n, *out.shape[1:])
        delta = out.new_zeros((n, x.shape[1], out.shape[-1]))  # (N, L, out)
        weight = twins.get("weight", [])
        if len(weight) == 2:
            a, b = weight  # (T, m, r), (T, r, in)
            rank = b.shape[1]
            z = x @ b.flatten(0, 1).T  # (N, L, T·r)
            z = z * w.to(z.dtype).repeat_interleave(rank, dim=1)[:, None, :]
            delta = delta + z @ a.permute(0, 2, 1).flatten(0, 1)  # (N, L, m)
        elif weight:
            delta = delta + x @ _mix(w, weight[0]).transpose(1, 2)  # (N, L, m)
        if "bias" in twins:
            delta = delta + _mix(w, twins["bias"][0])[:, None, :]  # (N, 1, m)
        return out + delta.reshape(out.shape)

    return hook


def _embedding_hook(twins: ModuleTwins, w: Tensor) -> Hook:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        n = w.shape[0]
        ids = _batch_first(module, inputs[0], w).reshape(n, -1)  # (N, L)
        out = out.expand(n, *out.shape[1:])
        weight = twins["weight"]
        if len(weight) == 2:
            a, b = weight  # (T, V, r), (T, r, d)
            delta = torch.einsum("tnlr,nt,trd->nld", a[:, ids], w.to(a.dtype), b)
        else:
            delta = torch.einsum("tnld,nt->nld", weight[0][:, ids], w.to(weight[0].dtype))
        return out + delta.reshape(out.shape)

    return hook


def _layer_norm_hook(twins: ModuleTwins, w: Tensor) -> Hook:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        assert isinstance(module, nn.LayerNorm)
        n, x = w.shape[0], _batch_first(module, inputs[0], w)
        d = x.shape[-1]
        gamma = module.weight.expand(n, d)  # (N, d)
        if "weight" in twins:
            gamma = gamma + _mix(w, twins["weight"][0])
        beta = module.bias.expand(n, d) if module.bias is not None else torch.zeros_like(gamma)
        if "bias" in twins:
            beta = beta + _mix(w, twins["bias"][0])  # (N, d)
        shape = (n,) + (1,) * (x.dim() - 2) + (d,)
        norm = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return norm * gamma.reshape(shape) + beta.reshape(shape)

    return hook


def _hook_for(module: nn.Module, twins: ModuleTwins, w: Tensor) -> Hook:
    if isinstance(module, nn.Embedding):
        return _embedding_hook(twins, w)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm_hook(twins, w)
    return _linear_hook(twins, w)


@contextmanager
def hooked(body: nn.Module, twins: Mapping[str, ModuleTwins], w: Tensor) -> Iterator[None]:
    """Within the block, ``body`` computes θ(x_n) for sample n with routing weights ``w (N, T)``
    (the module docstring); the hooks are removed on leaving, also after an error."""
    handles = []
    try:
        for path, attrs in twins.items():
            module = body.get_submodule(path)
            handles.append(module.register_forward_hook(_hook_for(module, attrs, w)))
        yield
    finally:
        for h in handles:
            h.remove()

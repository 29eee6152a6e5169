"""The modules of a weight-ensembling MoE (WEMoE, Tang et al. 2024, arXiv 2402.00433; E-WEMoE,
arXiv 2410.21804): routers, the routed linear layer, and how they are put into a body.

Every MLP of the body (found by :data:`MLP_PATTERNS`) becomes a *group* of :class:`WEMoELinear`
layers that share one routing vector per input sample:

    r(x) = mean over tokens of router(h_token)      (T,) per sample; no softmax
    W(x) = W0 + Σ_t r_t(x) τ_t,   b(x) = b0 + Σ_t r_t(x) τ_t^b       for every Linear of the MLP

``h`` is the MLP's input: the input of the group's first Linear (its *entry*), which computes r
and leaves it in the :class:`WEMoEHub` for the group's other Linears. The hub sits on the body's
root module; a forward pre-hook hands it the call's ``attention_mask`` so the token average runs
over non-padding tokens only (all tokens when the call has no mask, or the mask's shape does not
match the hidden states'), and a forward hook forgets the routes after each call.

With ``hub.batch_reduce`` (training) r is averaged over the batch as well and each Linear builds
one weight matrix (one einsum); otherwise (inference) every sample gets its own weights: for short
inputs applied without building them (:data:`FACTORED_MAX_TOKENS`), else built for the whole batch
at once and applied with ``torch.bmm``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergeforge.errors import FusionError

MLP_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("BERT / RoBERTa / MiniLM / ViT", ("intermediate.dense", "output.dense")),
    ("CLIP", ("mlp.fc1", "mlp.fc2")),
    ("Llama / Mistral / Qwen2", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    ("T5 gated", ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")),
    ("T5", ("DenseReluDense.wi", "DenseReluDense.wo")),
    ("OPT / Whisper", ("fc1", "fc2")),
)
"""Architecture knowledge as data: ``(label, members)``. ``members`` are the dotted paths, relative
to one block, of the ``nn.Linear`` layers forming its MLP; the first reads the MLP's input (the
router's input) and must run first in the block. The first pattern that matches some block wins."""

FACTORED_MAX_TOKENS = 32
"""Per-sample weights at inference: up to this many tokens per sample, ``W(x_b) x`` is computed
as one product over the T task vectors side by side (B·L·T·out·in multiply-adds, one large
compute-bound matrix product); beyond it, each sample's W(x_b) is built and applied by ``bmm``
(B·T·out·in multiply-adds to build, but memory-bound: a B × out × in tensor is written and read).
The product's cost grows with the tokens L, the build's does not, so the build wins for long
inputs; a few tens of tokens is where they cross on a CPU."""

ROUTER_HIDDEN_STD = 0.01
"""Std of the router's hidden Linear weight at initialisation (paper, FusionBench)."""


def _linear_at(root: nn.Module, path: str) -> nn.Linear | None:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def find_mlps(body: nn.Module, members: tuple[str, ...] = ()) -> tuple[tuple[str, ...], list[str]]:
    """``(members, block prefixes)``: the blocks holding every member Linear, for ``members`` if
    given, else for the first pattern of :data:`MLP_PATTERNS` that matches."""
    candidates = (("mlp_modules", members),) if members else MLP_PATTERNS
    for _, mem in candidates:
        prefixes = [
            prefix
            for prefix, _ in body.named_modules()
            if all(_linear_at(body, _join(prefix, m)) is not None for m in mem)
        ]
        if prefixes:
            return mem, prefixes
    tried = [m for _, m in candidates]
    raise FusionError(
        f"WEMoE found no MLP in the body ({type(body).__name__}): no block holds nn.Linear "
        f"layers at {tried}; name your MLP's Linear layers with the mlp_modules parameter "
        "(paths relative to one block, the layer reading the MLP input first)"
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def prune_magnitude(tv: Tensor, ratio: float) -> Tensor:
    """E-WEMoE's per-tensor pruning of each task's vector: ``τ_t ⊙ [|τ_t| > quantile(|τ_t|, r)]``.

    ``tv`` is ``(T, *shape)``; the quantile is torch's linear-interpolation quantile of each
    task's entries (FusionBench ``_magnitude_prune``), computed with two ``kthvalue`` calls so it
    also works past ``torch.quantile``'s 2^24-element limit. ``r = 0`` keeps everything
    (FusionBench's strict ``>`` would drop the entries equal to the smallest magnitude).
    """
    if ratio <= 0:
        return tv.clone()
    flat = tv.reshape(tv.shape[0], -1).abs()  # (T, n)
    n = flat.shape[1]
    rank = torch.tensor(ratio, dtype=flat.dtype) * (n - 1)  # as torch.quantile computes it
    below, above = int(rank), int(torch.ceil(rank))
    lo = torch.kthvalue(flat, below + 1, dim=1).values  # (T,)
    hi = lo if above == below else torch.kthvalue(flat, above + 1, dim=1).values  # (T,)
    q = torch.lerp(lo, hi, (rank - below).to(flat.device))  # (T,)
    keep = flat > q[:, None]  # (T, n)
    return (tv.reshape(tv.shape[0], -1) * keep).reshape(tv.shape)


def _zero_linear(inp: int, out: int, dtype: torch.dtype) -> nn.Linear:
    """A zero ``Linear(inp, out)`` made without drawing from the global RNG."""
    linear = nn.utils.skip_init(nn.Linear, inp, out, dtype=dtype)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class Router(nn.Module):
    """``r = mean over tokens of g(h)`` with g of depth 0 (a learned constant ``weight`` (T,)),
    1 (``fc``: Linear(d, T)) or 2 (``fc1`` → ReLU → ``fc2``: Linear(d, d), Linear(d, T)); the
    parameter names are FusionBench's. Output bias (or the constant) starts at ``init_lambda``,
    hidden weights ~ N(0, 0.01²), hidden bias 0, output weights ~ N(0, output_std²)."""

    def __init__(self, hidden: int, num_tasks: int, depth: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.weight = nn.Parameter(torch.zeros(num_tasks, dtype=dtype))
        elif depth == 1:
            self.fc = _zero_linear(hidden, num_tasks, dtype)
        else:
            self.fc1 = _zero_linear(hidden, hidden, dtype)
            self.fc2 = _zero_linear(hidden, num_tasks, dtype)

    @torch.no_grad()
    def initialise(self, init_lambda: float, output_std: float, gen: torch.Generator) -> None:
        """Seeded initialisation (never the global RNG)."""
        if self.depth == 0:
            self.weight.fill_(init_lambda)
            return
        out = self.fc if self.depth == 1 else self.fc2
        if self.depth == 2:
            self.fc1.weight.copy_(
                ROUTER_HIDDEN_STD * torch.randn(self.fc1.weight.shape, generator=gen)
            )
            self.fc1.bias.zero_()
        out.weight.copy_(output_std * torch.randn(out.weight.shape, generator=gen))
        out.bias.fill_(init_lambda)

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        """``h`` (B, L, d), ``mask`` (B, L) or None → ``(B, T)`` (depth 0: ``(T,)``)."""
        if self.depth == 0:
            return self.weight  # (T,)
        per_token = self.fc(h) if self.depth == 1 else self.fc2(F.relu(self.fc1(h)))  # (B, L, T)
        if mask is None:
            return per_token.mean(dim=1)  # (B, T)
        m = mask.to(per_token.dtype).unsqueeze(-1)  # (B, L, 1)
        return (per_token * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, T)


class WEMoEHub(nn.Module):
    """Per-call routing state shared by the routed layers of one body (see the module docstring);
    holds E-WEMoE's shared ``router`` (None for WEMoE, whose routers sit on each group's entry),
    and ``members``/``mlps``: the MLP pattern and the block prefixes (group g = ``mlps[g]``)."""

    def __init__(self, router: Router | None, mask_position: int | None) -> None:
        super().__init__()
        self.router = router
        self.mask_position = mask_position
        self.batch_reduce = False
        self.members: tuple[str, ...] = ()
        self.mlps: list[str] = []
        self._mask: Tensor | None = None
        self._routes: dict[int, Tensor] = {}

    def capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the body: remember the call's ``attention_mask``."""
        mask = kwargs.get("attention_mask")
        pos = self.mask_position
        if mask is None and pos is not None and len(args) > pos:
            mask = args[pos]
        self._mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self._routes = {}

    def release(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        """Forward hook of the body: drop the call's mask and routes (and their graphs)."""
        self._mask, self._routes = None, {}

    def route(self, group: int, router: Router, x: Tensor) -> Tensor:
        """r for the MLP input ``x`` (B, ..., d): ``(B, T)``, or ``(T,)`` when batch-reduced or
        depth 0; stored for the group's other layers."""
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, L, d)
        mask = self._mask
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape[:2]):
            mask = None
        r = router(tokens, mask)  # (B, T) or (T,)
        if self.batch_reduce and r.dim() == 2:
            r = r.mean(dim=0)  # (T,)
        self._routes[group] = r
        return r

    def routes(self, group: int) -> Tensor:
        if group not in self._routes:
            raise FusionError(
                f"WEMoE: a routed layer of MLP {group} ran before the MLP's first layer; the "
                "mlp_modules order must list the layer that reads the MLP input first"
            )
        return self._routes[group]


class WEMoELinear(nn.Module):
    """A Linear whose weight is ``W0 + Σ_t r_t τ_t`` (bias likewise) with r from the hub.

    Buffers: ``base_weight`` (out, in), ``task_weight`` (T, out, in), and where the layer has a
    bias ``base_bias`` (out,), ``task_bias`` (T, out). ``router``: the group's own router on a
    WEMoE entry layer; an E-WEMoE entry uses the hub's shared one.
    """

    def __init__(
        self, linear: nn.Linear, num_tasks: int, hub: WEMoEHub, group: int, entry: bool,
        router: Router | None,
    ) -> None:  # fmt: skip
        super().__init__()
        w = linear.weight.detach()
        self.register_buffer("base_weight", w.clone())
        self.register_buffer("task_weight", w.new_zeros((num_tasks, *w.shape)))  # (T, out, in)
        b = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("base_bias", None if b is None else b.clone())
        self.register_buffer("task_bias", None if b is None else b.new_zeros((num_tasks, *b.shape)))
        self.group, self.entry, self.router = group, entry, router
        self.__dict__["hub"] = hub  # not a submodule: registered once, on the body's root

    def forward(self, x: Tensor) -> Tensor:
        if self.entry:
            router = self.router if self.router is not None else self.hub.router
            r = self.hub.route(self.group, router, x)
        else:
            r = self.hub.routes(self.group)
        return self.apply_routes(x, r)

    def apply_routes(self, x: Tensor, r: Tensor) -> Tensor:
        """``x`` (B, ..., in) with r ``(T,)`` (one weight) or ``(B, T)`` (one weight per sample)."""
        if r.dim() == 1:
            w = self.base_weight + torch.einsum("t,toi->oi", r, self.task_weight)  # (out, in)
            b = None if self.base_bias is None else self.base_bias + r @ self.task_bias  # (out,)
            return F.linear(x, w, b)
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, L, in)
        if xs.shape[1] <= FACTORED_MAX_TOKENS:
            y = self._per_sample_factored(xs, r)
        else:
            w = self.base_weight + torch.einsum("bt,toi->boi", r, self.task_weight)  # (B, out, in)
            y = torch.bmm(xs, w.transpose(1, 2))  # (B, L, out)
        if self.base_bias is not None:
            y = y + (self.base_bias + r @ self.task_bias).unsqueeze(1)  # (B, L, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _per_sample_factored(self, xs: Tensor, r: Tensor) -> Tensor:
        """``xs (B, L, in)`` times W(x_b)ᵀ without building W(x_b): x W0ᵀ + [r_b1 x … r_bT x]
        [τ_1 … τ_T]ᵀ, one matrix product over the T·in concatenation."""
        b, length, inp = xs.shape
        t, out, _ = self.task_weight.shape
        scaled = r[:, None, :, None] * xs[:, :, None, :]  # (B, L, T, in)
        scaled = scaled.reshape(b * length, t * inp)  # (B·L, T·in)
        stacked = self.task_weight.permute(1, 0, 2).reshape(out, t * inp)  # (out, T·in)
        y = (scaled @ stacked.T).reshape(b, length, out)  # (B, L, out)
        return y + xs @ self.base_weight.T

    def extra_repr(self) -> str:
        t, out, inp = self.task_weight.shape
        return f"in={inp}, out={out}, tasks={t}, group={self.group}, entry={self.entry}"


def _mask_position(body: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the positional parameters of ``body.forward``."""
    try:
        names = list(inspect.signature(body.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("attention_mask") if "attention_mask" in names else None


def install(
    body: nn.Module, members: tuple[str, ...], prefixes: list[str], num_tasks: int, depth: int,
    shared: bool,
) -> WEMoEHub:  # fmt: skip
    """Replace every member Linear of every block in ``prefixes`` by a :class:`WEMoELinear`
    (base = the Linear's current tensors, task vectors 0, routers of depth ``depth`` with zero
    parameters), register the hub as ``body.wemoe_hub`` with its hooks, and return it. The caller
    fills the tensors (``run``: initialisation; ``rebuild``: ``load_state_dict``)."""
    paths = [[_join(p, m) for m in members] for p in prefixes]
    absent = [path for group in paths for path in group if _linear_at(body, path) is None]
    if absent or not paths:
        raise FusionError(
            f"the body ({type(body).__name__}) has no nn.Linear at {absent or 'any MLP'}; the "
            "WEMoE description is for another architecture"
        )
    entries = [_linear_at(body, group[0]) for group in paths]
    widths = sorted({lin.in_features for lin in entries})
    dtype, device = entries[0].weight.dtype, entries[0].weight.device
    if shared and len(widths) != 1:
        raise FusionError(
            f"E-WEMoE shares one router across MLPs, but their inputs have widths {widths}"
        )
    hub = WEMoEHub(
        Router(widths[0], num_tasks, depth, dtype) if shared else None, _mask_position(body)
    )
    hub.members, hub.mlps = tuple(members), list(prefixes)
    for group, group_paths in enumerate(paths):
        for i, path in enumerate(group_paths):
            linear = _linear_at(body, path)
            router = None if shared or i else Router(linear.in_features, num_tasks, depth, dtype)
            routed = WEMoELinear(linear, num_tasks, hub, group, i == 0, router)
            body.set_submodule(path, routed.to(device))
    body.add_module("wemoe_hub", hub.to(device))
    body.register_forward_pre_hook(hub.capture, with_kwargs=True)
    body.register_forward_hook(hub.release, with_kwargs=True)
    return hub


def routed_layers(body: nn.Module) -> list[tuple[str, WEMoELinear]]:
    """``(path, layer)`` of every routed Linear, in module order."""
    return [(n, m) for n, m in body.named_modules() if isinstance(m, WEMoELinear)]


def routers(body: nn.Module) -> list[Router]:
    """Every router of the body (one per MLP for WEMoE, one for E-WEMoE)."""
    return [m for m in body.modules() if isinstance(m, Router)]

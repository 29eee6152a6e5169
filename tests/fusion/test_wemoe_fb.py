"""Parity of our WEMoE / E-WEMoE modules with FusionBench 0.2.33's, run in its own interpreter.

A tiny two-block network whose blocks hold a CLIP-style MLP (``mlp.fc1`` → GELU → ``mlp.fc2``) is
upscaled here by ``wemoe.upscale`` (routers seeded with large output weights and perturbed, so
samples and layers route differently); FusionBench's subprocess rebuilds the same network with its
``fusion_bench.models.we_moe.WeightEnsemblingMoE`` (WEMoE: one gate per MLP) or
``fusion_bench.models.sparse_we_moe.SparseWeightEnsemblingMoE_ShardGate`` (E-WEMoE: one shared gate,
``tv_prune_ratio`` 0.9) in place of each MLP, from the same θ0, fine-tuned MLPs and gate weights
(our router parameters are named as its gates'), and runs the same hidden states.

Compared: the outputs, batch-reduced and per sample, for router depths 0/1/2 (WEMoE) and 1/2
(E-WEMoE), and E-WEMoE's pruned task vectors (bit for bit: the same quantile rule on the same
float32 differences). Tolerance 1e-5 absolute on outputs of size ~1: FusionBench adds
``r_t τ_t`` task by task and loops over samples where we use one einsum and ``bmm``, which only
changes float rounding (~1e-7); a wrong routing weight, a missing bias term or an off-by-one in
the pruning moves outputs by ≥ 1e-3.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from helpers import run_fusionbench
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.wemoe import EWEMoEConfig, WEMoEConfig, upscale
from mergeforge.fusion.wemoe_modules import routed_layers, routers

pytestmark = pytest.mark.parity

TASKS, D, H = 3, 8, 12
CASES = {
    "wemoe-0": WEMoEConfig(router_hidden_layers=0, steps=0),  # constants, perturbed below
    "wemoe-1": WEMoEConfig(router_hidden_layers=1, steps=0, output_init_std=0.5),
    "wemoe-2": WEMoEConfig(router_hidden_layers=2, steps=0, output_init_std=0.5),
    "e_wemoe-1": EWEMoEConfig(router_hidden_layers=1, steps=0, output_init_std=0.5),
    "e_wemoe-2": EWEMoEConfig(router_hidden_layers=2, steps=0, output_init_std=0.5),
}

_NET = r"""
class MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.mlp = MLP(d, h)

    def forward(self, x):
        return self.mlp(x)


class Net(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, h), Block(d, h)])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x
"""

_WORKER = (
    r"""
import sys
import torch
from torch import nn
from fusion_bench.models.we_moe import WeightEnsemblingMoE, construct_weight_ensembling_gate
from fusion_bench.models.sparse_we_moe import SparseWeightEnsemblingMoE_ShardGate
"""
    + _NET
    + r"""

def load(sd, d, h):
    net = Net(d, h)
    net.load_state_dict(sd)
    return net


data = torch.load(sys.argv[1])
d, h, x = data["d"], data["h"], data["x"]
out = {}
for name, case in data["cases"].items():
    base = load(data["base"], d, h)
    experts = [load(e, d, h) for e in data["experts"]]
    net = load(data["base"], d, h)
    depth, shared = case["depth"], case["shared"]
    if shared:
        gate = construct_weight_ensembling_gate(d, len(experts), 0.3, depth)
        gate.load_state_dict(case["gates"][0])
    for i, block in enumerate(net.layers):
        kwargs = dict(hidden_size=d, base_model=base.layers[i].mlp,
                      expert_models=[e.layers[i].mlp for e in experts], init_lambda=0.3,
                      batch_first=True, router_hidden_layers=depth)
        if shared:
            moe = SparseWeightEnsemblingMoE_ShardGate(**kwargs, tv_prune_ratio=0.9, sharedgate=gate)
        else:
            moe = WeightEnsemblingMoE(**kwargs)
            moe.gate.load_state_dict(case["gates"][i])
        block.mlp = moe
    res = {"tv": [[dict(tv.state_dict()) for tv in b.mlp.task_vectors] for b in net.layers]}
    for reduce in (False, True):
        for b in net.layers:
            b.mlp.batch_reduce = reduce
        with torch.no_grad():
            res[reduce] = net(x)
    out[name] = res
torch.save(out, sys.argv[2])
"""
)

_namespace: dict[str, Any] = {"nn": nn}
exec(_NET, _namespace)  # the same network class on our side
Net = _namespace["Net"]


def _problem() -> FusionProblem:
    torch.manual_seed(11)
    body = Net(D, H)
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    gen = torch.Generator().manual_seed(12)
    experts = tuple(
        {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(TASKS)
    )
    tasks = tuple(FusionTask(f"t{t}", lambda out, batch: out, D) for t in range(TASKS))
    return FusionProblem(body, base, experts, tasks)


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    problem = _problem()
    x = torch.randn(4, 5, D, generator=torch.Generator().manual_seed(13))  # (B, L, d)
    ours, cases = {}, {}
    gen = torch.Generator().manual_seed(14)
    for name, config in CASES.items():
        module = upscale(problem, config)
        with torch.no_grad():  # every router different, the depth-0 constants too
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        gates = [
            {k: v.detach().clone() for k, v in r.state_dict().items()} for r in routers(module)
        ]
        cases[name] = {
            "depth": config.router_hidden_layers,
            "shared": config.SHARED_ROUTER,
            "gates": gates,
        }
        ours[name] = module
    payload = {
        "d": D, "h": H, "x": x, "cases": cases, "base": problem.base,
        "experts": list(problem.experts),
    }  # fmt: skip
    out = run_fusionbench(_WORKER, payload, tmp_path_factory.mktemp("fb_wemoe"))
    return {"x": x, "ours": ours, "theirs": out}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduce", [False, True])
def test_outputs_match_fusionbench(parity: dict[str, Any], name: str, reduce: bool) -> None:
    module = parity["ours"][name]
    module.wemoe_hub.batch_reduce = reduce
    with torch.no_grad():
        ours = module(parity["x"])
    theirs = parity["theirs"][name][reduce]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if not reduce:  # the routes really differ per sample
        other = parity["theirs"][name][True]
        assert name == "wemoe-0" or (theirs - other).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["e_wemoe-1", "e_wemoe-2"])
def test_pruned_task_vectors_match_fusionbench(parity: dict[str, Any], name: str) -> None:
    theirs = parity["theirs"][name]["tv"]  # [layer][task] {fc1.weight, ...}
    for path, layer in routed_layers(parity["ours"][name]):
        block, member = int(path.split(".")[1]), path.split(".")[-1]
        for t in range(TASKS):
            assert torch.equal(layer.task_weight[t], theirs[block][t][f"{member}.weight"])
            assert torch.equal(layer.task_bias[t], theirs[block][t][f"{member}.bias"])
        kept = (layer.task_weight != 0).float().mean()
        assert 0.05 < kept < 0.15  # ~10 % kept

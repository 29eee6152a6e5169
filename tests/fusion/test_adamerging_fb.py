"""Parity with FusionBench 0.2.33 (its own venv, ``tests/helpers.run_fusionbench``): the layer- and
task-wise merged-weight wrappers (with a Concrete mask), the TIES trim + sign election of
AdaMerging++, the Concrete mask sampler, and two whole loops on the tiny BERT body fed the
batches our seeded streams draw: layer-wise AdaMerging
(``LayerWiseAdaMergingAlgorithm.test_time_adaptation``) and Concrete task arithmetic
(``ConcreteTaskArithmeticAlgorithmForCLIP.train_mask`` + its evaluation mask)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fusion_problems import HIDDEN, VOCAB, make_head, tiny_problem
from helpers import run_fusionbench
from mergeforge.fusion.adamerging import AdaMergingConfig, run, ties_vectors
from mergeforge.fusion.concrete import ConcreteMask, ConcreteTAConfig, run_ta
from mergeforge.fusion.data import FusionProblem, FusionTask, cycle
from mergeforge.fusion.merged import MergedModel
from mergeforge.methods.rng import derive_seed

WORKER = r"""
import sys
from types import SimpleNamespace

import torch
from omegaconf import DictConfig
from torch import nn

from fusion_bench.method.adamerging.layer_wise_adamerging import LayerWiseAdaMergingAlgorithm
from fusion_bench.method.ties_merging.ties_merging_utils import resolve_sign, topk_values_mask
from fusion_bench.models.masks import MaskModel
from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel
from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel

cases = torch.load(sys.argv[1])
out = {}


def small(state):
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    m.load_state_dict(state)
    return m


c = cases["merge"]
for kind, wrapper, weights in (
    ("layer", LayerWiseMergedModel, c["layer"]),
    ("task", TaskWiseMergedModel, c["task"]),
):
    module = wrapper(
        weights.clone(), small(c["base"]), [small(e) for e in c["experts"]], clamp_weights=False
    )
    for masked in (False, True):
        mask = c["mask"] if masked else None
        state = module.merge_weights(task_vector_mask=mask)
        out[(kind, masked)] = {k: v.detach().clone() for k, v in state.items()}

c = cases["ties"]
trimmed, *_ = topk_values_mask(c["flat"].clone(), K=c["density"])
sign = resolve_sign(trimmed)
out["ties"] = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)

c = cases["mask"]
model = MaskModel({k: v.clone() for k, v in c["logits"].items()}, parameter_type="logits")
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(c["logits"][name])
torch.manual_seed(c["seed"])
samples = []
for _ in range(2):
    m = model.sample_mask(mask_type="continuous", temperature=c["temperature"])
    samples.append({k: (v / torch.mean(v)).detach() for k, v in m.items()})
out["mask"] = samples

c = cases["loop"]
from transformers import BertConfig, BertModel


def bert(state):
    body = BertModel(BertConfig(**c["config"])).eval()
    body.load_state_dict(state)
    return body


heads = []
for w, b in c["heads"]:
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.load_state_dict({"weight": w, "bias": b})
    heads.append(lin)


class Algo(LayerWiseAdaMergingAlgorithm):
    def get_shuffled_test_loader_iter(self, task):
        t = int(task)
        return iter([(c["batches"][t][c["order"][t].pop(0)],)])

    def compute_logits(self, module, inputs, task):
        return heads[int(task)](module(**inputs).pooler_output)


names = [str(t) for t in range(len(c["experts"]))]
algo = Algo(DictConfig({"optimizer": "adam", "lr": c["lr"], "max_steps": c["steps"]}))
algo.modelpool = SimpleNamespace(model_names=names)
K = len([p for p in bert(c["base"]).parameters()])
module = LayerWiseMergedModel(
    torch.full((len(names), K), c["init"]), bert(c["base"]), [bert(e) for e in c["experts"]],
    clamp_weights=False, tie_weights=True, strict=False,
)
module = algo.test_time_adaptation(module)
out["loop"] = module.merge_weight.detach().clone()

from fusion_bench.method.concrete_subspace.clip_concrete_task_arithmetic import (
    ConcreteTaskArithmeticAlgorithmForCLIP,
)


class Inputs(dict):
    def to(self, dtype=None):  # FusionBench casts its image batches; ours are token ids
        return self


class Concrete(ConcreteTaskArithmeticAlgorithmForCLIP):
    merge_dtype = None

    def get_shuffled_test_loader_iter(self, task):
        t = int(task)
        return iter([(Inputs(c["batches"][t][c["concrete_order"][t].pop(0)]),)])

    def compute_logits(self, module, inputs, task):
        return heads[int(task)](module(**inputs).pooler_output)


cc = cases["concrete"]
algo = Concrete(
    DictConfig({"optimizer": "adam", "lr": cc["lr"], "max_steps": cc["steps"],
                "temperature": 0.5, "save_interval": 10**6})
)
algo.modelpool = SimpleNamespace(model_names=names)
base = bert(c["base"])
module = TaskWiseMergedModel(
    torch.full((len(names),), 0.3), base, [bert(e) for e in c["experts"]],
    clamp_weights=False, tie_weights=True, strict=False,
)
mask_model = MaskModel(
    {n: p.detach() for n, p in base.named_parameters()}, parameter_type="logits"
)
torch.manual_seed(cc["seed"])
algo.train_mask(module=module, mask_model=mask_model)
with torch.no_grad():
    mask = mask_model.sample_mask(mask_type="continuous", temperature=0.5)
    mask = {n: m / torch.mean(m) for n, m in mask.items()}
    merged = module.merge_and_unload(mask)
out["concrete"] = {n: p.detach().clone() for n, p in merged.named_parameters()}

torch.save(out, sys.argv[2])
"""


def _small_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _small_problem() -> FusionProblem:
    body = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    base = _small_state(0)
    experts = tuple({k: v + 0.1 * torch.randn(v.shape) for k, v in base.items()} for _ in range(3))
    tasks = tuple(FusionTask(f"t{i}", lambda out, b: out, 2) for i in range(3))
    return FusionProblem(body, base, experts, tasks)


def _cases(problem: FusionProblem, merge: FusionProblem) -> dict:
    gen = torch.Generator().manual_seed(5)
    K = len(merge.names)
    layer = torch.randn(K, 3, generator=gen)  # ours (K, T); FusionBench's (T, K)
    mask = {n: torch.rand(merge.base[n].shape, generator=gen) for n in merge.names}
    flat = torch.randn(3, 200, generator=gen)
    logits = {n: torch.randn(merge.base[n].shape, generator=gen) for n in merge.names}
    seed, steps = 3, 4
    order = [
        [
            i
            for _, i in zip(
                range(steps),
                cycle(range(len(t.unlabeled)), derive_seed(seed, t.name)),
                strict=False,
            )
        ]
        for t in problem.tasks
    ]
    return {
        "merge": {
            "base": merge.base, "experts": list(merge.experts), "layer": layer.T.contiguous(),
            "task": torch.tensor([0.2, -0.4, 0.7]), "mask": mask,
        },
        "ties": {"flat": flat, "density": 0.3},
        "mask": {"logits": logits, "seed": 11, "temperature": 0.5},
        "loop": {
            "config": {
                "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16,
                "attn_implementation": "eager",
                # FusionBench puts the body in train mode; ours stays in eval mode
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            },
            "base": problem.base, "experts": list(problem.experts),
            "heads": [tuple(make_head(3, t)[0].state_dict().values()) for t in range(3)],
            "batches": [list(t.unlabeled) for t in problem.tasks], "order": order,
            "lr": 0.05, "steps": steps, "init": 0.3, "seed": seed,
            "concrete_order": [list(o) for o in order],
        },
        "concrete": {"lr": 0.2, "steps": steps, "seed": seed},
    }  # fmt: skip


@pytest.fixture(scope="module")
def parity(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict, dict, FusionProblem, FusionProblem]:
    problem = tiny_problem(3, batches=3, n=4, spread=0.2)
    merge = _small_problem()
    cases = _cases(problem, merge)
    tmp: Path = tmp_path_factory.mktemp("fb")
    return cases, run_fusionbench(WORKER, cases, tmp), problem, merge


@pytest.mark.parametrize("masked", [False, True])
def test_merged_weights_match_the_fusionbench_wrappers(parity, masked: bool) -> None:
    cases, ref, _, merge = parity
    c = cases["merge"]
    model = MergedModel(merge)
    mask = {n: m.reshape(-1) for n, m in c["mask"].items()} if masked else None
    for kind, lam in (("layer", c["layer"].T), ("task", c["task"])):
        got = model.state(lam, mask=mask)
        want = ref[(kind, masked)]
        assert set(got) == set(want)
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_adamerging_pp_vectors_match_fusionbench_ties(parity) -> None:
    cases, ref, _, _ = parity
    c = cases["ties"]
    got = ties_vectors({"w": c["flat"]}, c["density"])["w"]
    assert torch.equal(got, ref["ties"])


def test_concrete_mask_samples_match_fusionbench(parity) -> None:
    cases, ref, _, merge = parity
    c = cases["mask"]
    mask = ConcreteMask(MergedModel(merge), 0.0, c["seed"])
    with torch.no_grad():
        for name, s in mask.logits.items():
            s.copy_(c["logits"][name].reshape(-1))
    for want in ref["mask"]:
        got = mask.sample(c["temperature"])
        for name in merge.names:
            torch.testing.assert_close(
                got[name].view(merge.base[name].shape), want[name], rtol=1e-6, atol=1e-7
            )


def test_layer_wise_adamerging_loop_matches_fusionbench(parity) -> None:
    """Same batches, same Adam steps: the learned (K, T) coefficients agree (FusionBench's entropy
    adds 1e-8 inside the log and accumulates per-task gradients; the rest is identical)."""
    cases, ref, problem, _ = parity
    c = cases["loop"]
    result = run(
        problem, AdaMergingConfig(lr=c["lr"], steps=c["steps"], init=c["init"], seed=c["seed"])
    )
    got = torch.tensor(
        [[result.coefficients[t.name][n] for t in problem.tasks] for n in problem.names]
    )
    assert got.shape == ref["loop"].T.shape
    want = ref["loop"].T
    assert float((got - 0.3).abs().max()) > 0.1  # it moved
    # attention key biases cannot change the output (softmax is shift-invariant: q·(k + b) adds
    # q·b to every key), so their gradient is rounding noise (~1e-12) that Adam turns into tiny,
    # implementation-dependent steps: both stay at the initial value, nothing more can agree
    noise = torch.tensor(["attention.self.key.bias" in n for n in problem.names])
    torch.testing.assert_close(got[~noise], want[~noise], rtol=0, atol=1e-5)
    for x in (got[noise], want[noise]):
        torch.testing.assert_close(x, torch.full_like(x, 0.3), rtol=0, atol=1e-3)


def test_concrete_task_arithmetic_loop_matches_fusionbench(parity) -> None:
    """``ConcreteTaskArithmeticAlgorithmForCLIP.train_mask`` with the same mask seed and batches,
    then its continuous evaluation mask: the merged weights agree (key biases as above)."""
    cases, ref, problem, _ = parity
    c = cases["concrete"]
    config = ConcreteTAConfig(lr=c["lr"], steps=c["steps"], seed=c["seed"])
    result = run_ta(problem, config)
    moved, diffs = 0.0, []
    for name in problem.names:
        want = ref["concrete"][name]
        ta = problem.base[name] + 0.3 * sum(e[name] - problem.base[name] for e in problem.experts)
        moved = max(moved, float((result.state[name] - ta).abs().max()))
        diff = (result.state[name] - want).abs().reshape(-1)  # (n,)
        assert float(diff.max()) < (1e-3 if "attention.self.key.bias" in name else 5e-5), name
        diffs.append(diff)
    # Adam is elementwise here: a logit whose gradient is near 0 takes a step set by rounding
    # noise (FusionBench's entropy adds 1e-8 inside the log), so a few elements differ slightly
    assert float((torch.cat(diffs) > 1e-6).float().mean()) < 0.01
    assert moved > 0.01  # the mask is not all ones

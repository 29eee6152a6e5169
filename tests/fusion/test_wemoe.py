"""WEMoE / E-WEMoE on tiny BERT problems: initialisation equals task arithmetic, per-sample routing,
padding, training, determinism, rebuild, router gradients, errors."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from fusion_problems import make_head, tiny_body, tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion import wemoe_modules
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.losses import entropy
from mergeforge.fusion.wemoe import SPECS, EWEMoEConfig, WEMoEConfig, rebuild, run, upscale
from mergeforge.fusion.wemoe_modules import (
    WEMoEHub,
    WEMoELinear,
    find_mlps,
    prune_magnitude,
    routed_layers,
    routers,
)

MLP_KEY = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.dense\.")
"""The BERT MLP tensors, written independently of the module's pattern table."""


@pytest.fixture(scope="module")
def problem() -> FusionProblem:
    return tiny_problem(spread=0.5)


def _batches(problem: FusionProblem) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for t in problem.tasks for b in t.unlabeled]


def _outputs(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = module(**batch)
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=1)  # (N, L·d + d)


def _prune_reference(tv: torch.Tensor, ratio: float) -> torch.Tensor:
    """FusionBench's rule with torch.quantile on one task's tensor."""
    return tv * (tv.abs() > torch.quantile(tv.abs().flatten(), ratio))


def _ta_body(problem: FusionProblem, lam: float, mlp_ratio: float | None = None) -> nn.Module:
    """A copy of the body holding θ0 + λ Σ τ; the MLP τ pruned with ``mlp_ratio`` if given."""
    body = copy.deepcopy(problem.body)
    with torch.no_grad():
        for name, param in body.named_parameters():
            b = problem.base[name]
            taus = [e[name] - b for e in problem.experts]
            if mlp_ratio is not None and MLP_KEY.match(name):
                taus = [_prune_reference(t, mlp_ratio) for t in taus]
            param.copy_(b + lam * sum(taus))
    return body


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("reduce", [False, True])
def test_initial_model_is_task_arithmetic(problem: FusionProblem, depth: int, reduce: bool) -> None:
    config = WEMoEConfig(init_lambda=0.3, router_hidden_layers=depth, steps=0)
    module = run(problem, config).module
    module.wemoe_hub.batch_reduce = reduce
    reference = _ta_body(problem, 0.3)
    for batch in _batches(problem):
        torch.testing.assert_close(
            _outputs(module, batch), _outputs(reference, batch), atol=1e-5, rtol=0
        )
    assert len(routers(module)) == 2  # one router per layer's MLP


@pytest.mark.parametrize("ratio", [0.0, 0.9])
def test_e_wemoe_initial_model_is_task_arithmetic_of_pruned_mlps(
    problem: FusionProblem, ratio: float
) -> None:
    module = run(problem, EWEMoEConfig(tv_prune_ratio=ratio, steps=0)).module
    assert len(routers(module)) == 1
    reference = _ta_body(problem, 0.3, mlp_ratio=ratio if ratio else None)
    for batch in _batches(problem):
        torch.testing.assert_close(
            _outputs(module, batch), _outputs(reference, batch), atol=1e-5, rtol=0
        )
    if ratio:  # the pruning is real: unpruned MLPs give a different model
        unpruned = _ta_body(problem, 0.3)
        batch = _batches(problem)[0]
        assert (_outputs(module, batch) - _outputs(unpruned, batch)).abs().max() > 1e-3


def test_prune_magnitude_is_the_quantile_rule() -> None:
    gen = torch.Generator().manual_seed(3)
    tv = torch.round(torch.randn(3, 7, 11, generator=gen) * 4) / 4  # (T, 7, 11) with many ties
    for ratio in (0.1, 0.5, 0.9, 0.97):
        got = prune_magnitude(tv, ratio)
        for t in range(3):
            assert torch.equal(got[t], _prune_reference(tv[t], ratio))
    assert torch.equal(prune_magnitude(tv, 0.0), tv)
    kept = (prune_magnitude(torch.randn(2, 1000, generator=gen), 0.9) != 0).sum(dim=1)
    assert kept.tolist() == [100, 100]


def _random_routers(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in routers(module):
            for p in router.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))


def test_per_sample_routing_equals_each_sample_alone(problem: FusionProblem) -> None:
    module = run(problem, WEMoEConfig(steps=0)).module
    _random_routers(module, 1)
    batch = _batches(problem)[0]
    together = _outputs(module, batch)
    for i in range(together.shape[0]):
        alone = _outputs(module, {k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    module.wemoe_hub.batch_reduce = True  # one routing vector for the batch: not the same model
    assert (_outputs(module, batch) - together).abs().max() > 1e-3


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_per_sample_weights_both_ways_equal_the_explicit_product(
    tokens: int, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W(x_b) = W0 + Σ_t r_bt τ_t applied to x_b: by the concatenated product (short inputs) and by
    building W(x_b) (long ones) both equal the per-sample reference written out here."""
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(6, 5, bias=bias)
    layer = WEMoELinear(linear, 3, WEMoEHub(None, None), 0, False, None)
    with torch.no_grad():
        layer.task_weight.copy_(torch.randn(3, 5, 6, generator=gen))
        if bias:
            layer.task_bias.copy_(torch.randn(3, 5, generator=gen))
    x = torch.randn(4, tokens, 6, generator=gen)  # (B, L, in)
    r = torch.randn(4, 3, generator=gen)  # (B, T)
    want = []
    for b in range(4):
        w = linear.weight + sum(r[b, t] * layer.task_weight[t] for t in range(3))
        y = x[b] @ w.T
        if bias:
            y = y + linear.bias + r[b] @ layer.task_bias
        want.append(y)
    for limit in (0, 1000):  # 0: always build W(x_b); 1000: always the concatenated product
        monkeypatch.setattr(wemoe_modules, "FACTORED_MAX_TOKENS", limit)
        with torch.no_grad():
            got = layer.apply_routes(x, r)
        torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_router_ignores_padding_and_reads_a_positional_mask(problem: FusionProblem) -> None:
    module = run(problem, EWEMoEConfig(steps=0)).module
    _random_routers(module, 2)
    batch = _batches(problem)[0]
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    noisy = {**batch, "input_ids": torch.where(mask.bool(), batch["input_ids"], 7)}
    with torch.no_grad():
        a, b = module(**batch), module(**noisy)
        c = module(batch["input_ids"], batch["attention_mask"])
    keep = mask.bool()
    torch.testing.assert_close(
        a.last_hidden_state[keep], b.last_hidden_state[keep], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(a.pooler_output, c.pooler_output, atol=0, rtol=0)
    module.wemoe_hub.mask_position = None  # without the mask the padding tokens are averaged in
    with torch.no_grad():
        d = module(batch["input_ids"], batch["attention_mask"])
    assert (d.pooler_output - a.pooler_output).abs().max() > 1e-4


@pytest.mark.parametrize("config", [WEMoEConfig(steps=6, lr=1e-2), EWEMoEConfig(steps=6, lr=1e-2)])
def test_training_lowers_the_entropy(config: WEMoEConfig) -> None:
    problem = tiny_problem(spread=0.5, batches=1)  # one batch per task: a fixed objective
    calls: list[tuple[int, int, float]] = []
    result = run(problem, config, progress=lambda s, n, loss: calls.append((s, n, loss)))
    assert len(result.history) == 6 and [c[0] for c in calls] == list(range(1, 7))
    assert result.history[-1] < result.history[0] - 0.01
    module = result.module  # the objective recomputed on the returned model, batch-reduced
    module.wemoe_hub.batch_reduce = True
    with torch.no_grad():
        final = sum(
            entropy(t.head(module(**t.unlabeled[0]), t.unlabeled[0])) for t in problem.tasks
        )
    assert float(final) < result.history[-1]
    assert not any(p.requires_grad for p in module.parameters())


def test_seeded_runs_are_identical(problem: FusionProblem) -> None:
    config = WEMoEConfig(steps=2, lr=1e-2, output_init_std=0.01, seed=4)
    a, b = run(problem, config), run(problem, config)
    c = run(problem, WEMoEConfig(steps=2, lr=1e-2, output_init_std=0.01, seed=5))
    assert a.history == b.history
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("config", [WEMoEConfig(steps=2, lr=1e-2), EWEMoEConfig(steps=2, lr=1e-2)])
def test_rebuild_round_trip_is_bit_identical(config: WEMoEConfig, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    problem = tiny_problem(spread=0.5)
    result = run(problem, config)
    save_file(result.tensors, tmp_path / "model.safetensors")  # no shared or strided tensors
    body = tiny_body()  # the body θ0 came from
    rebuilt = rebuild(body, result.description, load_file(tmp_path / "model.safetensors"))
    assert result.loader == "mergeforge.fusion.wemoe.rebuild"
    json.dumps([result.description, result.info])  # JSON-able
    for batch in _batches(problem):
        assert torch.equal(_outputs(rebuilt, batch), _outputs(result.module, batch))
    with pytest.raises(FusionError, match="do not fit"):
        rebuild(tiny_body(), result.description, {})
    with pytest.raises(FusionError, match="not a WEMoE description"):
        rebuild(tiny_body(), {"algorithm": "smile"}, result.tensors)


def _double_problem() -> FusionProblem:
    body = tiny_body(seed=1).double()
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    gen = torch.Generator().manual_seed(9)
    experts, tasks = [], []
    for t, batch in enumerate(tiny_problem(tasks=2, batches=1).tasks):
        experts.append(
            {
                k: v + 0.5 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                for k, v in base.items()
            }
        )
        lin, head = make_head(3, 40 + t)
        lin.double()
        tasks.append(FusionTask(f"t{t}", head, 3, batch.unlabeled))
    return FusionProblem(body, base, tuple(experts), tuple(tasks))


@pytest.mark.parametrize(
    "config", [WEMoEConfig(router_hidden_layers=0), EWEMoEConfig(router_hidden_layers=1)]
)
def test_router_gradients_match_finite_differences(config: WEMoEConfig) -> None:
    problem = _double_problem()
    module = upscale(problem, config)
    module.wemoe_hub.batch_reduce = True
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    start = tuple(module.get_parameter(n).detach() + 0.1 for n in names)

    def loss(*values: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, values, strict=True))
        total = torch.zeros((), dtype=torch.float64)
        for task in problem.tasks:
            batch = task.unlabeled[0]
            out = torch.func.functional_call(module, params, args=(), kwargs=batch)
            logp = torch.log_softmax(task.head(out, batch), dim=-1)  # (N, C) float64
            total = total - (logp.exp() * logp).sum(dim=-1).mean()  # losses.entropy runs in fp32
        return total

    inputs = tuple(v.clone().requires_grad_(True) for v in start)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_llama_mlps_are_found_and_start_at_task_arithmetic() -> None:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    body = LlamaModel(cfg).eval()
    assert find_mlps(body) == (("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), ["layers.0", "layers.1"])  # fmt: skip
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    experts = tuple({k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2))  # fmt: skip
    tasks = tuple(FusionTask(f"t{t}", lambda out, batch: out.last_hidden_state[:, 0], 16) for t in range(2))  # fmt: skip
    problem = FusionProblem(body, base, experts, tasks)
    module = run(problem, WEMoEConfig(steps=0, router_hidden_layers=1)).module
    assert len(routers(module)) == 2
    reference = _ta_body(problem, 0.3)
    ids = torch.randint(0, 32, (3, 6), generator=gen)
    with torch.no_grad():
        got, want = module(input_ids=ids), reference(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)


def test_mlp_override_and_missing_mlps() -> None:
    override = ("attention.self.query", "attention.self.key")
    assert find_mlps(tiny_body(), override) == (override, ["encoder.layer.0", "encoder.layer.1"])
    module = run(tiny_problem(), WEMoEConfig(steps=0, mlp_modules=override)).module
    assert [p for p, _ in routed_layers(module)] == [
        f"encoder.layer.{i}.{m}" for i in range(2) for m in override
    ]
    with pytest.raises(FusionError, match="found no MLP"):
        find_mlps(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"router_hidden_layers": 3}, "router_hidden_layers"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"batch_reduce": 1}, "batch_reduce"),
        ({"init_lambda": float("inf")}, "init_lambda"),
        ({"output_init_std": -0.1}, "output_init_std"),
        ({"mlp_modules": ["", "x"]}, "mlp_modules"),
        ({"seed": "a"}, "seed"),
        ({"tv_prune_ratio": 1.0}, "tv_prune_ratio"),
        ({"tv_prune_ratio": -0.5}, "tv_prune_ratio"),
    ],
)
def test_bad_parameters_name_the_field(params: dict, field: str) -> None:
    spec = SPECS[1]  # e_wemoe has every field of wemoe
    with pytest.raises(FusionError, match=rf"e_wemoe: bad parameters: {field}="):
        spec.make_config(params)
    assert spec.make_config({"mlp_modules": ["mlp.fc1", "mlp.fc2"]}).mlp_modules == (
        "mlp.fc1",
        "mlp.fc2",
    )


def test_specs() -> None:
    assert [(s.name, s.category, s.config) for s in SPECS] == [
        ("wemoe", "dynamic", WEMoEConfig),
        ("e_wemoe", "dynamic", EWEMoEConfig),
    ]
    with pytest.raises(FusionError, match="unknown parameter"):
        SPECS[0].make_config({"tv_prune_ratio": 0.5})


def test_task_without_data_is_an_error(problem: FusionProblem) -> None:
    empty = FusionTask("empty", problem.tasks[1].head, 3)
    tasks = (problem.tasks[0], empty, *problem.tasks[2:])
    bare = FusionProblem(problem.body, problem.base, problem.experts, tasks)
    with pytest.raises(FusionError, match="task 'empty' has no unlabeled batches"):
        run(bare, WEMoEConfig(steps=1))
    assert run(bare, WEMoEConfig(steps=0)).history == ()  # no training, no data needed


def test_nan_loss_names_the_step(problem: FusionProblem) -> None:
    with pytest.raises(FusionError, match=r"wemoe: the loss became nan at step \d+; lower lr"):
        run(problem, WEMoEConfig(steps=30, lr=1e6))


def test_unfused_mlp_weight_is_an_error(problem: FusionProblem) -> None:
    names = tuple(n for n in problem.names if n != "encoder.layer.1.output.dense.weight")
    partial = FusionProblem(problem.body, problem.base, problem.experts, problem.tasks, names)
    with pytest.raises(
        FusionError, match=r"'encoder\.layer\.1\.output\.dense'.*not among the fused"
    ):
        run(partial, WEMoEConfig(steps=0))

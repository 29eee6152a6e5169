"""SMILE: exact reproduction at full rank, routing by subspace, top-k mixing, parameter count,
rebuild round trip, a causal LM body that generates, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fusion_problems import tiny_body, tiny_problem
from mergeforge.errors import FusionError
from mergeforge.fusion import smile
from mergeforge.fusion.data import FusionProblem, FusionTask
from mergeforge.fusion.smile import SmileConfig, SmileLinear, extra_parameters

TOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).detach().abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max error {err:g}"


def _head(outputs, batch):
    return outputs


def _linear_problem(deltas: list[torch.Tensor], bias_deltas: list[torch.Tensor]) -> FusionProblem:
    """One ``Linear(8, 6)`` (inside a Sequential) with experts W0 + ΔW_t, b0 + Δb_t."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 6)).eval()
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    experts = tuple(
        {"0.weight": base["0.weight"] + d, "0.bias": base["0.bias"] + db}
        for d, db in zip(deltas, bias_deltas, strict=True)
    )
    tasks = tuple(FusionTask(f"t{i}", _head, 2) for i in range(len(deltas)))
    return FusionProblem(body, base, experts, tasks)


def _orthogonal_experts(t: int = 3) -> FusionProblem:
    """ΔW_t = u_t e_tᵀ: expert t reads only input coordinate t."""
    g = torch.Generator().manual_seed(1)
    deltas = [torch.outer(torch.randn(6, generator=g), torch.eye(8)[i]) for i in range(t)]
    return _linear_problem(deltas, [torch.randn(6, generator=g) for _ in range(t)])


@pytest.mark.parametrize("k", [-1, 16])
def test_one_expert_at_full_rank_is_the_fine_tuned_model(k: int) -> None:
    p = tiny_problem(1)
    res = smile.run(p, SmileConfig(k=k, gate_k=2, average_experts=True))
    assert res.info["upscaled"] == 13 and res.info["left_plain"] == []
    for batch in p.tasks[0].unlabeled:
        got = res.module(**batch)
        want = functional_call(p.body, p.experts[0], (), batch)
        _close(got.last_hidden_state, want.last_hidden_state)
        _close(got.pooler_output, want.pooler_output)


def test_router_picks_the_expert_whose_subspace_holds_the_input() -> None:
    p = _orthogonal_experts()
    layer = smile.run(p, SmileConfig(k=-1, gate_k=1, top_k=1)).module[0]
    assert isinstance(layer, SmileLinear)
    x = 5.0 * torch.eye(8)[:3]  # (3, 8): row t lies in expert t's input subspace
    weights, experts = layer.routing(x)
    assert experts.squeeze(1).tolist() == [0, 1, 2]
    assert torch.equal(weights, torch.ones(3, 1))
    for t in range(3):
        e = p.experts[t]
        _close(layer(x[t]), e["0.weight"] @ x[t] + e["0.bias"])


@pytest.mark.parametrize("k", [-1, 1])  # per-expert products; dense mixing of rank-1 factors
def test_top_k_mixes_the_renormalised_probabilities(k: int) -> None:
    p = _orthogonal_experts()
    layer = smile.run(p, SmileConfig(k=k, gate_k=1, top_k=2)).module[0]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))  # (N, L, in)
    w0, b0 = p.base["0.weight"], p.base["0.bias"]
    want = torch.empty(2, 5, 6)
    for i in range(2):
        for j in range(5):
            h = x[i, j]  # (8,)
            dw = [e["0.weight"] - w0 for e in p.experts]
            # ΔW_t has rank 1 and row space e_t, so ‖V_t[:, :1]ᵀ h‖ = |h_t|
            prob = torch.softmax(h[:3].abs(), dim=0)  # (T,)
            top = torch.topk(prob, 2).indices.tolist()
            total = sum(float(prob[t]) for t in top)
            y = w0 @ h + b0
            for t in top:
                db = p.experts[t]["0.bias"] - b0
                y = y + float(prob[t]) / total * (dw[t] @ h + db)
            want[i, j] = y
    _close(layer(x), want)


def test_dense_and_selected_mixing_agree() -> None:
    p = tiny_problem(3)
    layer = smile.run(p, SmileConfig(gate_k=2, k=3, top_k=2)).module.encoder.layer[0].output.dense
    h = torch.randn(11, 32, generator=torch.Generator().manual_seed(0))  # (n, in)
    weights, experts = layer.routing(h)
    assert experts.unique().numel() == 3  # every expert gets tokens
    with torch.no_grad():
        _close(layer._mix_low_rank(h, weights, experts), layer._mix_selected(h, weights, experts))


def test_extra_parameters_follow_the_formula() -> None:
    p = tiny_problem(3)
    cfg = SmileConfig(gate_k=2, k=4, top_k=2)
    res = smile.run(p, cfg)
    want = sum(
        extra_parameters(m.in_features, m.out_features, 3, 4, 2, True)
        for m in p.body.modules()
        if isinstance(m, nn.Linear)
    )
    count = sum(x.numel() for x in res.module.parameters())
    assert res.info["extra_parameters"] == want == count - res.info["body_parameters"]
    assert extra_parameters(32, 16, 3, 4, 2, True) == 3 * (4 * 48 + 2 * 32 + 16)
    assert extra_parameters(32, 16, 2, -1, 1, False) == 2 * (16 * 32 + 32)


def test_tensors_outside_the_linears_are_base_or_mean() -> None:
    p = tiny_problem(2)
    name = "encoder.layer.1.output.LayerNorm.weight"
    plain = smile.run(p, SmileConfig(k=2)).tensors
    mean = smile.run(p, SmileConfig(k=2, average_experts=True)).tensors
    assert torch.equal(plain[name], p.base[name])
    _close(mean[name], (p.experts[0][name] + p.experts[1][name]) / 2)
    bias = "encoder.layer.1.output.dense.base.bias"  # b0 stays θ0's: the experts add Δb_t
    assert torch.equal(mean[bias], p.base["encoder.layer.1.output.dense.bias"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    p = tiny_problem(3)
    cfg = SmileConfig(gate_k=2, k=3, top_k=2)
    cpu, gpu = smile.run(p, cfg), smile.run(p, cfg, device="cuda")
    batch = p.tasks[0].unlabeled[0]
    got = gpu.module(**{k: v.cuda() for k, v in batch.items()}).last_hidden_state.cpu()
    _close(got, cpu.module(**batch).last_hidden_state, 1e-4)


def test_rebuild_round_trip_is_bit_identical(tmp_path: Path) -> None:
    p = tiny_problem(3)
    res = smile.run(p, SmileConfig(gate_k=2, k=3, top_k=2, average_experts=True))
    torch.save(res.tensors, tmp_path / "t.pt")
    (tmp_path / "d.json").write_text(json.dumps(res.description))
    body = tiny_body(seed=5)
    body.load_state_dict(p.base, strict=False)
    loaded = smile.rebuild(
        body, json.loads((tmp_path / "d.json").read_text()), torch.load(tmp_path / "t.pt")
    )
    assert res.loader == "mergeforge.fusion.smile.rebuild"
    for batch in p.tasks[1].unlabeled:
        a, b = res.module(**batch), loaded(**batch)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        assert torch.equal(a.pooler_output, b.pooler_output)


def test_layers_without_a_change_stay_plain_linear() -> None:
    p = tiny_problem(2)
    name = "encoder.layer.0.attention.self.key"
    for e in p.experts:
        e[f"{name}.weight"] = p.base[f"{name}.weight"].clone()
    res = smile.run(p, SmileConfig(k=2))
    assert type(res.module.get_submodule(name)) is nn.Linear
    assert res.info["left_plain"] == [name]
    assert name not in res.description["modules"]


def test_include_selects_linears_by_name() -> None:
    res = smile.run(tiny_problem(2), SmileConfig(k=2, include=r"intermediate"))
    assert sorted(res.description["modules"]) == [
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.1.intermediate.dense",
    ]


def _llama_problem(tasks: int) -> FusionProblem:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attn_implementation="eager",
    )  # fmt: skip
    body = LlamaForCausalLM(cfg).eval()
    base = {k: v.detach().clone() for k, v in body.named_parameters()}
    g = torch.Generator().manual_seed(7)
    experts = tuple(
        {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(tasks)
    )
    heads = tuple(FusionTask(f"t{i}", lambda o, b: o.logits[:, -1], 40) for i in range(tasks))
    return FusionProblem(body, base, experts, heads)


def test_llama_body_upscales_every_projection_and_generates(tmp_path: Path) -> None:
    p = _llama_problem(3)
    res = smile.run(p, SmileConfig(gate_k=2, k=4, top_k=1))
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(res.description["modules"]) == sorted(
        f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"
        for i in range(2)
        for n in projections
    )
    ids = torch.tensor([[3, 17, 5, 9]])
    out = res.module.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    fresh = _llama_problem(3).body
    loaded = smile.rebuild(fresh, res.description, dict(res.tensors))
    assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), out)


def test_llama_one_expert_full_rank_reproduces_its_logits() -> None:
    p = _llama_problem(1)
    res = smile.run(p, SmileConfig(k=-1, average_experts=True))
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]])}
    want = functional_call(p.body, p.experts[0], (), batch).logits
    _close(res.module(**batch).logits, want)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"gate_k": 0}, "gate_k must be ≥ 1"),
        ({"k": 0}, "k must be ≥ 1 or −1"),
        ({"k": -3}, "k must be ≥ 1 or −1"),
        ({"top_k": 0}, "top_k must be ≥ 1"),
        ({"include": "("}, "include '\\(' is not a valid regular expression"),
    ],
)
def test_bad_config_values(params: dict, match: str) -> None:
    with pytest.raises(FusionError, match=match):
        SmileConfig(**params)


def test_run_errors_name_the_problem() -> None:
    p = _orthogonal_experts(2)
    with pytest.raises(FusionError, match="top_k 3 is more than the 2 experts"):
        smile.run(p, SmileConfig(top_k=3))
    with pytest.raises(FusionError, match="nothing to upscale"):
        smile.run(p, SmileConfig(include="attention"))

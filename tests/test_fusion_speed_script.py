"""The functions of ``benchmarks/fusion_speed.py`` on a tiny fusion problem (no pool, no timing
claims): each timed step is the computation it claims to be, the timing loop interleaves and
drops the warm-up, the memory probe and the bound hang together, SMILE's parameter count matches
its formula, and the results file is JSON with the expected name."""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fusion_problems import tiny_problem
from mergeforge.fusion.data import task_vectors
from mergeforge.fusion.losses import entropy
from mergeforge.fusion.smile import SmileConfig, extra_parameters, select_linears
from mergeforge.fusion.wemoe import routers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fusion_speed

T = 3


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def problem():
    return tiny_problem(T)


def task_arithmetic_entropy(problem, batches, lam: float) -> float:
    """Σ_t entropy of θ0 + λ Σ_t τ_t on each task's batch, on a copy of the body (independent of
    MergedModel and WEMoE)."""
    body = copy.deepcopy(problem.body)
    tvs = task_vectors(problem)
    body.load_state_dict({n: problem.base[n] + lam * tvs[n].sum(0) for n in problem.names})
    with torch.no_grad():
        pairs = zip(problem.tasks, batches, strict=True)
        return float(sum(entropy(t.head(body(**b), b)) for t, b in pairs))


def test_plain_step_backpropagates_to_every_body_parameter(problem):
    batches = fusion_speed.fixed_batches(problem)
    assert [b is t.unlabeled[0] for b, t in zip(batches, problem.tasks, strict=True)] == [True] * T
    loss = fusion_speed.plain_step(problem, batches)()
    assert loss == pytest.approx(task_arithmetic_entropy(problem, batches, 0.0), rel=1e-5)
    grads = [p.grad for p in problem.body.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_adamerging_and_wemoe_steps_start_at_task_arithmetic_and_update(problem):
    batches = fusion_speed.fixed_batches(problem)
    expected = task_arithmetic_entropy(problem, batches, 0.3)
    step, model, lam = fusion_speed.adamerging_step(problem, batches)
    assert lam.shape == (model.num_tensors, T) and lam.requires_grad
    before = lam.detach().clone()
    assert step() == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(lam.detach(), before)  # one Adam step on λ

    step, module = fusion_speed.wemoe_step(problem, batches)
    params = [p for r in routers(module) for p in r.parameters()]
    start = [p.detach().clone() for p in params]
    assert module.wemoe_hub.batch_reduce
    assert step() == pytest.approx(expected, rel=1e-5)  # output_init_std 0: exactly TA at 0.3
    assert any(not torch.equal(p, s) for p, s in zip(params, start, strict=True))


def test_time_interleaved_rotates_order_and_drops_warmup():
    calls: list[str] = []
    steps = {n: (lambda n=n: calls.append(n) or 0.0) for n in "abc"}
    times, order = fusion_speed.time_interleaved(steps, repeats=2, warmup=1)
    assert calls == list("abc" + "bca" + "cab")
    assert order == list("bcacab")
    assert {n: len(ts) for n, ts in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert all(t >= 0 for ts in times.values() for t in ts)
    summary = fusion_speed.speed_summary({"plain": [1.0, 3.0, 2.0], "x": [5.0, 4.0, 9.0]})
    assert summary["median_s"] == {"plain": 2.0, "x": 5.0}
    assert summary["ratio_vs_plain"] == {"x": 2.5}


@pytest.mark.parametrize("what", fusion_speed.STEPS)
def test_measure_memory_reports_consistent_peaks(problem, what):
    out = fusion_speed.measure_memory(problem, what)
    assert out["step"] == what
    assert out["peak_rss_bytes"] >= out["baseline_rss_bytes"] > 0
    step = out["step_peak_increase_bytes"]
    assert 0 <= step <= out["peak_rss_bytes"] - out["baseline_rss_bytes"]
    if what == "plain":
        assert 0 <= out["forward_peak_increase_bytes"] <= step
    else:
        assert out["build_peak_increase_bytes"] >= 0
        assert out["state_rss_increase_bytes"] <= step  # the step runs on top of the state
    json.dumps(out)


def test_peak_rss_sees_a_short_lived_allocation():
    with fusion_speed.PeakRSS() as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed
        del block
    assert rss.increase >= 48 * 2**20
    with fusion_speed.PeakRSS(baseline=rss.baseline - 10) as later:
        pass
    assert later.baseline == rss.baseline - 10 and later.increase >= 10


def test_measure_memory_rejects_an_unknown_step(problem):
    with pytest.raises(ValueError, match="unknown step"):
        fusion_speed.measure_memory(problem, "concrete")


def test_memory_bound_and_headline():
    mem = {
        "plain": {"forward_peak_increase_bytes": 50, "step_peak_increase_bytes": 80},
        "adamerging": {"step_peak_increase_bytes": 450, "build_peak_increase_bytes": 500},
        "wemoe": {"step_peak_increase_bytes": 451, "build_peak_increase_bytes": 10},
    }
    summary = fusion_speed.memory_summary(mem, tasks=6, nbytes=50)
    assert summary["bound_without_activations_bytes"] == 400
    assert summary["bound_bytes"] == 450
    assert summary["within_bound"] == {"adamerging": True, "wemoe": False}
    assert summary["step_peak_vs_bound"]["wemoe"] == pytest.approx(451 / 450)
    assert summary["build_peak_increase_bytes"] == {"adamerging": 500, "wemoe": 10}
    speed = fusion_speed.speed_summary({"plain": [2.0], "adamerging": [4.0], "wemoe": [4.2]})
    head = fusion_speed.headline(speed, summary)
    assert head["adamerging_step_vs_plain"] == 2.0
    assert list(head["targets"].values()) == [True, False, True, False]


def test_smile_report_counts_extra_parameters_by_the_formula(problem):
    batches = fusion_speed.fixed_batches(problem)
    configs = {"default": SmileConfig(), "wide": SmileConfig(gate_k=16, k=4)}
    report = fusion_speed.smile_report(problem, batches, repeats=1, configs=configs, warmup=0)
    body = sum(p.numel() for p in problem.body.parameters())
    for label, config in configs.items():
        expected = 0
        for name in select_linears(problem.body, problem.names, config):
            lin = problem.body.get_submodule(name)
            p = min(lin.in_features, lin.out_features)
            expected += extra_parameters(
                lin.in_features, lin.out_features, T, min(config.k, p), min(config.gate_k, p), True
            )
        got = report["configs"][label]
        assert got["extra_parameters"] == expected
        assert got["extra_relative"] == pytest.approx(expected / body)
        assert got["latency_vs_plain"] == pytest.approx(
            got["latency_per_batch_s"] / report["plain_latency_per_batch_s"]
        )
        assert got["latency_per_batch_s"] > 0
    assert not any(p.requires_grad for p in problem.body.parameters())


def test_results_file_and_config_are_json(problem, tmp_path):
    args = argparse.Namespace(repeats=2, threads=1, note="", out=tmp_path)
    config = fusion_speed.run_config(problem, args)
    params, nbytes = fusion_speed.model_bytes(problem)
    assert config["model_bytes"] == nbytes == 4 * params
    assert config["tasks"] == [t.name for t in problem.tasks]
    path = fusion_speed.write_results({"config": config}, tmp_path)
    assert re.fullmatch(r"fusion_speed-\d{8}T\d{6}Z\.json", path.name)
    assert json.loads(path.read_text())["config"]["repeats"] == 2

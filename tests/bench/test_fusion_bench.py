"""Fusion algorithms inside the benchmark: selected by default, run once, evaluated on test, and
the data they read recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.fake_pool import build_fake_pool, one_thread
from mergeforge.bench import runner
from mergeforge.bench.evaluate import make_evaluators
from mergeforge.bench.fusion_problem import ALGORITHM_SPLIT, problem_from_pool
from mergeforge.bench.grid import FUSION_FIXED, grid_for, select_methods
from mergeforge.fusion.registry import FUSION_REGISTRY


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    return build_fake_pool(tmp_path_factory.mktemp("pool"))


def test_every_fusion_algorithm_has_a_data_split_and_bench_settings() -> None:
    names = {s.name for s in FUSION_REGISTRY}
    assert names == set(ALGORITHM_SPLIT)
    assert set(FUSION_FIXED) <= names
    for s in FUSION_REGISTRY:
        s.make_config(grid_for(s.name)[0])  # the bench settings are valid configs


def test_fusion_algorithms_run_by_default_on_text_pools(pool) -> None:
    chosen, skipped = select_methods(pool)
    assert {s.name for s in FUSION_REGISTRY} <= {s.name for s in chosen}
    assert not set(skipped) & {s.name for s in FUSION_REGISTRY}


def test_problem_heads_reproduce_the_fine_tuned_models(pool) -> None:
    built = problem_from_pool(pool, "train", max_examples=8, batch_size=4)
    problem = built.problem
    assert built.data_note == "train inputs"
    val, _ = make_evaluators(pool)
    for task, expert, ev in zip(problem.tasks, problem.experts, val.tasks, strict=True):
        batch = task.unlabeled[0]
        with torch.no_grad():
            out = torch.func.functional_call(problem.body, expert, args=(), kwargs=batch)
            ours = task.head(out, batch)
        model = ev.model
        model.base_model.load_state_dict(expert, strict=False)
        with torch.no_grad():
            ref = model(**batch).logits
        torch.testing.assert_close(ours, ref)
        assert len(task.unlabeled) == 2 and task.labelled[0][1].shape == (4,)


def test_bench_runs_static_and_dynamic_fusion(pool, tmp_path: Path) -> None:
    grids = {"adamerging": [{"steps": 2, "lr": 0.01}], "wemoe": [{"steps": 2}],
             "smile": [{"gate_k": 2, "k": 4}], "regmean": [{"examples": 8}]}  # fmt: skip
    res = runner.run_bench(pool, list(grids), tmp_path / "out", progress=False, grids=grids)
    by = {}
    for r in res["records"]:
        by.setdefault(r["method"], []).append(r)
    assert set(by) == {"pretrained", "fine_tuned", *grids}
    for name, recs in by.items():
        if name in grids:
            assert len(recs) == len(pool.tasks)
            assert all(0.0 <= r["value"] <= 1.0 and r["val_value"] is None for r in recs)
            assert recs[0]["params"] == grids[name][0]
    assert "test inputs" in by["adamerging"][0]["data_used"]
    assert "train inputs" in by["regmean"][0]["data_used"]
    assert by["smile"][0]["data_used"].startswith("none")

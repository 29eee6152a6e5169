"""The benchmark runner on a tiny real pool: baselines, validation-only choice, resumption, errors."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from bench.fake_pool import build_fake_pool, one_thread
from mergeforge.bench import runner
from mergeforge.bench.evaluate import EvaluationError, Evaluator, load_encoder_state
from mergeforge.bench.grid import build_recipe, grid_for, not_applicable, select_methods
from mergeforge.bench.records import FORMAT, Candidate, RunRecord
from mergeforge.errors import MethodError, OutputError
from mergeforge.methods.registry import REGISTRY

TIMING = ("merge_s", "eval_s", "wall_s", "peak_rss_bytes")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    return build_fake_pool(tmp_path_factory.mktemp("pool"))


def _by(results: dict, method: str) -> dict[str, dict]:
    return {r["task"]: r for r in results["records"] if r["method"] == method}


def _untimed(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in results["records"]]


def test_bench_records_baselines_and_normalized(pool, tmp_path: Path) -> None:
    res = runner.run_bench(pool, ["task_arithmetic", "linear"], tmp_path / "out", progress=False)
    assert res["format"] == FORMAT
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == res
    assert [r["method"] for r in res["records"][::3]] == [
        "pretrained", "fine_tuned", "task_arithmetic", "linear"
    ]  # fmt: skip
    ft, pre = _by(res, "fine_tuned"), _by(res, "pretrained")
    assert set(ft) == set(pre) == {t.name for t in pool.tasks}
    assert all(r["normalized"] == 1.0 for r in ft.values())
    # the fake fine-tunes learn their keywords; the pretrained encoder cannot
    assert sum(r["value"] for r in ft.values()) > sum(r["value"] for r in pre.values()) + 0.5
    ta = _by(res, "task_arithmetic")
    for task, r in ta.items():
        assert r["normalized"] == pytest.approx(r["value"] / ft[task]["value"])
        assert r["params"] in grid_for("task_arithmetic")
        assert len(r["selection"]) == len(grid_for("task_arithmetic"))
        assert r["data_used"] == runner.DATA_USED_GRID
        assert r["merge_s"] > 0 and r["eval_s"] > 0 and r["peak_rss_bytes"] > 10**7
        RunRecord.from_json(r)  # the records contract reads it back
    assert _by(res, "linear")["task0"]["data_used"] == runner.DATA_USED_NONE
    info = res["run_info"]
    assert info["seed"] == 0 and info["pool_fingerprint"] == pool.fingerprint
    assert "torch" in info["versions"] and info["hardware"]["logical_cores"] >= 1
    assert "psutil" in info["peak_rss_method"]
    assert info["threads_per_job"] == torch.get_num_threads()  # results depend on it
    assert res["pool"]["tasks"][0]["sizes"] == {"train": 48, "validation": 24, "test": 24}
    assert not (tmp_path / "out" / "work").exists()


def test_same_seed_same_numbers(pool, tmp_path: Path) -> None:
    """dare_linear is stochastic: seeded merges and deterministic evaluation repeat exactly."""
    a = runner.run_bench(pool, ["dare_linear"], tmp_path / "a", seed=3, progress=False)
    b = runner.run_bench(pool, ["dare_linear"], tmp_path / "b", seed=3, progress=False)
    assert _untimed(a) == _untimed(b)
    assert all(r["seed"] == 3 for r in a["records"])


def test_resume_reuses_finished_methods(pool, tmp_path: Path, monkeypatch) -> None:
    real = runner.run_method_job
    ran: list[str] = []

    def dies_on_ties(job):
        ran.append(job.method)
        if job.method == "ties":
            raise RuntimeError("killed")
        return real(job)

    monkeypatch.setattr(runner, "run_method_job", dies_on_ties)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run_bench(pool, ["linear", "ties"], tmp_path, progress=False)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in partial["records"]} == {"pretrained", "fine_tuned", "linear"}
    assert (tmp_path / "runs" / "linear.json").is_file()

    ran.clear()
    monkeypatch.setattr(
        runner, "run_method_job", lambda job: (ran.append(job.method), real(job))[1]
    )
    monkeypatch.setattr(runner, "run_baselines", lambda *a: pytest.fail("baselines recomputed"))
    res = runner.run_bench(pool, ["linear", "ties"], tmp_path, progress=False)
    assert ran == ["ties"]
    assert _by(res, "linear") == _by(partial, "linear")
    # another grid (or seed) is another run: linear is recomputed
    ran.clear()
    runner.run_bench(pool, ["linear", "ties"], tmp_path, progress=False,
                     grids={"linear": [{"weight": 2.0}]})  # fmt: skip
    assert ran == ["linear"]


class _FakeVal:
    """Validation scores by call order; remembers each candidate's merged tensor."""

    def __init__(self, scores: list[float], key: str) -> None:
        self.scores, self.key, self.seen = scores, key, []

    def evaluate(self, state):
        self.seen.append(state[self.key].clone())
        return dict.fromkeys(("task0", "task1", "task2"), self.scores[len(self.seen) - 1])


class _FakeTest:
    """Test scores by which validation candidate's weights it is given."""

    def __init__(self, val: _FakeVal, scores: list[float]) -> None:
        self.val, self.scores = val, scores

    def evaluate(self, state):
        idx = next(i for i, t in enumerate(self.val.seen) if torch.equal(t, state[self.val.key]))
        return dict.fromkeys(("task0", "task1", "task2"), self.scores[idx])


def test_choice_uses_validation_not_test(pool, tmp_path: Path, monkeypatch) -> None:
    runner.run_bench(pool, [], tmp_path, progress=False)  # baselines, with the real evaluators
    grid = [{"weight": w} for w in (0.1, 0.4, 0.8)]
    key = next(iter(load_encoder_state(pool.base_dir)))
    val = _FakeVal([0.5, 0.9, 0.7], key)
    test = _FakeTest(val, [0.95, 0.6, 0.2])  # the best test point is the first one
    monkeypatch.setattr(runner, "evaluators", lambda p: (val, test))
    res = runner.run_bench(pool, ["task_arithmetic"], tmp_path, progress=False,
                           grids={"task_arithmetic": grid})  # fmt: skip
    ta = _by(res, "task_arithmetic")["task1"]
    assert ta["params"] == {"weight": 0.4}
    assert ta["value"] == 0.6 and ta["val_value"] == 0.9
    assert [c["val_avg"] for c in ta["selection"]] == pytest.approx([0.5, 0.9, 0.7])


def test_choose_takes_first_of_equal_scores() -> None:
    cands = [Candidate({"a": 1}, 0.5), Candidate({"a": 2}, 0.7), Candidate({"a": 3}, 0.7)]
    assert runner.choose(cands) == 1
    assert runner.choose([Candidate({}, 0.2)]) == 0


def test_every_grid_point_plans(pool) -> None:
    """Each applicable method's grid gives recipes the planner accepts on a real pool."""
    from mergeforge.config import parse_recipe
    from mergeforge.engine.merge import plan_recipe

    specs, skipped = select_methods(pool)
    assert {"passthrough", "slerp", "nuslerp", "arcee_fusion", "nearswap"} == set(skipped)
    assert "at most 1 model" in skipped["slerp"] and "opcm" in {s.name for s in specs}
    merges = [s for s in specs if s.name in {m.name for m in REGISTRY}]
    assert len(merges) == len(REGISTRY) - 5
    for spec in merges:
        for params in grid_for(spec.name):
            plan = plan_recipe(parse_recipe(build_recipe(pool, spec, params)))
            plan.close()


def test_recipe_layout(pool) -> None:
    spec = next(s for s in REGISTRY if s.name == "ties")
    recipe = build_recipe(pool, spec, {"weight": 1.0, "density": 0.2, "lambda": 0.6})
    assert recipe["base_model"] == str(pool.base_dir) and recipe["dtype"] == "float32"
    assert recipe["parameters"] == {"lambda": 0.6}
    assert recipe["models"][0] == {
        "model": str(pool.tasks[0].encoder_dir), "parameters": {"weight": 1.0, "density": 0.2}
    }  # fmt: skip
    linear = next(s for s in REGISTRY if s.name == "linear")
    assert "base_model" not in build_recipe(pool, linear, {"weight": 1.0})


def test_bad_methods_and_out(pool, tmp_path: Path) -> None:
    with pytest.raises(MethodError, match=r"unknown method\(s\) 'nope'.*task_arithmetic"):
        runner.run_bench(pool, ["nope"], tmp_path / "o", progress=False)
    with pytest.raises(MethodError, match="slerp: it merges at most 1 model"):
        runner.run_bench(pool, ["slerp", "linear"], tmp_path / "o", progress=False)
    with pytest.raises(MethodError, match="passthrough: it copies one model"):
        runner.run_bench(pool, ["passthrough"], tmp_path / "o", progress=False)
    spec = next(s for s in REGISTRY if s.name == "ties")
    assert not_applicable(spec, pool) is None
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        runner.run_bench(pool, ["linear"], f, progress=False)


def test_evaluator_checks_names_and_labels(pool) -> None:
    ev = Evaluator(pool, "validation")
    state = load_encoder_state(pool.base_dir)
    state["extra.weight"] = torch.zeros(2)
    del state["pooler.dense.bias"]
    with pytest.raises(EvaluationError, match=r"missing \['pooler.dense.bias'\].*unexpected"):
        ev.evaluate(state)
    own = ev.evaluate(None)  # each task's own encoder
    assert ev.evaluate(load_encoder_state(pool.task("task0").encoder_dir))["task0"] == own["task0"]
    assert ev.num_examples == 3 * 24
    import dataclasses

    from mergeforge.bench.pool import Split

    t0 = pool.tasks[0]
    bad = dataclasses.replace(t0.data, validation=Split(("apple",), (7,)))
    bad_pool = dataclasses.replace(pool, tasks=(dataclasses.replace(t0, data=bad),))
    with pytest.raises(EvaluationError, match=r"labels \[7\] are outside the range 0…1"):
        Evaluator(bad_pool, "validation")


def test_cli_bench(pool, tmp_path: Path, monkeypatch, capsys) -> None:
    from mergeforge import cli

    def get_pool(name: str, **kwargs: object):
        if name != "fake":
            raise MethodError(f"unknown pool {name!r}")
        return pool

    monkeypatch.setitem(sys.modules, "mergeforge.bench.pools",
                        types.SimpleNamespace(get_pool=get_pool))  # fmt: skip
    out = tmp_path / "o"
    rc = cli.main(["bench", "--pool", "fake", "--methods", "linear", "--out", str(out), "--quiet"])
    assert rc == 0
    assert {r["method"] for r in json.loads((out / "results.json").read_text())["records"]} == {
        "pretrained", "fine_tuned", "linear"
    }  # fmt: skip
    assert str(out) in capsys.readouterr().out
    assert cli.main(["bench", "--pool", "nope", "--out", str(out)]) == 2
    assert "unknown pool 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "--pool", "fake", "--methods", "x", "--out", str(out)]) == 2
    assert "known methods" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert cli.main(["bench", "--pool", "fake", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_causal_lm_pools_score_with_llm_eval(pool, monkeypatch) -> None:
    """A causal-LM pool is scored by bench.llm_eval: merged state once, own models per task."""
    import dataclasses

    from mergeforge.bench import evaluate, llm_eval

    calls = []

    def fake_evaluate_lm(model, p, split, tasks=None):
        calls.append((model if isinstance(model, Path) else "state", split, tasks))
        return {t: 0.5 for t in tasks or [t.name for t in p.tasks]}

    monkeypatch.setattr(llm_eval, "evaluate_lm", fake_evaluate_lm)
    lm_pool = dataclasses.replace(pool, kind="causal-lm")
    val, test = evaluate.make_evaluators(lm_pool)
    assert isinstance(val, evaluate.CausalLmEvaluator) and test.split == "test"
    assert val.evaluate({"w": torch.zeros(1)}) == dict.fromkeys(("task0", "task1", "task2"), 0.5)
    assert calls == [("state", "validation", None)]
    calls.clear()
    test.evaluate(None)
    assert calls == [(t.model_dir, "test", [t.name]) for t in pool.tasks]


def test_peak_rss_with_and_without_psutil(monkeypatch) -> None:
    with runner.PeakRss() as rss:
        block = bytearray(50 * 2**20)  # 50 MiB touched while sampled
        block[::4096] = b"x" * len(block[::4096])
        import time

        time.sleep(0.1)
    assert rss.peak > 50 * 2**20
    monkeypatch.setitem(sys.modules, "psutil", None)
    with runner.PeakRss() as fallback:
        pass
    assert fallback.peak >= rss.peak - 2**20  # lifetime peak (getrusage) covers the block


def test_clip_pools_use_the_clip_evaluator(pool, monkeypatch) -> None:
    import dataclasses

    from mergeforge.bench import clip_eval, evaluate

    class FakeClip:
        def __init__(self, p, split):
            self.pool, self.split = p, split

    monkeypatch.setattr(clip_eval, "ClipEvaluator", FakeClip)
    val, test = evaluate.make_evaluators(dataclasses.replace(pool, kind="image-classification"))
    assert isinstance(val, FakeClip) and (val.split, test.split) == ("validation", "test")

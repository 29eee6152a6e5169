"""Executors: a process pool, Dask and Ray (loopback clusters) give the same records as local."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from bench.fake_pool import build_fake_pool, one_thread
from mergeforge.bench import executors, runner
from mergeforge.errors import InterruptedMerge

METHODS = ["linear", "dare_ties"]  # dare_ties: a seeded stochastic merge
TIMING = ("merge_s", "eval_s", "wall_s", "peak_rss_bytes")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    return build_fake_pool(tmp_path_factory.mktemp("pool"), n_tasks=2, sizes=(32, 16, 16))


@pytest.fixture(scope="module")
def local(pool, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    res = runner.run_bench(pool, METHODS, tmp_path_factory.mktemp("local"), seed=5, progress=False)
    return _untimed(res)


def _untimed(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in results["records"]]


def _double(x: int) -> int:
    return 2 * x


def _fails(x: int) -> int:
    if x == 2:
        raise executors.ExecutorError("bad input 2")
    return x


def _interrupted(x: int) -> int:
    raise InterruptedMerge("the merge was interrupted by SIGTERM")


def test_local_executor_orders_and_failures() -> None:
    assert list(executors.execute([1, 2, 3], _double)) == [(1, 2), (2, 4), (3, 6)]
    out = dict(executors.execute([1, 2, 3], _fails))
    assert out[1] == 1 and out[3] == 3
    assert isinstance(out[2], executors.MethodFailed) and "bad input 2" in str(out[2])
    assert list(executors.execute([], _double, "ray")) == []
    with pytest.raises(InterruptedMerge):  # Ctrl-C / SIGTERM stops the sweep
        list(executors.execute([1], _interrupted))
    with pytest.raises(executors.ExecutorError, match="unknown executor 'spark'"):
        executors.execute([1], _double, "spark")
    with pytest.raises(executors.ExecutorError, match="--address"):
        executors.execute([1], _double, "local", address="tcp://127.0.0.1:1")


def test_missing_extra_names_the_pip_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(executors.ExecutorError, match=r"pip install 'mergeforge\[dask\]'"):
        list(executors.execute([1], _double, "dask"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(executors.ExecutorError, match=r"pip install 'mergeforge\[ray\]'"):
        list(executors.execute([1], _double, "ray"))


def test_failed_method_is_reported_and_sweep_goes_on(pool, tmp_path: Path) -> None:
    grids = {"ties": [{"weight": 1.0, "density": 0.2, "trim_scope": "galaxy"}]}
    res = runner.run_bench(pool, ["ties", "linear"], tmp_path, progress=False, grids=grids)
    assert "trim_scope" in res["run_info"]["failed_methods"]["ties"]
    assert {r["method"] for r in res["records"]} == {"pretrained", "fine_tuned", "linear"}


@pytest.mark.slow
def test_process_pool_matches_local(pool, local, tmp_path: Path) -> None:
    res = runner.run_bench(pool, METHODS, tmp_path, workers=2, seed=5, progress=False)
    assert _untimed(res) == local


@pytest.mark.slow
def test_dask_matches_local(pool, local, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    res = runner.run_bench(pool, METHODS, tmp_path, executor="dask", workers=2, seed=5,
                           progress=False)  # fmt: skip
    assert _untimed(res) == local
    assert res["run_info"]["executor"] == "dask"


@pytest.mark.slow
def test_ray_matches_local(pool, local, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    before = signal.getsignal(signal.SIGTERM)
    res = runner.run_bench(pool, METHODS, tmp_path, executor="ray", workers=2, seed=5,
                           progress=False)  # fmt: skip
    assert _untimed(res) == local
    assert signal.getsignal(signal.SIGTERM) is before  # ray's handlers do not outlive the sweep

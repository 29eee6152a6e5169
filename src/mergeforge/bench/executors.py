"""Where a sweep's methods run: this process, a local process pool, Dask or Ray.

The unit of work is one method (its whole grid and its test evaluation): ``fn(job)`` returns the
method's run-file dict. ``execute`` yields ``(job, result)`` as methods finish, in any order; a
method that fails with a ``MergeforgeError`` (a bad input the user can fix) yields a
:class:`MethodFailed` instead of stopping the sweep; any other exception, and an interrupted
merge (``InterruptedMerge``: Ctrl-C or SIGTERM), propagates.

- ``local``: in this process when ``workers == 1``, else a ``ProcessPoolExecutor`` (spawned
  processes: torch and fork do not mix).
- ``dask``: a ``distributed.LocalCluster`` of ``workers`` processes on 127.0.0.1 (one thread each,
  no dashboard), or the scheduler at ``address`` (``pip install 'mergeforge[dask]'``).
- ``ray``: ``ray.init(num_cpus=workers)`` without dashboard or usage stats, or the cluster at
  ``address`` (``pip install 'mergeforge[ray]'``).
Each worker process loads the pool's task models once and keeps them for its later methods.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from mergeforge.errors import InterruptedMerge, MergeforgeError

ExecutorName = Literal["local", "dask", "ray"]
EXECUTORS: tuple[ExecutorName, ...] = ("local", "dask", "ray")
J = TypeVar("J")
Result = Any


class ExecutorError(MergeforgeError):
    """An executor is unknown, not installed or cannot be reached."""


class MethodFailed(MergeforgeError):
    """A method's run stopped on a ``MergeforgeError`` (kept as its message, picklable)."""


def call_job(fn: Callable[[J], Result], job: J) -> Result:
    """``fn(job)``, or a :class:`MethodFailed` carrying the message of a ``MergeforgeError``.

    An interrupted merge (SIGINT/SIGTERM, ``InterruptedMerge``) stops the sweep instead."""
    try:
        return fn(job)
    except InterruptedMerge:
        raise
    except MergeforgeError as exc:
        return MethodFailed(str(exc))


def execute(
    jobs: Sequence[J],
    fn: Callable[[J], Result],
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
) -> Iterator[tuple[J, Result]]:
    """Run ``fn`` on every job with ``executor``; yield ``(job, result)`` as each finishes."""
    if executor not in EXECUTORS:
        raise ExecutorError(
            f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)} "
            "(local: this machine's processes; dask / ray: their clusters)"
        )
    if not jobs:
        return iter(())
    if executor == "local" and address is not None:
        raise ExecutorError(
            "--address names a Dask or Ray cluster; use it with --executor dask|ray"
        )
    if executor == "dask":
        return _dask(jobs, fn, workers, address)
    if executor == "ray":
        return _ray(jobs, fn, workers, address)
    if workers == 1:
        return ((job, call_job(fn, job)) for job in jobs)
    return _process_pool(jobs, fn, workers)


def _process_pool(
    jobs: Sequence[J], fn: Callable[[J], Result], workers: int
) -> Iterator[tuple[J, Result]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(call_job, fn, job): job for job in jobs}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _missing(extra: str, module: str) -> ExecutorError:
    return ExecutorError(
        f"--executor {extra} needs the {module!r} package, which is not installed; install it "
        f"with `pip install 'mergeforge[{extra}]'` or use --executor local"
    )


def _dask(
    jobs: Sequence[J], fn: Callable[[J], Result], workers: int, address: str | None
) -> Iterator[tuple[J, Result]]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise _missing("dask", "distributed") from None
    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")  # fmt: skip
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout=30)
        except OSError as exc:
            raise ExecutorError(
                f"cannot reach the Dask scheduler at {address!r} ({exc}); start one with "
                "`dask scheduler` and give its tcp://HOST:PORT, or leave --address out for a "
                "local cluster"
            ) from None
    try:
        futures = {client.submit(call_job, fn, job, pure=False): job for job in jobs}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _ray(
    jobs: Sequence[J], fn: Callable[[J], Result], workers: int, address: str | None
) -> Iterator[tuple[J, Result]]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise _missing("ray", "ray") from None
    _export_import_path()
    started = not ray.is_initialized()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if started:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(call_job)
        refs = {remote.remote(fn, job): job for job in jobs}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            yield refs.pop(done[0]), ray.get(done[0])
    finally:
        if started:
            ray.shutdown()
            for sig, handler in saved.items():  # ray.init installs its own; give the caller's back
                signal.signal(sig, handler)


def _export_import_path() -> None:
    """Put the directory mergeforge is imported from on ``PYTHONPATH`` for Ray's workers.

    Ray's worker processes inherit the environment, not ``sys.path``; a source checkout used
    through ``sys.path`` (pytest's ``pythonpath``) would otherwise not be importable there.
    """
    import mergeforge

    root = str(Path(mergeforge.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])

"""``measure_process``: wall time and peak memory of one subprocess and everything it starts.

What is measured (``MEASUREMENT`` holds the same words for results files):

- ``wall_s``: seconds from ``Popen`` to the child's exit (``Popen.wait``); interpreter start and
  imports are included.
- ``peak_rss_sampled_bytes``: the highest sum of RSS (anonymous + file-backed resident pages, so
  memory-mapped file pages count) over the process and all its descendants, sampled with psutil
  every ``interval_s`` on a thread.
- ``peak_anon_sampled_bytes``: the same sampling, RSS minus file-backed and shared pages.
- ``peak_hwm_bytes``: the largest kernel peak-RSS mark (``VmHWM`` in ``/proc/PID/status``) of any
  single process of the tree, read at every sample. The mark only grows, so it is exact up to the
  last sample before the exit, but it is not summed over processes.
- ``peak_rss_bytes``: the larger of the sampled sum and that mark.

Why not ``ru_maxrss`` from ``wait4``: Linux folds the RSS the child had *before* its exec (a copy
of this, possibly large, process) into it. ``Popen`` returns only after the exec, so no sample
sees that copy.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MEASUREMENT = {
    "wall_s": "seconds from Popen to the exit of the subprocess (Popen.wait), interpreter start "
    "and imports included, for every tool alike",
    "peak_rss_bytes": "max(peak_rss_sampled_bytes, peak_hwm_bytes)",
    "peak_rss_sampled_bytes": "highest sum of RSS (anonymous + file-backed resident pages, so "
    "memory-mapped input pages count) over the process and all its descendants, sampled with "
    "psutil on a thread",
    "peak_anon_sampled_bytes": "same sampling, RSS minus file-backed/shared pages (RssAnon)",
    "peak_hwm_bytes": "largest kernel peak-RSS mark (VmHWM in /proc/PID/status) of any single "
    "process of the tree, read at every sample: exact up to the last sample before exit, not "
    "summed over processes",
}


@dataclass(frozen=True)
class ProcessStats:
    """What :func:`measure_process` observed; ``output`` is the child's stdout + stderr."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    peak_rss_sampled_bytes: int
    peak_anon_sampled_bytes: int
    peak_hwm_bytes: int
    samples: int
    output: str


def _hwm(pid: int) -> int | None:
    """The kernel's peak-RSS mark (VmHWM) of ``pid`` in bytes, or None where /proc lacks it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def tree_sample(proc: object) -> tuple[int, int, int]:
    """(sum of RSS, sum of anonymous RSS, largest VmHWM) over ``proc`` (psutil) and descendants."""
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]  # type: ignore[attr-defined]
    except psutil.Error:
        return 0, 0, 0
    rss = anon = hwm = 0
    for p in procs:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        rss += info.rss
        anon += info.rss - getattr(info, "shared", 0)  # shared = file-backed + shmem pages
        hwm = max(hwm, _hwm(p.pid) or info.rss)
    return rss, anon, hwm


def measure_process(
    cmd: list[str], env: dict[str, str], log: Path, interval_s: float = 0.05
) -> ProcessStats:
    """Run ``cmd`` to completion with its output in ``log``, sampling its process tree."""
    import psutil

    peaks = [0, 0, 0, 0]  # rss, anon, hwm, samples
    stop = threading.Event()
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(child.pid)

        def sample() -> None:
            while not stop.is_set():
                for i, value in enumerate(tree_sample(ps)):
                    peaks[i] = max(peaks[i], value)
                peaks[3] += 1
                stop.wait(interval_s)

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        try:
            child.wait()
        finally:
            wall = time.perf_counter() - t0
            if child.poll() is None:  # interrupted: do not leave the tool running
                child.kill()
                child.wait()
            stop.set()
            sampler.join()
    rss, anon, hwm, samples = peaks
    return ProcessStats(
        child.returncode, wall, max(rss, hwm), rss, anon, hwm, samples,
        log.read_text(errors="replace"),
    )  # fmt: skip

"""The output directory appears only when complete; failures and signals leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import mergeforge.errors
from mergeforge.errors import InterruptedMerge, OutputError
from mergeforge.io import atomic_output_dir, clean_stale_siblings

SRC = Path(mergeforge.errors.__file__).resolve().parents[1]


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if ".mergeforge-" in p.name)


def test_success_renames_the_temporary_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out, overwrite=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.mergeforge-tmp-{os.getpid()}-")
        assert not out.exists()
        (tmp / "model.safetensors").write_text("weights")
    assert (out / "model.safetensors").read_text() == "weights"
    assert siblings(out) == []


def test_missing_parent_is_created(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(out, overwrite=False) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").exists()


def test_existing_directory_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with (
        pytest.raises(OutputError, match="exists; pass --overwrite to replace it"),
        atomic_output_dir(out, False),
    ):
        pytest.fail("the block must not run")
    assert siblings(out) == []


def test_output_path_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a dir")
    with (
        pytest.raises(OutputError, match="is not a directory"),
        atomic_output_dir(out, overwrite=True),
    ):
        pytest.fail("the block must not run")


def test_overwrite_replaces_the_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old output stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert siblings(out) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_removes_the_temporary_and_keeps_the_old(
    tmp_path: Path, exc: type[BaseException]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(exc), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "partial").write_text("x")
        raise exc()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert siblings(out) == []


def test_exception_without_previous_output_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError), atomic_output_dir(out, overwrite=False) as tmp:
        (tmp / "partial").write_text("x")
        raise ValueError
    assert not out.exists() and siblings(out) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_siblings_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    stale = tmp_path / f".out.mergeforge-tmp-{pid}-00ab"
    live = tmp_path / f".out.mergeforge-tmp-{os.getpid()}-00cd"
    other = tmp_path / f".other.mergeforge-tmp-{pid}-00ef"
    for d in (stale, live, other):
        (d / "sub").mkdir(parents=True)
    assert clean_stale_siblings(out) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_previous_output_moved_aside_by_a_crash_is_restored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    aside = tmp_path / f".out.mergeforge-old-{dead_pid()}-0001"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="exists"), atomic_output_dir(out, overwrite=False):
        pass
    assert (out / "old.txt").read_text() == "old" and siblings(out) == []


def test_sigterm_raises_interrupted_merge_in_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InterruptedMerge, match="SIGTERM"), atomic_output_dir(out, overwrite=False):
        os.kill(os.getpid(), signal.SIGTERM)
    assert not out.exists() and siblings(out) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# The child imports output_dir without running mergeforge/io/__init__.py (which imports torch),
# to start fast; output_dir itself needs only the standard library and mergeforge.errors.
CHILD = textwrap.dedent(
    """
    import signal, sys, time, types
    from pathlib import Path
    io_pkg = types.ModuleType("mergeforge.io")
    io_pkg.__path__ = [sys.argv[2]]
    sys.modules["mergeforge.io"] = io_pkg
    from mergeforge.io.output_dir import atomic_output_dir
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    with atomic_output_dir(Path(sys.argv[1]), overwrite=False) as tmp:
        (tmp / "partial.safetensors").write_bytes(b"0" * 1000)
        print("ready", flush=True)
        time.sleep(60)
    """
)


@contextlib.contextmanager
def child_in_atomic_dir(out: Path) -> Iterator[subprocess.Popen[str]]:
    """A subprocess sleeping inside ``atomic_output_dir(out)`` after writing a partial file."""
    pythonpath = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    args = [sys.executable, "-c", CHILD, str(out), str(SRC / "mergeforge" / "io")]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert len(siblings(out)) == 1
        yield proc
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize(
    ("sig", "error"), [(signal.SIGTERM, "InterruptedMerge"), (signal.SIGINT, "KeyboardInterrupt")]
)
def test_signal_to_a_writing_process_leaves_nothing(
    tmp_path: Path, sig: signal.Signals, error: str
) -> None:
    out = tmp_path / "out"
    with child_in_atomic_dir(out) as proc:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0 and error in stderr
    assert not out.exists() and siblings(out) == []


def test_sigkilled_process_leaves_a_temp_that_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with child_in_atomic_dir(out) as proc:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and len(siblings(out)) == 1
    with atomic_output_dir(out, overwrite=False) as tmp:
        assert siblings(out) == [tmp.name]
    assert out.is_dir() and siblings(out) == []

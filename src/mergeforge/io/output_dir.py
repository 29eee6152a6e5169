"""An output directory that appears only when complete.

:func:`atomic_output_dir` hands out a fresh temporary sibling of ``out_dir``
(``.NAME.mergeforge-tmp-PID-RANDOM``) and renames it to ``out_dir`` on success. On any exception,
Ctrl-C included, the temporary directory is removed and ``out_dir`` is left as it was. SIGTERM
and SIGHUP are turned into :class:`InterruptedMerge` so the same cleanup runs. A process killed
with SIGKILL cannot clean up; the next call removes temporary siblings whose PID is gone.

With ``overwrite`` the old directory is renamed aside (``.NAME.mergeforge-old-PID-RANDOM``), the
new one renamed into place, then the old one deleted: at every instant one complete version
exists. If a crash strikes between the two renames, the next call moves the old one back.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from mergeforge.errors import InterruptedMerge, OutputError

_HANDLED_SIGNALS = ("SIGTERM", "SIGHUP")


def _sibling(out_dir: Path, kind: str) -> Path:
    return (
        out_dir.parent / f".{out_dir.name}.mergeforge-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_siblings(out_dir: Path) -> list[Path]:
    """Remove temporary siblings of ``out_dir`` left by dead processes; returns what was removed.

    An ``old`` sibling (the previous output moved aside) is renamed back to ``out_dir`` when
    ``out_dir`` is missing, since the crash struck before the new output was in place.
    """
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.mergeforge-(tmp|old)-(\d+)-[0-9a-f]+")
    removed: list[Path] = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in sorted(out_dir.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m is None or not entry.is_dir() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out_dir.exists():
            with contextlib.suppress(OSError):  # if it cannot move back, leave it for the user
                entry.rename(out_dir)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _interrupted(signame: str) -> InterruptedMerge:
    return InterruptedMerge(
        f"the merge was interrupted by {signame}; its partial output is being removed and the "
        "output directory is left as it was. Run the merge again to produce it."
    )


@contextlib.contextmanager
def install_signal_handlers() -> Iterator[list[str]]:
    """Within the block, SIGTERM/SIGHUP raise :class:`InterruptedMerge` (once; repeats are
    ignored so cleanup can finish). Yields the list of signals received: a handler that fires
    inside a ``__del__`` or a callback has its exception swallowed by Python, so callers check
    the list before committing. Outside the main thread this does nothing."""
    fired: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signal.Signals(signum).name)
        raise _interrupted(fired[0])

    signums = [getattr(signal, n) for n in _HANDLED_SIGNALS if hasattr(signal, n)]
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield fired
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(
            f"output path {out_dir} exists and is not a directory; choose another output "
            "directory or remove that file."
        )
    if out_dir.exists() and not overwrite:
        raise OutputError(
            f"output directory {out_dir} exists; pass --overwrite to replace it or choose another "
            "directory."
        )
    if out_dir.parent.exists() and not out_dir.parent.is_dir():
        raise OutputError(f"the parent of output directory {out_dir} is not a directory.")


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: Path, overwrite: bool = False, *, handle_signals: bool = True
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block ends normally.

    Raises ``OutputError`` up front if ``out_dir`` is a file, or exists and ``overwrite`` is
    false. The parent is created if missing. With ``handle_signals`` SIGTERM/SIGHUP raise
    :class:`InterruptedMerge` inside the block (see :func:`install_signal_handlers`).
    """
    out_dir = Path(out_dir).expanduser().absolute()
    clean_stale_siblings(out_dir)
    _check_target(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(out_dir, "tmp")
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot create a directory next to {out_dir}: {e.strerror}.") from None
    guard = install_signal_handlers() if handle_signals else contextlib.nullcontext([])
    with guard as fired:  # also covers the cleanup, so a repeated SIGTERM does not cut it short
        try:
            yield tmp
            if fired:  # the handler's exception was swallowed somewhere (e.g. in a __del__)
                raise _interrupted(fired[0])
            _commit(tmp, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, and the directories themselves, to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    _fsync_tree(tmp)
    if out_dir.exists() and not overwrite:
        raise OutputError(
            f"output directory {out_dir} appeared while the merge ran; pass --overwrite to "
            "replace it or choose another directory."
        )
    aside = _sibling(out_dir, "old") if out_dir.exists() else None
    try:
        if aside is not None:
            out_dir.rename(aside)
        try:
            tmp.rename(out_dir)
        except BaseException:
            if aside is not None:
                aside.rename(out_dir)
            raise
    except OSError as e:
        raise OutputError(f"cannot move the finished output into {out_dir}: {e.strerror}.") from e
    _fsync(out_dir.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)

"""Exception hierarchy. Every error a user can cause is a ``MergeforgeError``.

The CLI prints ``str(error)`` as one paragraph and exits non-zero; no traceback. Messages name the
file, tensor or value at fault, say what is allowed, and how to fix it. Errors that collect several
problems (recipe validation, planning) list every problem at once.
"""

from __future__ import annotations

from collections.abc import Iterable


class MergeforgeError(Exception):
    """Base class of every error mergeforge raises on purpose."""

    exit_code: int = 2


class ProblemsError(MergeforgeError):
    """Several independent problems found in one pass, reported together."""

    def __init__(self, what: str, problems: Iterable[str]) -> None:
        self.what = what
        self.problems: tuple[str, ...] = tuple(problems)
        n = len(self.problems)
        head = f"{what}: {n} problem{'s' if n != 1 else ''} found"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


class RecipeError(ProblemsError):
    """The recipe (YAML) is malformed: unknown keys, bad types, unknown method or parameter."""


class PlanError(ProblemsError):
    """The inputs do not fit the recipe: missing tensors, shape or dtype mismatches, no base."""


class CheckpointError(MergeforgeError):
    """A checkpoint file is missing, corrupt, truncated, unsafe or of an unknown format."""


class NonFiniteError(MergeforgeError):
    """An input tensor holds NaN or Inf (an error unless the recipe opts in)."""


class OutputError(MergeforgeError):
    """The output directory cannot be written (exists without --overwrite, is a file, ...)."""


class MethodError(MergeforgeError):
    """A merge method was called with inputs it cannot handle."""


class PoolError(MergeforgeError):
    """A benchmark model pool or its task data cannot be built or loaded (missing file, bad column,
    labels outside a head's range, unknown pool name, ...)."""


class FusionError(MergeforgeError):
    """A data-driven or dynamic fusion algorithm cannot run or did not converge (a task without
    data, a head that does not fit the labels, models of different architectures, a NaN loss)."""


class InterruptedMerge(MergeforgeError):
    """The merge was stopped by a signal; the temporary output was removed."""

    exit_code = 130

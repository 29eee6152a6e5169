"""The results of a benchmark run: one record per method × task, as stored in ``results.json``.

``results.json`` is ``{"format": "mergeforge-bench/1", "pool": {...}, "run_info": {...},
"records": [RunRecord.to_json(), ...]}``; the leaderboard and the HTML report are made from it
alone, and a resumed run reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

FORMAT = "mergeforge-bench/1"
BASELINES = ("pretrained", "fine_tuned")


@dataclass(frozen=True)
class Candidate:
    """One point of a method's hyperparameter grid and its validation score (mean over tasks)."""

    params: Mapping[str, object]
    val_avg: float


@dataclass(frozen=True)
class RunRecord:
    """A method's result on one task.

    ``value``: the test metric; ``normalized``: ``value`` ÷ the ``fine_tuned`` baseline's test
    metric on the same task (the literature's normalized accuracy); ``params``: the recipe
    parameters chosen on the validation splits (``{}`` for baselines); ``selection``: every grid
    point tried with its validation score; ``val_value``: the chosen point's validation metric on
    this task (``None`` for a method run once: with nothing to choose, validation is skipped); timings and ``peak_rss_bytes`` are of the method's whole run (merge + evaluation
    of every candidate), repeated on each of its task records; ``data_used`` says which data the
    method saw (e.g. ``"validation labels (hyperparameter choice)"``).
    """

    method: str
    task: str
    metric: str
    value: float
    normalized: float
    val_value: float | None
    params: Mapping[str, object] = field(default_factory=dict)
    selection: Sequence[Candidate] = ()
    merge_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    data_used: str = ""
    seed: int = 0

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["params"] = dict(self.params)
        out["selection"] = [
            {"params": dict(c.params), "val_avg": c.val_avg} for c in self.selection
        ]
        return out

    @staticmethod
    def from_json(data: Mapping[str, object]) -> RunRecord:
        fields = dict(data)
        sel = fields.pop("selection", ()) or ()
        cands = tuple(Candidate(dict(c["params"]), float(c["val_avg"])) for c in sel)  # type: ignore[index]
        return RunRecord(**fields, selection=cands)  # type: ignore[arg-type]

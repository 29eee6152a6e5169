"""`merge_continual`: OPCM folded model by model on tiny Llama families, in constant memory."""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import pytest
import torch

from helpers import write_recipe
from mergeforge.engine.continual import WORK_DIR, merge_continual
from mergeforge.errors import MethodError, OutputError
from mergeforge.io import Checkpoint
from mergeforge.methods.opcm import opcm, rescale_factor
from models import load_state, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family("llama", tmp_path_factory.mktemp("llama"), 5, seed=3)


def _recipe(path: Path, base: Path, models: list[Path], extra: str = "") -> Path:
    listing = "".join(f"  - model: {m}\n" for m in models)
    text = f"merge_method: opcm\nbase_model: {base}\nmodels:\n{listing}{extra}"
    return write_recipe(path / "recipe.yml", text)


def _tv_norm(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((state[k] - base[k]).square().sum()) for k in base))


def _reference(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], alpha: float):
    """OPCM in memory, whole state dicts at once (FusionBench's loop, written out)."""
    merged, lam, norms = dict(models[0]), 1.0, [_tv_norm(models[0], base)]
    for x in models[1:]:
        norms.append(_tv_norm(x, base))
        merged = {
            k: opcm([x[k]], base[k], merged=merged[k], lambda_prev=lam, alpha=alpha, name=k)
            for k in base
        }
        lam, scale = rescale_factor(norms, _tv_norm(merged, base))
        merged = {k: base[k] + (v - base[k]) * scale for k, v in merged.items()}
    return merged


def test_three_models_end_to_end(tmp_path: Path, family) -> None:
    base, fts = family
    recipe = _recipe(tmp_path, base, fts[:3], "parameters:\n  alpha: 0.6\n")
    out = tmp_path / "out"
    result = merge_continual(recipe, out, progress=False, save_steps=True)
    assert {"config.json", "model.safetensors", "README.md", "steps"} <= set(result.files)
    assert not (out / WORK_DIR).exists()
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step-1", "step-2", "step-3"]
    b = load_state(base)
    merged = load_state(out)
    states = [load_state(f) for f in fts[:3]]
    # the rescale keeps the merged task vector at the mean norm of the individual ones
    mean = sum(_tv_norm(s, b) for s in states) / 3
    assert _tv_norm(merged, b) == pytest.approx(mean, rel=1e-5)
    expected = _reference(b, states, 0.6)
    for k, v in merged.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    step1, step3 = load_state(out / "steps" / "step-1"), load_state(out / "steps" / "step-3")
    assert all(torch.equal(step1[k], states[0][k]) for k in b)
    assert all(torch.equal(step3[k], merged[k]) for k in b)
    from transformers import AutoModelForCausalLM

    for path in (out, out / "steps" / "step-2"):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(model.model.norm.weight.detach(), load_state(path)["model.norm.weight"])
    assert "opcm" in (out / "README.md").read_text()


def test_one_model_is_that_model(tmp_path: Path, family) -> None:
    base, fts = family
    merge_continual(_recipe(tmp_path, base, fts[:1]), tmp_path / "out", progress=False)
    merged, first = load_state(tmp_path / "out"), load_state(fts[0])
    assert merged.keys() == first.keys()
    assert all(torch.equal(merged[k], first[k]) for k in first)


def test_order_matters(tmp_path: Path, family) -> None:
    base, fts = family
    a = merge_continual(_recipe(tmp_path, base, fts[:3]), tmp_path / "a", progress=False)
    (tmp_path / "recipe.yml").unlink()
    rev = list(reversed(fts[:3]))
    b = merge_continual(_recipe(tmp_path, base, rev), tmp_path / "b", progress=False)
    sa, sb = load_state(a.out_dir), load_state(b.out_dir)
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) > 1e-4


def test_sharded_running_merge_gives_the_same_result(tmp_path: Path, family) -> None:
    base, fts = family
    recipe = _recipe(tmp_path, base, fts[:3])
    one = merge_continual(recipe, tmp_path / "one", progress=False)
    many = merge_continual(recipe, tmp_path / "many", progress=False, shard_size=20_000)
    assert "model.safetensors.index.json" in many.files
    a, b = load_state(one.out_dir), load_state(many.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _ReadTracker:
    """Counts reads, the read tensors alive at once and the checkpoints holding open files."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        self.live = 0
        self.max_live = 0
        self.max_open = 0
        self.checkpoints: weakref.WeakSet[Checkpoint] = weakref.WeakSet()
        read, init = Checkpoint.read, Checkpoint.__init__

        def tracked_init(ck, *args, **kwargs) -> None:
            init(ck, *args, **kwargs)
            self.checkpoints.add(ck)

        def tracked_read(ck, name):
            tensor = read(ck, name)
            self.reads += 1
            self.live += 1
            self.max_live = max(self.max_live, self.live)
            self.max_open = max(self.max_open, sum(1 for c in self.checkpoints if c._fds))
            weakref.finalize(tensor, self._freed)
            return tensor

        monkeypatch.setattr(Checkpoint, "__init__", tracked_init)
        monkeypatch.setattr(Checkpoint, "read", tracked_read)

    def _freed(self) -> None:
        self.live -= 1


@pytest.mark.parametrize("k", [2, 5])
def test_memory_does_not_grow_with_the_number_of_models(
    tmp_path: Path, family, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    base, fts = family
    recipe = _recipe(tmp_path, base, fts[:k])
    tracker = _ReadTracker(monkeypatch)
    merge_continual(recipe, tmp_path / "out", progress=False)
    n = len(load_state(base))
    # each step reads base, running merge and incoming model once; the last pass base + running
    assert tracker.reads == 3 * (k - 1) * n + 2 * n
    assert tracker.max_live <= 3  # one tensor each of base, running merge, incoming model
    assert tracker.max_open <= 3  # base, running merge, incoming: earlier models are closed


def test_failure_leaves_no_output(tmp_path: Path, family, monkeypatch) -> None:
    base, fts = family

    def failing(norms, merged_norm):
        if len(norms) == 3:  # after the second step: step files and work files exist
            raise RuntimeError("boom")
        return rescale_factor(norms, merged_norm)

    monkeypatch.setattr("mergeforge.engine.continual.rescale_factor", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        merge_continual(_recipe(tmp_path, base, fts[:4]), out, progress=False, save_steps=True)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yml"]


def test_refuses_a_method_that_is_not_continual(tmp_path: Path, family) -> None:
    base, fts = family
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n"
    text += "    parameters:\n      weight: 1.0\n"
    with pytest.raises(MethodError, match="not a continual method"):
        merge_continual(write_recipe(tmp_path / "r.yml", text), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path: Path, family) -> None:
    base, fts = family
    (tmp_path / "out").mkdir()
    recipe = _recipe(tmp_path, base, fts[:2])
    with pytest.raises(OutputError, match="overwrite"):
        merge_continual(recipe, tmp_path / "out", progress=False)
    merge_continual(recipe, tmp_path / "out", progress=False, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_mergeforge_merge_dispatches_continual_methods(tmp_path: Path, family, capsys) -> None:
    from helpers import run_cli

    base, fts = family
    recipe = _recipe(tmp_path, base, fts[:2])
    out = tmp_path / "cli"
    assert run_cli("merge", recipe, out, "--quiet", "--save-steps") == 0
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step-1", "step-2"]
    direct = merge_continual(recipe, tmp_path / "direct", progress=False)
    got, want = load_state(out), load_state(direct.out_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)
    ties = write_recipe(
        tmp_path / "ties.yml",
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n"
        "    parameters: {weight: 1.0, density: 0.5}\n",
    )
    assert run_cli("merge", ties, tmp_path / "t", "--quiet", "--save-steps") != 0
    assert "--save-steps writes the running merge" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()

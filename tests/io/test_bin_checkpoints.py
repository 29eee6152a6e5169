"""Torch pickle checkpoints: weights_only loading, legacy format, wrappers, malicious pickles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mergeforge.errors import CheckpointError
from mergeforge.io import open_checkpoint


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(4, 3, generator=g),  # (4, 3)
        "h": torch.randn(5, generator=g).bfloat16(),
        "i": torch.arange(6, dtype=torch.int64),
        "t": torch.randn(3, 4, generator=g).t(),  # non-contiguous view, (4, 3)
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_round_trip(tmp_path: Path, legacy: bool, suffix: str) -> None:
    ref = sample()
    path = tmp_path / f"model{suffix}"
    torch.save(ref, path, _use_new_zipfile_serialization=not legacy)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "bin" and list(ckpt.tensors) == list(ref)
        for name, t in ref.items():
            info = ckpt.tensors[name]
            assert (info.dtype, info.shape, info.offset, info.file) == (
                t.dtype,
                tuple(t.shape),
                -1,
                path,
            )
            assert info.nbytes == t.numel() * t.element_size()
            got = ckpt.read(name)
            assert got.is_contiguous() and torch.equal(got, t)
        got = ckpt.read("w")
        got.zero_()
        assert torch.equal(ckpt.read("w"), ref["w"])


def test_directory_with_pytorch_model_bin(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.files == (tmp_path / "pytorch_model.bin",)
        assert ckpt.config == {"model_type": "gpt2"}


class _Payload:
    """A pickle whose unpickling would run a shell command creating a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "pytorch_model.bin"
    obj = {"w": torch.ones(2), "evil": _Payload(marker)}
    if kind == "raw-pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "contains code that weights_only loading refuses" in msg
    assert "not executed" in msg and "safetensors" in msg
    assert kind == "raw-pickle" or "posix.system" in msg  # names the refused global
    assert not marker.exists()


def test_single_state_dict_wrapper_is_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == ["w"]


def test_training_checkpoint_with_extra_keys_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 3}, path)
    with pytest.raises(
        CheckpointError, match=r"not a flat dict of tensors: key\(s\) 'model', 'epoch'"
    ):
        open_checkpoint(path)


def test_non_dict_pickle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save([torch.ones(3)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a dict of tensors"):
        open_checkpoint(path)


def test_garbage_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        open_checkpoint(path)


def test_truncated_zip_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)


def test_missing_bin_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.bin does not exist"):
        open_checkpoint(tmp_path / "missing.bin")

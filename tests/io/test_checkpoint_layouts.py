"""Which files a checkpoint path resolves to: HF directories, indexes, loose shards, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeforge.errors import CheckpointError
from mergeforge.io import open_checkpoint


def write_index(directory: Path, weight_map: dict[str, str], name: str) -> Path:
    path = directory / name
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def sharded_dir(tmp_path: Path) -> Path:
    """Two shards with an index; shard 2 also holds a tensor the index does not list."""
    save_file(
        {"b": torch.ones(2), "a": torch.zeros(3)}, tmp_path / "model-00001-of-00002.safetensors"
    )
    save_file(
        {"c": torch.full((2,), 3.0), "stray": torch.ones(1)},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    weight_map = {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    write_index(tmp_path, weight_map, "model.safetensors.index.json")
    return tmp_path


def test_single_file_directory_with_config(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with open_checkpoint(str(tmp_path)) as ckpt:
        assert ckpt.root == tmp_path and ckpt.files == (tmp_path / "model.safetensors",)
        assert ckpt.config == {"model_type": "llama", "hidden_size": 8}
        assert ckpt.config_path == tmp_path / "config.json"
        assert ckpt.index_path is None and "w" in ckpt and len(ckpt) == 1


def test_sharded_with_index_follows_the_weight_map(tmp_path: Path) -> None:
    root = sharded_dir(tmp_path)
    with open_checkpoint(root) as ckpt:
        assert ckpt.index_path == root / "model.safetensors.index.json"
        assert [f.name for f in ckpt.files] == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
        # file order, then offset order inside a file; the unlisted 'stray' is not included
        first = {n for n, i in ckpt.tensors.items() if i.file == ckpt.files[0]}
        assert first == {"a", "b"} and list(ckpt.tensors)[2:] == ["c"]
        offsets = [ckpt.tensors[n].offset for n in list(ckpt.tensors)[:2]]
        assert offsets == sorted(offsets)
        assert torch.equal(ckpt.read("c"), torch.full((2,), 3.0))


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    root = sharded_dir(tmp_path)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(root)
    msg = str(info.value)
    assert "model-00002-of-00002.safetensors" in msg and "model.safetensors.index.json" in msg
    assert "do not exist" in msg


def test_index_naming_a_tensor_absent_from_its_shard(tmp_path: Path) -> None:
    root = sharded_dir(tmp_path)
    weight_map = {
        "a": "model-00001-of-00002.safetensors",
        "ghost": "model-00002-of-00002.safetensors",
    }
    write_index(root, weight_map, "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match=r"'ghost' are in model-00002-of-00002.safetensors"):
        open_checkpoint(root)


def test_index_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match="cannot be parsed"):
        open_checkpoint(tmp_path)


def test_index_without_weight_map(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        open_checkpoint(tmp_path)


def test_loose_shards_without_index(tmp_path: Path) -> None:
    save_file({"x": torch.ones(1)}, tmp_path / "part-b.safetensors")
    save_file({"y": torch.ones(1)}, tmp_path / "part-a.safetensors")
    with open_checkpoint(tmp_path) as ckpt:
        assert [f.name for f in ckpt.files] == ["part-a.safetensors", "part-b.safetensors"]
        assert list(ckpt.tensors) == ["y", "x"]


def test_loose_shards_holding_the_same_tensor_twice(tmp_path: Path) -> None:
    save_file({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"x": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="'x' is in both"):
        open_checkpoint(tmp_path)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "safetensors" and torch.equal(ckpt.read("w"), torch.ones(1))


def test_sharded_bin_with_index(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(
        {"b": torch.zeros(2, dtype=torch.bfloat16)}, tmp_path / "pytorch_model-00002-of-00002.bin"
    )
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    write_index(tmp_path, weight_map, "pytorch_model.bin.index.json")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "bin" and list(ckpt.tensors) == ["a", "b"]
        assert ckpt.tensors["b"].dtype == torch.bfloat16 and ckpt.tensors["b"].offset == -1
        assert torch.equal(ckpt.read("b"), torch.zeros(2, dtype=torch.bfloat16))


def test_sharded_bin_index_naming_a_tensor_absent_from_its_shard(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "shard.bin")
    write_index(tmp_path, {"a": "shard.bin", "zz": "shard.bin"}, "pytorch_model.bin.index.json")
    with pytest.raises(CheckpointError, match=r"'zz' are in shard\.bin"):
        open_checkpoint(tmp_path)


def test_directory_without_weights_lists_its_content(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no weights found .*config\.json"):
        open_checkpoint(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "missing")


def test_unknown_file_extension(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"unknown extension '\.gguf'"):
        open_checkpoint(tmp_path / "weights.gguf")


def test_corrupt_config_json(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json cannot be parsed"):
        open_checkpoint(tmp_path)

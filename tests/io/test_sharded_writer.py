"""Sharded safetensors writing: layout, determinism, index, and checks on what is written."""

from __future__ import annotations

import gc
import json
import random
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeforge.errors import OutputError
from mergeforge.io import (
    INDEX_NAME,
    ShardedWriter,
    open_checkpoint,
    plan_layout,
    plan_shards,
    shard_file_names,
)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def model_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, generator=g)  # (16, 8)
    return {
        "embed.weight": x,  # 512 bytes
        "layers.0.attn.weight": x[:8].bfloat16(),  # 128 bytes
        "layers.0.norm.weight": torch.ones(3, dtype=torch.float16),  # 6 bytes, odd
        "layers.0.mlp.weight": x.double(),  # 1024 bytes
        "layers.1.fp8": x.to(torch.float8_e4m3fn),  # 128 bytes
        "layers.1.fp8b": x[:2].to(torch.float8_e5m2),  # 16 bytes
        "layers.1.ids": torch.arange(5, dtype=torch.int64),  # 40 bytes
        "layers.1.mask": torch.tensor([True, False, True]),  # 3 bytes
        "layers.1.u8": torch.tensor([1, 2, 250], dtype=torch.uint8),
        "layers.1.i32": torch.tensor([[-1, 2]], dtype=torch.int32),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 3),
    }


def entries_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def write_all(
    directory: Path, tensors: dict[str, torch.Tensor], shard_size: int, *, seed: int = 0
) -> ShardedWriter:
    directory.mkdir(exist_ok=True)
    names = list(tensors)
    random.Random(seed).shuffle(names)  # any order is accepted
    writer = ShardedWriter(directory, entries_of(tensors), shard_size, {"note": "x"})
    with writer, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: writer.write(n, tensors[n]), names))
    return writer


def test_plan_shards_counts_and_order() -> None:
    f32 = torch.float32
    entries = [("a", f32, (10,)), ("b", f32, (10,)), ("c", f32, (30,)), ("d", f32, (1,))]
    assert plan_shards(entries, 80) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(entries, 124) == [["a", "b"], ["c", "d"]]  # a shard may fill exactly
    assert plan_shards(entries, 10**9) == [["a", "b", "c", "d"]]
    assert plan_shards(entries, 1) == [["a"], ["b"], ["c"], ["d"]]  # oversize tensors stand alone
    assert plan_shards([], 10) == [[]]
    with pytest.raises(OutputError, match="positive"):
        plan_shards(entries, 0)


def test_shard_file_names() -> None:
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]


def test_single_shard_round_trips_through_safetensors_and_our_reader(tmp_path: Path) -> None:
    tensors = model_tensors()
    writer = write_all(tmp_path / "out", tensors, 10**9)
    path = tmp_path / "out" / "model.safetensors"
    assert (
        writer.file_names == ["model.safetensors"] and not (tmp_path / "out" / INDEX_NAME).exists()
    )
    assert path.stat().st_size == writer.shards[0].file_bytes
    loaded = load_file(path)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    with open_checkpoint(path) as ckpt:
        for name, ref in tensors.items():
            assert loaded[name].dtype == ref.dtype and as_bytes(loaded[name]) == as_bytes(ref)
            ours = ckpt.read(name)
            assert ours.shape == ref.shape and as_bytes(ours) == as_bytes(ref)
            assert ckpt.tensors[name].offset % ref.element_size() == 0  # aligned data


def test_header_is_padded_to_a_multiple_of_eight(tmp_path: Path) -> None:
    write_all(tmp_path / "out", model_tensors(), 10**9)
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8:9] == b"{"
    json.loads(raw[8 : 8 + n])


def test_sharded_output_index_and_shard_count(tmp_path: Path) -> None:
    tensors = model_tensors()
    writer = write_all(tmp_path / "out", tensors, 600)
    out = tmp_path / "out"
    expected_groups = plan_shards(entries_of(tensors), 600)
    assert len(expected_groups) == 4 and writer.file_names == shard_file_names(4)
    index = json.loads((out / INDEX_NAME).read_text())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"] == {"total_size": total}
    assert list(index["weight_map"]) == sorted(tensors)
    for file_name, names in zip(writer.file_names, expected_groups, strict=True):
        assert set(load_file(out / file_name)) == set(names)
        assert all(index["weight_map"][n] == file_name for n in names)
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.tensors) == set(tensors)
        for name, ref in tensors.items():
            assert as_bytes(ckpt.read(name)) == as_bytes(ref)


def test_output_bytes_are_deterministic(tmp_path: Path) -> None:
    tensors = model_tensors()
    write_all(tmp_path / "a", tensors, 600, seed=1)
    write_all(tmp_path / "b", tensors, 600, seed=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    layout = plan_layout(entries_of(tensors), 600, {"note": "x"})
    assert [s.file_bytes for s in layout] == [
        (tmp_path / "a" / s.file_name).stat().st_size for s in layout
    ]


def test_wrong_dtype_or_shape_is_rejected(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [("w", torch.float32, (2, 3))], 100)
    with pytest.raises(
        OutputError, match=r"'w'.*dtype torch.bfloat16.*planned dtype torch.float32"
    ):
        writer.write("w", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(
        OutputError, match=r"shape \(3, 2\), planned dtype torch.float32 shape \(2, 3\)"
    ):
        writer.write("w", torch.zeros(3, 2))
    with pytest.raises(OutputError, match="not among the planned outputs"):
        writer.write("v", torch.zeros(2, 3))
    writer.abort()


def test_non_contiguous_tensors_are_written_in_logical_order(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # (4, 3), strides (1, 4)
    with ShardedWriter(tmp_path, [("t", torch.float32, (4, 3))], 10**6) as writer:
        writer.write("t", t)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t)


def test_each_tensor_exactly_once(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [("a", torch.float32, (1,)), ("b", torch.float32, (1,))], 100)
    writer.write("a", torch.ones(1))
    with pytest.raises(OutputError, match="'a' was written twice"):
        writer.write("a", torch.ones(1))
    with pytest.raises(OutputError, match=r"1 planned tensor\(s\) were never written \('b'\)"):
        writer.close()


def test_invalid_entries(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="unique"):
        ShardedWriter(tmp_path, [("a", torch.float32, (1,)), ("a", torch.float32, (1,))], 100)
    with pytest.raises(OutputError, match="invalid shape"):
        ShardedWriter(tmp_path, [("a", torch.float32, (-1,))], 100)


def test_exception_inside_the_block_skips_the_completeness_check(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        ShardedWriter(tmp_path, [("a", torch.float32, (1,))], 100),
    ):
        raise RuntimeError("boom")
    assert not (tmp_path / INDEX_NAME).exists()


def test_writer_keeps_no_reference_to_written_tensors(tmp_path: Path) -> None:
    with ShardedWriter(tmp_path, [("a", torch.float32, (64, 64))], 10**6) as writer:
        t = torch.ones(64, 64)
        ref = weakref.ref(t)
        writer.write("a", t)
        del t
        gc.collect()
        assert ref() is None

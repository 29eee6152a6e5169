"""Reading safetensors files: bit-for-bit against the safetensors package, and every bad header."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeforge.errors import CheckpointError
from mergeforge.io import TensorInfo, open_checkpoint, rawio, read_safetensors_header

FIX = "truncated or corrupt; re-download or re-save it"


def as_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)  # (6, 5)
    return {
        "f64": x.double(),
        "f32": x,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "i64": torch.arange(-7, 8, dtype=torch.int64),
        "i32": torch.arange(11, dtype=torch.int32).reshape(1, 11),
        "i16": torch.tensor([-3, 4, 5], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "bool": torch.tensor([[True, False], [False, True]]),
        "fp8_e4m3": x.to(torch.float8_e4m3fn),
        "fp8_e5m2": x.to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 7),
        "odd_half": torch.arange(3, dtype=torch.float16),  # misaligns what follows if unsorted
    }


def test_reads_safetensors_package_files_bit_for_bit(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    raw = path.read_bytes()
    with open_checkpoint(path) as ckpt:
        assert ckpt.root == path and ckpt.files == (path,) and ckpt.format == "safetensors"
        assert ckpt.config is None and ckpt.config_path is None
        assert set(ckpt.tensors) == set(tensors)
        offsets = [info.offset for info in ckpt.tensors.values()]
        assert offsets == sorted(offsets)
        for name, ref in tensors.items():
            info = ckpt.tensors[name]
            assert isinstance(info, TensorInfo)
            assert (info.dtype, info.shape, info.file) == (ref.dtype, tuple(ref.shape), path)
            assert info.numel == ref.numel()
            assert info.nbytes == ref.numel() * ref.element_size()
            assert raw[info.offset : info.offset + info.nbytes] == as_bytes(ref)
            got = ckpt.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape and got.is_contiguous()
            assert as_bytes(got) == as_bytes(ref)
    assert read_safetensors_header(path).metadata == {"k": "v"}


def test_read_returns_a_fresh_tensor_that_owns_its_memory(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    with open_checkpoint(path) as ckpt:
        first = ckpt.read("w")
        assert first.untyped_storage().nbytes() == 64
        first.fill_(7.0)
        assert torch.equal(ckpt.read("w"), torch.ones(4, 4))


def test_read_in_chunks_when_a_tensor_exceeds_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rawio, "_CHUNK", 7)
    ref = torch.arange(101, dtype=torch.float32)
    path = tmp_path / "m.safetensors"
    save_file({"w": ref}, path)
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.read("w"), ref)


def test_concurrent_reads_from_threads(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((257,), float(i)) for i in range(64)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    names = list(tensors) * 4
    with open_checkpoint(path) as ckpt, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ckpt.read, names))
    for name, tensor in zip(names, got, strict=True):
        assert torch.equal(tensor, tensors[name])


def test_unknown_tensor_name_suggests_close_matches(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"model.layers.0.weight": torch.ones(1)}, path)
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match="Did you mean"):
        ckpt.read("model.layers.0.wieght")


def test_read_after_close_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1)}, path)
    ckpt = open_checkpoint(path)
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read("w")


def test_file_that_shrinks_after_opening_is_reported_on_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(100)}, path)
    with open_checkpoint(path) as ckpt:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size - 10)
        with pytest.raises(CheckpointError, match=r"only 390 of 400 bytes"):
            ckpt.read("w")


# ---- corrupt and malicious headers: each case names the file, tensor and problem ----


def write_raw(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.safetensors", "does not exist")


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(10), "b": torch.ones(10)}, path)
    path.write_bytes(path.read_bytes()[:-5])
    expect_error(path, "ending beyond the", FIX)


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    expect_error(path, "3 bytes long", FIX)


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"a": entry("F32", [1], 0, 4)}, length=10_000)
    expect_error(path, "header length 10000 is larger than", FIX)


def test_header_length_zero(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", b"{}", length=0)
    expect_error(path, "header length is 0")


def test_header_length_over_limit(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", b"{}", length=100_000_001)
    expect_error(path, "exceeds the 100 MB limit")


def test_header_not_json(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", b'{"a": {"dtype": "F32", ')
    expect_error(path, "not valid JSON", FIX)


def test_header_not_utf8(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", b'{"\xff\xfe": 1}')
    expect_error(path, "not valid UTF-8")


def test_header_not_an_object(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", [1, 2])
    expect_error(path, "JSON list, not an object")


def test_header_with_duplicate_tensor(tmp_path: Path) -> None:
    text = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    path = write_raw(tmp_path / "m.safetensors", text, b"\0\0")
    expect_error(path, "duplicate key 'a'")


def test_offsets_end_beyond_data(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("F32", [4], 0, 16)}, b"\0" * 12)
    expect_error(path, "tensor 'w'", "[0, 16]", "beyond the 12-byte data area", FIX)


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = write_raw(tmp_path / "m.safetensors", header, b"\0" * 12)
    expect_error(path, "'a' and 'b' overlap", FIX)


def test_size_differs_from_numel_times_itemsize(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("BF16", [3, 2], 0, 8)}, b"\0" * 8)
    expect_error(path, "tensor 'w'", "(8 bytes)", "6 x 2 = 12 bytes", FIX)


def test_begin_after_end(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("U8", [0], 4, 2)}, b"\0" * 8)
    expect_error(path, "tensor 'w'", "need 0 <= begin <= end")


def test_negative_dimension(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("U8", [-1], 0, 0)})
    expect_error(path, "tensor 'w'", "non-negative integers")


def test_missing_field(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)
    expect_error(path, "tensor 'w'", "no 'data_offsets' field")


def test_unknown_dtype(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("F13", [1], 0, 2)}, b"\0\0")
    expect_error(path, "tensor 'w'", "unknown dtype 'F13'", "BF16")


def test_metadata_must_map_strings_to_strings(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": {"n": 3}})
    expect_error(path, "__metadata__ must be an object mapping strings to strings")

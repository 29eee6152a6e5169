"""Synthetic "fine-tuned" Llama models for benchmarks, built once and cached on disk.

A model set is one base and K fine-tunes, each a Hugging Face directory (``config.json`` from a
real ``LlamaConfig`` + one ``model.safetensors``), so mergekit 0.1.5 accepts them. Tensor names
and shapes come from ``LlamaForCausalLM(config)`` on the ``meta`` device (no memory, no init);
the values are written straight to the file tensor by tensor, so building holds one tensor (plus
the base's memory-mapped pages) at a time, never a whole model:

- base: ``0.02 · N(0, 1)`` per element, norm weights ``1``;
- fine-tune i: ``base + 0.002 · N(0, 1)`` (the base tensor is read back from the base file), so
  task vectors are about 10% of the weights, like a light fine-tune.

Every tensor has its own generator seeded from sha256(seed, model index, tensor name), so a set
is reproducible. Sets live in ``<cache>/<sha256 of the build config, 16 hex>/{base,ft0,...}``;
a directory is renamed into place only when complete, so a crash never leaves a half set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

BUILD_VERSION = 1  # bump when the generation below changes: it is part of the cache key
SEED = 0
BASE_STD = 0.02
TASK_STD = 0.002
DEFAULT_CACHE = Path("~/.cache/mergeforge/bench/merge_speed").expanduser()

# Llama shapes per scale; parameter counts with untied embeddings: full 271.1M, small 29.2M,
# tiny 1.45M.
SCALES: dict[str, dict[str, int]] = {
    "full": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
             "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000},
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 16000},
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096},
}  # fmt: skip

Entry = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class ModelSet:
    """A cached base + fine-tunes and the facts a benchmark reports about them."""

    root: Path
    base: Path
    finetunes: tuple[Path, ...]
    scale: str
    model_config: dict[str, int]
    entries: tuple[Entry, ...]
    cache_hit: bool

    @property
    def param_count(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    @property
    def model_bytes(self) -> int:
        return 4 * self.param_count  # fp32

    @property
    def largest_tensor(self) -> str:
        return max(self.entries, key=lambda e: math.prod(e[1]))[0]

    @property
    def largest_tensor_bytes(self) -> int:
        return 4 * max(math.prod(shape) for _, shape in self.entries)

    def describe(self) -> dict[str, object]:
        """JSON-ready summary for a results file."""
        return {
            "scale": self.scale,
            "model_config": self.model_config,
            "param_count": self.param_count,
            "model_bytes": self.model_bytes,
            "tensors": len(self.entries),
            "largest_tensor": self.largest_tensor,
            "largest_tensor_bytes": self.largest_tensor_bytes,
            "models_dir": str(self.root),
            "cache_hit": self.cache_hit,
            "generation": f"base {BASE_STD}*N(0,1) (norms 1), fine-tune = base + {TASK_STD}*N(0,1)",
        }


def build_key(scale: str, k: int) -> str:
    """16 hex digits of sha256 over everything that determines the files."""
    spec = {"v": BUILD_VERSION, "model": SCALES[scale], "k": k, "seed": SEED,
            "base_std": BASE_STD, "task_std": TASK_STD}  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _llama_config(scale: str):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    config = LlamaConfig(
        **SCALES[scale], max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"  # written as "dtype" (transformers 5) in config.json
    return config


def state_entries(config) -> list[Entry]:  # config: transformers.LlamaConfig
    """(name, shape) of every saved tensor of ``LlamaForCausalLM(config)``, built on ``meta``."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _generator(model_index: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{SEED}/{model_index}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Base weights: ones for norm weights, else 0.02·N(0,1) from the tensor's own seed."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)  # shape
    return torch.randn(shape, generator=_generator(0, name)).mul_(BASE_STD)  # shape


def write_safetensors(
    path: Path, entries: list[Entry], make: Callable[[str, tuple[int, ...]], torch.Tensor]
) -> None:
    """A safetensors file of fp32 ``entries``: header first, then ``make(name, shape)`` in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in entries:
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in entries:
            t = make(name, shape).to(torch.float32).contiguous()  # shape
            f.write(t.numpy().tobytes())


def _build(tmp: Path, scale: str, k: int) -> None:
    from safetensors import safe_open

    config = _llama_config(scale)
    entries = state_entries(config)
    base = tmp / "base"
    base.mkdir(parents=True)
    config.save_pretrained(base)
    write_safetensors(base / "model.safetensors", entries, base_tensor)
    with safe_open(str(base / "model.safetensors"), framework="pt") as b:
        for i in range(k):
            ft = tmp / f"ft{i}"
            ft.mkdir()
            config.save_pretrained(ft)

            def finetune(name: str, shape: tuple[int, ...], i: int = i) -> torch.Tensor:
                noise = torch.randn(shape, generator=_generator(i + 1, name))  # shape
                return b.get_tensor(name).add_(noise, alpha=TASK_STD)

            write_safetensors(ft / "model.safetensors", entries, finetune)


def build_or_load(scale: str, cache: Path, k: int) -> ModelSet:
    """The cached set for (scale, k), built first if absent (atomic: built aside, renamed)."""
    root = Path(cache).expanduser() / build_key(scale, k)
    hit = (root / "build.json").is_file()
    if not hit:
        t0 = time.perf_counter()
        print(f"building {k} fine-tunes + base ({scale}) in {root} ...", flush=True)
        tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build(tmp, scale, k)
            manifest = {"scale": scale, "k": k, "model": SCALES[scale], "v": BUILD_VERSION}
            (tmp / "build.json").write_text(json.dumps(manifest, indent=2))
            try:
                os.rename(tmp, root)
            except OSError:  # another process finished the same set first
                if not (root / "build.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    with open(root / "base" / "config.json") as f:
        config = json.load(f)
    entries = _read_entries(root / "base" / "model.safetensors")
    return ModelSet(
        root, root / "base", tuple(root / f"ft{i}" for i in range(k)), scale,
        {key: config[key] for key in SCALES[scale]}, tuple(entries), hit,
    )  # fmt: skip


def _read_entries(path: Path) -> list[Entry]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return [(name, tuple(h["shape"])) for name, h in header.items()]


def model_files(models: ModelSet) -> list[Path]:
    """Every file of every model directory of the set."""
    return sorted(p for d in (models.base, *models.finetunes) for p in d.iterdir() if p.is_file())


def warm_page_cache(models: ModelSet, chunk: int = 64 << 20) -> dict[str, float | int]:
    """Read every input file once (into a reused buffer) so runs start with a warm page cache."""
    t0 = time.perf_counter()
    buf = bytearray(chunk)
    total = 0
    for path in model_files(models):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return {"bytes": total, "seconds": time.perf_counter() - t0}

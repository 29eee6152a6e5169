"""Accuracy of a (merged) CLIP vision tower on a CLIP pool's tasks, with the zero-shot heads.

FusionBench's ``CLIPVisionModelTaskPool``: the evaluated ``CLIPVisionModel`` replaces the pretrained
CLIP's vision tower; for image x and task t,

    v = P_vis · pooler(vision(x)),   logits_t(x) = s · W_t · v / ‖v‖,
    accuracy_t = (1/N_t) Σ_i [argmax_c logits_t(x_i)_c = y_i],

with ``W_t`` the task's zero-shot head and ``P_vis`` the pretrained ``visual_projection``
(``clip_build``); the positive scale ``s`` does not change the argmax and is left out.

Images are preprocessed as ``CLIPImageProcessor`` (slow, PIL) does with the base's
``preprocessor_config.json``: RGB, resize the shorter side to ``size`` (bicubic, the longer side
``⌊size·long/short⌋``), centre crop ``crop_size`` (offsets ``⌊(in − out)/2⌋``), ``x/255``, then
``(x − mean)/std``. Decoding and resizing run once per evaluator on a thread pool and the crops are
kept as uint8 (3·H·W bytes each); each ``evaluate`` only runs the vision tower, batched.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeforge.bench.clip_build import PROJECTION, VISION_PREFIX, load_heads
from mergeforge.bench.clip_pool import dataset_files, parquet_rows, read_json
from mergeforge.bench.evaluate import EvaluationError, SplitName, load_encoder_state, load_into
from mergeforge.bench.pool import Pool

DEFAULT_BATCH_SIZE = 128
REF = re.compile(r"^(\w+)\[(\d+)\]$")


@dataclass(frozen=True)
class ImagePrep:
    """The base's image preprocessing (``preprocessor_config.json``)."""

    size: int
    crop: tuple[int, int]
    """(height, width)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ImagePrep:
        """Read both the old (``size: 224``) and the new (``{"shortest_edge": 224}``) forms."""
        size, crop = cfg.get("size", 224), cfg.get("crop_size", 224)
        if isinstance(size, Mapping):
            size = size.get("shortest_edge", size.get("height"))
        if not isinstance(crop, Mapping):
            crop = {"height": crop, "width": crop}
        return cls(
            size=int(size),
            crop=(int(crop["height"]), int(crop["width"])),
            mean=tuple(float(x) for x in cfg["image_mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in cfg["image_std"]),  # type: ignore[arg-type]
            resample=int(cfg.get("resample", 3)),
        )

    def crop_image(self, data: bytes) -> torch.Tensor:
        """(3, H, W) uint8: the decoded image resized and centre-cropped."""
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
        img = img.resize((new_w, new_h), resample=Image.Resampling(self.resample))
        ch, cw = self.crop
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        img = img.crop((left, top, left + cw, top + ch))  # pads with zeros if smaller
        arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)  # (H·W·3,)
        return arr.view(ch, cw, 3).permute(2, 0, 1).contiguous()  # (3, H, W)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 → float ``(x/255 − mean)/std``."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std  # (B, 3, H, W)


def parse_refs(refs: Sequence[str], where: str) -> list[tuple[str, int]]:
    """``"train[12]"`` → ``("train", 12)`` for each row reference of a CLIP split."""
    out = []
    for r in refs:
        m = REF.match(r)
        if m is None:
            raise EvaluationError(f"{where}: {r!r} is not a row reference like 'test[12]'.")
        out.append((m.group(1), int(m.group(2))))
    return out


def read_image_bytes(files: Sequence[Path], rows: Sequence[int]) -> list[bytes]:
    """The encoded image of each global row (``rows`` index the files' rows concatenated)."""
    import pyarrow.parquet as pq

    counts = parquet_rows(list(files))
    starts = [sum(counts[:i]) for i in range(len(counts))]
    out: dict[int, bytes] = {}
    for f, start, n in zip(files, starts, counts, strict=True):
        local = [r - start for r in rows if start <= r < start + n]
        if not local:
            continue
        col = pq.read_table(f, columns=["image"]).column("image").take(local).to_pylist()
        for r, cell in zip(local, col, strict=True):
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if not data:
                raise EvaluationError(f"{f}: row {r} has no embedded image bytes.")
            out[start + r] = data
    missing = [r for r in rows if r not in out]
    if missing:
        raise EvaluationError(f"rows {missing[:5]} lie beyond the {sum(counts)} rows of {files}.")
    return [out[r] for r in rows]


def load_split_images(
    pool: Pool, task: str, refs: Sequence[str], prep: ImagePrep, threads: int
) -> torch.Tensor:
    """(N, 3, H, W) uint8 crops of the referenced rows, in ``refs`` order."""
    files = dataset_files(pool, task)
    parsed = parse_refs(refs, f"task {task!r}")
    data: list[bytes] = [b""] * len(parsed)
    for source in sorted({s for s, _ in parsed}):
        idx = [i for i, (s, _) in enumerate(parsed) if s == source]
        blobs = read_image_bytes(files[source], [parsed[i][1] for i in idx])
        for i, blob in zip(idx, blobs, strict=True):
            data[i] = blob
    if not data:
        return torch.empty(0, 3, *prep.crop, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=threads) as ex:
        return torch.stack(list(ex.map(prep.crop_image, data)))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ClipEvaluator:
    """Accuracy of every task of a CLIP ``pool`` on ``split`` for a given vision tower.

    ``limit``: only the first ``limit`` examples of each task's split; ``threads``: image
    decoding threads (default: every CPU); ``device``: default CUDA when available.
    """

    def __init__(
        self,
        pool: Pool,
        split: SplitName,
        *,
        limit: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device | None = None,
        threads: int | None = None,
    ) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from mergeforge.bench.finetune import _quiet

        _quiet()
        self.pool, self.split, self.batch_size = pool, split, batch_size
        self.device = torch.device(device) if device is not None else default_device()
        self.prep = ImagePrep.from_config(read_json(pool.root / "preprocessor_config.json"))
        heads = load_heads(pool.root)
        self.projection = heads[PROJECTION].to(self.device)  # (D, H)
        self.heads = {t.name: heads[f"head.{t.name}"].to(self.device) for t in pool.tasks}
        config = CLIPVisionConfig.from_pretrained(pool.base_dir)
        self.model = CLIPVisionModel(config).float().eval().to(self.device)
        self._load(load_encoder_state(pool.base_dir), "the pool's base")
        n = threads or os.cpu_count() or 1
        self.images: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        for t in pool.tasks:
            data = getattr(t.data, split)
            self.images[t.name] = load_split_images(pool, t.name, data.texts[:limit], self.prep, n)
            self.labels[t.name] = torch.tensor(data.labels[:limit], dtype=torch.long)  # (N,)

    def _load(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Load ``vision_model.*`` tensors into the tower, whichever names it uses itself."""
        own = set(self.model.state_dict())
        if set(state) != own:
            bare = {k.removeprefix(VISION_PREFIX): v for k, v in state.items()}
            if set(bare) == own:
                state = bare  # transformers ≥ 5 names a CLIPVisionModel's tensors unprefixed
        load_into(self.model, state, where=where)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) unit image embeddings ``v/‖v‖`` of uint8 crops, in batches."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = self.prep.normalize(images[start : start + self.batch_size].to(self.device))
            pooled = self.model(pixel_values=x).pooler_output  # (B, H)
            v = pooled @ self.projection.T  # (B, D)
            out.append(v / v.norm(dim=-1, keepdim=True))
        return torch.cat(out) if out else torch.empty(0, self.projection.shape[0])

    def evaluate(self, encoder_state: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        """``{task: accuracy}`` with ``encoder_state`` (``vision_model.*`` tensors) as the tower.

        ``None``: each task's own fine-tuned vision tower (the ``fine_tuned`` baseline).
        """
        out: dict[str, float] = {}
        for t in self.pool.tasks:
            state = encoder_state
            if state is None:
                state = load_encoder_state(t.encoder_dir)
            self._load(state, f"task {t.name!r}")
            labels = self.labels[t.name]
            if labels.numel() == 0:
                out[t.name] = 0.0
                continue
            logits = self.features(self.images[t.name]) @ self.heads[t.name].T  # (N, C)
            out[t.name] = float((logits.argmax(-1).cpu() == labels).float().mean())
        return out

    @property
    def num_examples(self) -> int:
        return sum(int(y.numel()) for y in self.labels.values())


_EVALUATORS: dict[tuple[str, str, str, int | None], ClipEvaluator] = {}


def evaluate_clip(
    encoder_state: Mapping[str, torch.Tensor] | None,
    pool: Pool,
    split: SplitName,
    *,
    limit: int | None = None,
) -> dict[str, float]:
    """``{task: accuracy}`` of a vision tower on ``pool``'s ``split`` (``None``: fine-tuned).

    The evaluator (decoded images, heads, model) is built once per process and reused.
    """
    key = (pool.fingerprint, str(pool.root), split, limit)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = ClipEvaluator(pool, split, limit=limit)
    return _EVALUATORS[key].evaluate(encoder_state)

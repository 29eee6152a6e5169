"""CLIP pools from a fake, tiny Hugging Face hub cache: lookup, splits, zero-shot heads, evaluation.

The cache holds a tiny random ``CLIPModel`` (with a hand-built byte-level CLIP tokenizer and an
old-style ``preprocessor_config.json`` as openai's repos have), two tiny fine-tuned
``CLIPVisionModel`` repos and two parquet datasets of random images, in the hub layout
(``<type>s--<org>--<name>/refs/main`` + ``snapshots/<rev>/``). Sockets raise throughout.
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import torch

from mergeforge.bench import clip_pool
from mergeforge.bench.clip_build import load_heads
from mergeforge.bench.clip_classnames import CLASSNAMES, TEMPLATES
from mergeforge.bench.clip_eval import ClipEvaluator, ImagePrep, evaluate_clip
from mergeforge.bench.clip_pool import ClipPoolSpec, get_spec, load_clip_pool
from mergeforge.bench.evaluate import load_encoder_state
from mergeforge.errors import PoolError

pytest.importorskip("PIL")
pytest.importorskip("pyarrow")

REV = "0123456789abcdef0123456789abcdef01234567"
TINY = ClipPoolSpec(
    "tiny-clip_TA2",
    "openai/tiny-clip",
    (("mnist", "tanganke/tiny-clip_mnist"), ("eurosat", "tanganke/tiny-clip_eurosat")),
)
PREPROCESSOR = {  # openai's old format: integer size / crop_size
    "crop_size": 32,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 32,
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def snapshot(cache: Path, repo_type: str, repo_id: str) -> Path:
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REV)
    snap = folder / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def clip_tokenizer() -> object:
    """A byte-level CLIP BPE tokenizer without merges: printable ASCII characters (+ ``</w>``)."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(seed: int = 0) -> object:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "num_attention_heads": 2,
            "vocab_size": 190,
            "max_position_embeddings": 77,
            "bos_token_id": 188,
            "eos_token_id": 189,
            "pad_token_id": 189,
        },
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def random_image(gen: torch.Generator, size: tuple[int, int], mode: str) -> bytes:
    from PIL import Image

    w, h = size
    channels = 3 if mode == "RGB" else 1
    pixels = torch.randint(0, 256, (h, w, channels), generator=gen, dtype=torch.uint8)
    img = Image.frombytes(mode, (w, h), bytes(pixels.flatten().tolist()))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, images: list[bytes], labels: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": None} for b in images], type=struct),
            "label": pa.array(labels, type=pa.int64()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_dataset(cache: Path, repo: str, folder: str, mode: str, size: tuple[int, int]) -> None:
    """20 train rows (one file) and 12 test rows (two files) of random images, labels 0…9."""
    snap = snapshot(cache, "dataset", repo)
    gen = torch.Generator().manual_seed(len(repo))

    def rows(n: int) -> tuple[list[bytes], list[int]]:
        labels = torch.randint(0, 10, (n,), generator=gen).tolist()
        return [random_image(gen, size, mode) for _ in range(n)], labels

    write_parquet(snap / folder / "train-00000-of-00001.parquet", *rows(20))
    write_parquet(snap / folder / "test-00000-of-00002.parquet", *rows(7))
    write_parquet(snap / folder / "test-00001-of-00002.parquet", *rows(5))
    (snap / "README.md").write_text("tiny")


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    cache = tmp_path_factory.mktemp("hf") / "hub"
    base = tiny_clip()
    snap = snapshot(cache, "model", TINY.base_repo)
    base.save_pretrained(snap)
    clip_tokenizer().save_pretrained(snap)  # type: ignore[attr-defined]
    (snap / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    for i, (_, repo) in enumerate(TINY.models):
        gen = torch.Generator().manual_seed(10 + i)
        state = {
            k: v + 0.05 * torch.randn(v.shape, generator=gen)
            for k, v in base.vision_model.state_dict().items()
        }
        snap = snapshot(cache, "model", repo)
        if i == 0:  # as transformers 5 saves a CLIPVisionModel: unprefixed names
            vision = CLIPVisionModel(base.config.vision_config)
            vision.load_state_dict(state)
            vision.save_pretrained(snap)
        else:  # as FusionBench's checkpoints (transformers 4): vision_model.* names
            config = base.config.vision_config
            config.architectures = ["CLIPVisionModel"]
            config.save_pretrained(snap)
            prefixed = {f"vision_model.{k}": v.contiguous() for k, v in state.items()}
            save_file(prefixed, str(snap / "model.safetensors"), metadata={"format": "pt"})
    write_dataset(cache, "ylecun/mnist", "mnist", "L", (28, 28))
    write_dataset(cache, "tanganke/eurosat", "data", "RGB", (48, 40))
    return cache


@pytest.fixture
def tiny_pool(fake_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network):
    monkeypatch.setitem(clip_pool.CLIP_POOLS, TINY.name, TINY)
    monkeypatch.setenv("HF_HOME", str(fake_cache.parent))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return load_clip_pool(TINY.name, cache_root=tmp_path / "pools", progress=False)


def test_pool_loads_from_the_cache_with_fusionbench_splits(tiny_pool, tmp_path) -> None:
    pool = tiny_pool
    assert pool.kind == "image-classification"
    assert [t.name for t in pool.tasks] == ["mnist", "eurosat"]
    base_names = set(load_encoder_state(pool.base_dir))
    assert base_names and all(k.startswith("vision_model.") for k in base_names)
    for task in pool.tasks:
        assert set(load_encoder_state(task.encoder_dir)) == base_names
        assert task.data.label_names == CLASSNAMES[task.name]
        assert (len(task.data.train), len(task.data.validation), len(task.data.test)) == (18, 2, 12)
    # validation = FusionBench's train_validation_split(fraction 0.1, seed 0): random_split
    _, val = torch.utils.data.random_split(
        range(20), [18, 2], generator=torch.Generator().manual_seed(0)
    )
    assert pool.tasks[0].data.validation.texts == tuple(f"train[{i}]" for i in val.indices)
    assert pool.tasks[0].data.test.texts[-1] == "test[11]"
    manifest = pool.root / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = load_clip_pool(TINY.name, cache_root=tmp_path / "pools", progress=False)
    assert again.fingerprint == pool.fingerprint and manifest.stat().st_mtime_ns == stamp


def test_zero_shot_head_is_the_normalized_mean_of_template_embeddings(
    tiny_pool, fake_cache
) -> None:
    from transformers import AutoTokenizer, CLIPModel

    snap = clip_pool.snapshot_dir(fake_cache, TINY.base_repo, "model")
    model = CLIPModel.from_pretrained(snap).eval()
    tok = AutoTokenizer.from_pretrained(snap)
    heads = load_heads(tiny_pool.root)
    for task in ("mnist", "eurosat"):
        rows = []
        for name in CLASSNAMES[task]:  # one class at a time, as FusionBench pads per class
            enc = tok([t.format(name) for t in TEMPLATES[task]], padding=True, return_tensors="pt")
            with torch.no_grad():
                e = model.text_projection(model.text_model(**enc).pooler_output)
            e = e / e.norm(dim=-1, keepdim=True)
            rows.append(e.mean(0) / e.mean(0).norm())
        torch.testing.assert_close(heads[f"head.{task}"], torch.stack(rows), atol=1e-5, rtol=1e-5)
        assert heads[f"head.{task}"].shape == (10, 16)
    torch.testing.assert_close(heads["visual_projection.weight"], model.visual_projection.weight)


def test_preprocessing_matches_clip_image_processor() -> None:
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    prep = ImagePrep.from_config(PREPROCESSOR)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    gen = torch.Generator().manual_seed(1)
    for size, mode in (((48, 40), "RGB"), ((28, 28), "L"), ((33, 70), "RGB")):
        data = random_image(gen, size, mode)
        ours = prep.normalize(prep.crop_image(data).unsqueeze(0))  # (1, 3, 32, 32)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        ref = hf(images=[img], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ImagePrep.from_config({**PREPROCESSOR, "size": {"shortest_edge": 32}}) == prep
    assert ImagePrep.from_config({**PREPROCESSOR, "crop_size": {"height": 32, "width": 32}}) == prep


def test_evaluation_matches_a_clip_model_reference(tiny_pool, fake_cache) -> None:
    from PIL import Image
    from transformers import CLIPModel

    from mergeforge.bench.clip_eval import load_split_images

    pool = tiny_pool
    fine = evaluate_clip(None, pool, "test")
    base = evaluate_clip(load_encoder_state(pool.base_dir), pool, "test")
    assert set(fine) == set(base) == {"mnist", "eurosat"}
    assert all(0.0 <= a <= 1.0 for a in (*fine.values(), *base.values()))
    own = load_encoder_state(pool.task("eurosat").encoder_dir)
    assert evaluate_clip(own, pool, "test")["eurosat"] == fine["eurosat"]
    # reference: the pretrained CLIPModel with the fine-tuned tower, FusionBench's logits
    snap = clip_pool.snapshot_dir(fake_cache, TINY.base_repo, "model")
    model = CLIPModel.from_pretrained(snap).eval()
    model.vision_model.load_state_dict({k.removeprefix("vision_model."): v for k, v in own.items()})
    task = pool.task("eurosat")
    prep = ImagePrep.from_config(PREPROCESSOR)
    pixels = prep.normalize(load_split_images(pool, "eurosat", task.data.test.texts, prep, 2))
    with torch.no_grad():
        v = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    head = load_heads(pool.root)["head.eurosat"]
    logits = (v / v.norm(dim=-1, keepdim=True)) @ head.T
    want = (logits.argmax(-1) == torch.tensor(task.data.test.labels)).float().mean().item()
    assert fine["eurosat"] == pytest.approx(want)
    assert Image  # PIL decoded the parquet images above


def test_evaluator_limit_and_validation_split(tiny_pool) -> None:
    ev = ClipEvaluator(tiny_pool, "validation", limit=1, device="cpu", threads=1)
    assert ev.num_examples == 2
    assert set(ev.evaluate(None)) == {"mnist", "eurosat"}


def test_missing_repos_are_listed_with_fetch_commands(tmp_path, monkeypatch, no_network) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    with pytest.raises(PoolError) as info:
        load_clip_pool("clip-vit-b32", cache_root=tmp_path / "pools")
    msg = str(info.value)
    spec = get_spec("clip-vit-base-patch32_TA8")
    assert "hf download openai/clip-vit-base-patch32" in msg
    for _, repo in spec.models:
        assert f"hf download {repo}" in msg
    for repo in ("tanganke/sun397", "tanganke/stanford_cars", "tanganke/dtd", "ylecun/mnist"):
        assert f"hf download {repo} --repo-type dataset" in msg
    assert 'ufldl-stanford/svhn --repo-type dataset --include "cropped_digits/*"' in msg
    assert "HF_HOME" in msg and str(tmp_path / "empty" / "hub") in msg
    assert msg.count("\n  - ") == 17
    assert not (tmp_path / "pools").exists()


def test_one_missing_dataset_is_named_alone(fake_cache, tmp_path, monkeypatch, no_network) -> None:
    import shutil

    cache = tmp_path / "hub"
    shutil.copytree(fake_cache, cache, symlinks=True)
    shutil.rmtree(cache / "datasets--tanganke--eurosat")
    (cache / "models--tanganke--tiny-clip_mnist" / "snapshots" / REV / "model.safetensors").unlink()
    monkeypatch.setitem(clip_pool.CLIP_POOLS, TINY.name, TINY)
    with pytest.raises(PoolError) as info:
        load_clip_pool(TINY.name, cache_dir=cache, cache_root=tmp_path / "pools")
    msg = str(info.value)
    assert msg.count("\n  - ") == 2
    assert "dataset tanganke/eurosat (task eurosat): not in the cache" in msg
    assert "model tanganke/tiny-clip_mnist: its snapshot" in msg and "holds no weights" in msg


def test_pool_names_and_aliases() -> None:
    assert get_spec("clip-vit-l14") is get_spec("clip-vit-large-patch14_TA8")
    spec = get_spec("clip-vit-base-patch32_TA8")
    assert spec.base_repo == "openai/clip-vit-base-patch32"
    assert spec.tasks == clip_pool.TA8_TASKS
    assert dict(spec.models)["stanford-cars"] == "tanganke/clip-vit-base-patch32_stanford-cars"
    with pytest.raises(PoolError, match="clip-vit-b32"):
        get_spec("clip-vit-huge")


def test_a_merged_encoder_evaluates(tiny_pool, tmp_path) -> None:
    """The pool's directories go through the merge engine as any encoder pool's do."""
    from mergeforge.bench.grid import build_recipe
    from mergeforge.config import parse_recipe
    from mergeforge.engine.merge import merge
    from mergeforge.methods.registry import get_method

    recipe = build_recipe(tiny_pool, get_method("task_arithmetic"), {"weight": 0.5})
    merge(parse_recipe(recipe), tmp_path / "merged", seed=0, progress=False)
    state = load_encoder_state(tmp_path / "merged")
    base = load_encoder_state(tiny_pool.base_dir)
    tasks = [load_encoder_state(t.encoder_dir) for t in tiny_pool.tasks]
    key = "vision_model.post_layernorm.weight"
    want = base[key] + 0.5 * sum(t[key] - base[key] for t in tasks)
    torch.testing.assert_close(state[key], want)
    scores = evaluate_clip(state, tiny_pool, "validation")
    assert set(scores) == {"mnist", "eurosat"} and all(0 <= a <= 1 for a in scores.values())

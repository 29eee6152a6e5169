"""Tokenizer/generation-config copying, deterministic JSON, sha256 and the model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from mergeforge.io import SIDE_FILES, copy_side_files, render_model_card, sha256_file, write_json


def test_copy_side_files_copies_only_present_ones(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.json").write_text('{"a": 1}')
    (src / "merges.txt").write_text("a b\n")
    (src / "generation_config.json").write_text("{}")
    (src / "model.safetensors").write_text("weights are not side files")
    blob = tmp_path / "blob"
    blob.write_text("sentencepiece")
    (src / "tokenizer.model").symlink_to(blob)  # as in the Hugging Face cache
    copied = copy_side_files(src, dst)
    assert copied == ["tokenizer.json", "merges.txt", "tokenizer.model", "generation_config.json"]
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    assert not (dst / "tokenizer.model").is_symlink()
    assert (dst / "tokenizer.model").read_text() == "sentencepiece"
    assert set(copied) <= set(SIDE_FILES)


def test_copy_side_files_from_a_directory_without_any(tmp_path: Path) -> None:
    assert copy_side_files(tmp_path, tmp_path) == []


def test_write_json_is_deterministic_and_keeps_key_order(tmp_path: Path) -> None:
    obj = {"z": 1, "a": [1, 2], "name": "héllo"}
    write_json(tmp_path / "a.json", obj)
    write_json(tmp_path / "b.json", dict(obj))
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert text == (tmp_path / "b.json").read_text(encoding="utf-8")
    assert text == '{\n  "z": 1,\n  "a": [\n    1,\n    2\n  ],\n  "name": "héllo"\n}\n'
    assert json.loads(text) == obj


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = bytes(range(256)) * (10 * 1024 + 3)  # about 2.5 MiB: several chunks and a remainder
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


RECIPE = "merge_method: ties\nmodels:\n  - model: ./a  # note ```\nparameters:\n  density: 0.5\n"


def card(**overrides: object) -> str:
    kwargs: dict[str, object] = {
        "recipe_yaml": RECIPE,
        "version": "0.1.0",
        "methods": [("ties", "https://arxiv.org/abs/2306.01708")],
        "inputs": [("./a/model.safetensors", "ab" * 32), ("./b/model.safetensors", "cd" * 32)],
        "opt_ins": ["crop embeddings to the smallest vocabulary"],
        "base_model": "./base",
    }
    kwargs.update(overrides)
    return render_model_card(**kwargs)  # type: ignore[arg-type]


def front_matter(text: str) -> dict[str, object]:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_front_matter_and_sections() -> None:
    text = card()
    assert front_matter(text) == {
        "library_name": "transformers",
        "tags": ["mergeforge", "merge"],
        "base_model": ["./base"],
    }
    for needle in (
        "## How it was made",
        "**ties** — [paper](https://arxiv.org/abs/2306.01708)",
        "## Recipe",
        "## Inputs",
        f"| `./a/model.safetensors` | `{'ab' * 32}` |",
        "## Opt-ins in effect (they change behaviour)",
        "- crop embeddings to the smallest vocabulary",
        "mergeforge 0.1.0",
    ):
        assert needle in text, needle
    assert text.endswith("\n") and card() == text


def test_model_card_recipe_block_survives_backticks() -> None:
    text = card()
    start = text.index("````yaml\n") + len("````yaml\n")
    end = text.index("\n````\n", start)
    assert yaml.safe_load(text[start:end]) == yaml.safe_load(RECIPE)


def test_model_card_without_base_or_opt_ins() -> None:
    text = card(base_model=None, opt_ins=[])
    assert "base_model" not in front_matter(text)
    opt_section = text.split("## Opt-ins in effect (they change behaviour)\n\n")[1]
    assert opt_section.startswith("none\n")

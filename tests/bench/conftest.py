"""Fixtures for bench tests: a tiny random BERT with a real (character-level) WordPiece tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase + string.digits)
    + [f"##{c}" for c in string.ascii_lowercase + string.digits]
)


def save_tokenizer(path: Path) -> None:
    """A lower-casing BERT tokenizer whose vocabulary is single characters (77 tokens)."""
    from transformers import BertTokenizerFast

    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(path)


def make_tiny_bert(path: Path, seed: int, **kwargs: object) -> Path:
    """``tests/models.make_bert`` with vocabulary 80 and a tokenizer saved next to it."""
    from models import make_bert

    out = make_bert(path, seed, vocab=80, **kwargs)  # type: ignore[arg-type]
    save_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``BertModel`` directory (hidden 32, 2 layers) with a tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=3)


@pytest.fixture(scope="session")
def bert_tools():
    """(make_tiny_bert, save_tokenizer), for tests that build their own models."""
    return make_tiny_bert, save_tokenizer

"""Files that travel with the weights: tokenizer and generation config, JSON, checksums."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from mergeforge.errors import OutputError

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)
SIDE_FILES: tuple[str, ...] = (*TOKENIZER_FILES, "generation_config.json")
_CHUNK = 1 << 20


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files and ``generation_config.json`` found in ``src_dir``.

    Symlinks (as in the Hugging Face cache) are followed: the content is copied. Returns the
    names copied, in :data:`SIDE_FILES` order.
    """
    copied: list[str] = []
    for name in SIDE_FILES:
        src = Path(src_dir) / name
        if not src.is_file():
            continue
        try:
            shutil.copyfile(src, Path(dst_dir) / name)
        except OSError as e:
            raise OutputError(
                f"cannot copy {src} to {dst_dir}: {e.strerror}; check free disk space and "
                "permissions."
            ) from None
        copied.append(name)
    return copied


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON: indent 2, keys in the object's own order, UTF-8, final newline.

    Deterministic: the same object always gives the same bytes. Sort keys before calling where
    order should not depend on construction (e.g. an index's weight map).
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}.") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()

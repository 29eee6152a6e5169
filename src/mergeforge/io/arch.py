"""Architecture knowledge as data: layer index patterns, layer-count keys, tied and vocab tensors.

Nothing here branches on a model type in code; adding an architecture means adding table rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# A tensor belongs to layer i when one of these patterns matches its name; group 1 is the index.
LAYER_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"(?:^|\.)layers\.(\d+)\.",  # Llama, Mistral, Qwen, Gemma, ...: model.layers.N.
        r"(?:^|\.)h\.(\d+)\.",  # GPT-2, GPT-J, Falcon, Bloom: transformer.h.N.
        r"(?:^|\.)layer\.(\d+)\.",  # BERT, RoBERTa, ELECTRA: encoder.layer.N.
        r"(?:^|\.)blocks?\.(\d+)\.",  # T5 (block.N), ViT-like (blocks.N)
    )
)

# config.json keys that hold the number of layers, first match wins (dotted = nested).
NUM_LAYERS_KEYS: tuple[str, ...] = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "text_config.num_hidden_layers",
)

# (output tensor, tensor it is tied to when the model's config ties word embeddings).
TIED_WEIGHTS: tuple[tuple[str, str], ...] = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
)

# Tensors outside the layers that come after them (final norm, heads): in a `slices:` recipe
# they are taken from the last slice's models; every other non-layer tensor from the first's.
POST_LAYER_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"^(?:model\.)?norm\.",  # Llama-style final norm
        r"(?:^|\.)ln_f\.",  # GPT-2 final norm
        r"(?:^|\.)final_layer_?norm\.",
        r"^lm_head\.",
        r"^(?:bert\.|roberta\.)?pooler\.",
        r"^classifier\.",
        r"^score\.",
        r"^cls\.",
    )
)

# Tensors whose first axis is the vocabulary (embeddings and output heads).
VOCAB_TENSOR_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"(?:^|\.)embed_tokens\.weight$",
        r"(?:^|\.)wte\.weight$",
        r"(?:^|\.)word_embeddings\.weight$",
        r"(?:^|\.)shared\.weight$",
        r"^lm_head\.weight$",
        r"^lm_head\.decoder\.weight$",
        r"^cls\.predictions\.decoder\.weight$",
        r"^cls\.predictions\.(?:decoder\.)?bias$",
    )
)


def layer_index(name: str) -> int | None:
    """Index of the layer a tensor belongs to, or ``None`` for pre/post-layer tensors."""
    for pat in LAYER_PATTERNS:
        m = pat.search(name)
        if m:
            return int(m.group(1))
    return None


def rename_layer(name: str, new_index: int) -> str:
    """``name`` with its layer index replaced by ``new_index`` (for layer slicing)."""
    for pat in LAYER_PATTERNS:
        m = pat.search(name)
        if m:
            return name[: m.start(1)] + str(new_index) + name[m.end(1) :]
    return name


def num_layers(config: Mapping[str, object] | None) -> int | None:
    """Number of layers from a config.json mapping, or ``None`` when no known key is present."""
    if not config:
        return None
    for key in NUM_LAYERS_KEYS:
        node: object = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, int) and not isinstance(node, bool):
            return node
    return None


def is_vocab_tensor(name: str) -> bool:
    """Whether the tensor's first axis indexes the vocabulary."""
    return any(p.search(name) for p in VOCAB_TENSOR_PATTERNS)


def ties_word_embeddings(config: Mapping[str, object] | None) -> bool:
    """Whether the config ties input and output embeddings (HF default: true)."""
    if not config:
        return False
    v = config.get("tie_word_embeddings")
    if v is None and isinstance(config.get("text_config"), Mapping):
        v = config["text_config"].get("tie_word_embeddings")  # type: ignore[union-attr]
    return True if v is None else bool(v)


def tied_source(name: str, available: Mapping[str, object]) -> str | None:
    """The tensor ``name`` is tied to, if that tensor is among ``available``."""
    for out, src in TIED_WEIGHTS:
        if out == name and src in available:
            return src
    return None


def is_post_layer(name: str) -> bool:
    """Whether a non-layer tensor belongs after the layers (final norm, output heads)."""
    return any(p.search(name) for p in POST_LAYER_PATTERNS)


def set_num_layers(config: dict, n: int) -> None:
    """Set the layer count in a config.json mapping (the first known key that is present)."""
    for key in NUM_LAYERS_KEYS:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None  # type: ignore[assignment]
        if isinstance(node, dict) and last in node:
            node[last] = n
            return

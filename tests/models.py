"""Tiny random Hugging Face models for tests, deterministic by seed.

Every test that needs a checkpoint on disk builds it here, in a temporary directory, so that no
test downloads anything. A *family* is one random base model plus "fine-tunes" of it: copies of the
base whose every floating-point parameter gets a small seeded Gaussian perturbation, so that task
vectors (fine-tune minus base) are small relative to the weights, as they are for real fine-tunes.

Models are saved with ``save_pretrained`` (safetensors, one file) and are small enough (hidden size
32, vocabulary 64, a few layers) that building a family takes well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

ModelKind = Literal["llama", "llama_tied", "gpt2", "bert", "bert_seqcls"]
MODEL_KINDS: tuple[ModelKind, ...] = ("llama", "llama_tied", "gpt2", "bert", "bert_seqcls")

# Relative size of a fine-tune's perturbation: each parameter p gets noise with standard deviation
# FINETUNE_SCALE * rms(p), so a task vector is about 5% of its weight, like a light fine-tune.
FINETUNE_SCALE = 0.05


def _quiet_transformers() -> None:
    """Silence transformers' per-call progress bars (they only add noise to test logs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _build_and_save(
    path: str | Path, seed: int, make_model: Callable[[], Any], dtype: torch.dtype
) -> Path:
    """Instantiate ``make_model()`` under a private RNG seeded with ``seed`` and save it."""
    _quiet_transformers()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_llama(
    path: str | Path,
    seed: int,
    *,
    tie_embeddings: bool = False,
    num_layers: int = 4,
    vocab: int = 64,
    hidden: int = 32,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random ``LlamaForCausalLM`` (hidden 32, 4 heads, 2 KV heads, MLP 48) saved at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _build_and_save(path, seed, lambda: LlamaForCausalLM(config), dtype)


def make_gpt2(
    path: str | Path,
    seed: int,
    *,
    num_layers: int = 2,
    vocab: int = 64,
    hidden: int = 32,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random ``GPT2LMHeadModel`` (tied ``lm_head``, 4 heads, 32 positions) saved at ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=num_layers,
        n_head=4,
        n_positions=32,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    return _build_and_save(path, seed, lambda: GPT2LMHeadModel(config), dtype)


def make_bert(
    path: str | Path,
    seed: int,
    *,
    head: Literal["model", "sequence_classification"] = "model",
    num_layers: int = 2,
    vocab: int = 64,
    hidden: int = 32,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random ``BertModel`` (``head="model"``) or ``BertForSequenceClassification`` (2 labels)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=32,
        type_vocab_size=2,
        num_labels=2,
        pad_token_id=0,
    )
    cls = BertModel if head == "model" else BertForSequenceClassification
    return _build_and_save(path, seed, lambda: cls(config), dtype)


def _auto_class(path: Path) -> Any:
    """The transformers class named in ``path/config.json`` (``architectures[0]``)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    return getattr(transformers, config.architectures[0])


def make_finetune(
    base: str | Path, path: str | Path, seed: int, *, scale: float = FINETUNE_SCALE
) -> Path:
    """Copy the model at ``base`` to ``path`` with every float parameter perturbed.

    p_ft = p + scale * rms(p) * z,  z ~ N(0, 1) drawn from a generator seeded with ``seed``,
    in the order of ``named_parameters()`` (tied parameters are perturbed once and stay tied).
    Buffers and integer tensors are copied unchanged.
    """
    _quiet_transformers()
    base_path = Path(base)
    model = _auto_class(base_path).from_pretrained(base_path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            rms = param.float().pow(2).mean().sqrt().clamp_min(1e-3)
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((noise * (scale * rms)).to(param.dtype))  # same shape as param
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def add_legacy_buffers(path: str | Path) -> list[str]:
    """Add the non-parameter buffers that older transformers versions saved, in place.

    Current transformers no longer write them, but hub checkpoints still carry them:
    GPT-2 ``transformer.h.{i}.attn.bias`` (float32 causal mask, (1, 1, n_pos, n_pos)) and
    ``attn.masked_bias`` (float32 scalar -1e4); BERT ``[bert.]embeddings.position_ids``
    (int64, (1, max_pos)); Llama ``model.layers.{i}.self_attn.rotary_emb.inv_freq``
    (float32, (head_dim // 2,)). Returns the names added.
    """
    import json

    from safetensors.torch import save_file

    p = Path(path)
    config = json.loads((p / "config.json").read_text())
    state = load_state(p)
    extra: dict[str, torch.Tensor] = {}
    model_type = config["model_type"]
    if model_type == "gpt2":
        n = config["n_positions"]
        mask = torch.tril(torch.ones(n, n)).view(1, 1, n, n)  # (1, 1, n_pos, n_pos)
        for i in range(config["n_layer"]):
            extra[f"transformer.h.{i}.attn.bias"] = mask.clone()
            extra[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    elif model_type == "bert":
        prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
        positions = torch.arange(config["max_position_embeddings"]).unsqueeze(0)  # (1, max_pos)
        extra[f"{prefix}embeddings.position_ids"] = positions
    elif model_type == "llama":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
        for i in range(config["num_hidden_layers"]):
            extra[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    else:
        raise ValueError(f"no legacy buffers known for model_type {model_type!r} in {p}")
    save_file({**state, **extra}, p / "model.safetensors", metadata={"format": "pt"})
    return sorted(extra)


def make_model(kind: ModelKind, path: str | Path, seed: int, **kwargs: Any) -> Path:
    """Build a random base model of ``kind`` (see ``MODEL_KINDS``) at ``path``."""
    if kind == "llama":
        return make_llama(path, seed, **kwargs)
    if kind == "llama_tied":
        return make_llama(path, seed, tie_embeddings=True, **kwargs)
    if kind == "gpt2":
        return make_gpt2(path, seed, **kwargs)
    if kind == "bert":
        return make_bert(path, seed, head="model", **kwargs)
    if kind == "bert_seqcls":
        return make_bert(path, seed, head="sequence_classification", **kwargs)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def make_family(
    kind: ModelKind,
    root: str | Path,
    n_finetunes: int,
    seed: int,
    *,
    scale: float = FINETUNE_SCALE,
    **kwargs: Any,
) -> tuple[Path, list[Path]]:
    """A base model at ``root/base`` and ``n_finetunes`` fine-tunes at ``root/ft{i}``.

    Fine-tune i is perturbed with seed ``seed * 1000 + i + 1``, so families with different seeds
    never share noise. Returns ``(base_dir, [ft_dirs])``.
    """
    root = Path(root)
    base = make_model(kind, root / "base", seed, **kwargs)
    finetunes = [
        make_finetune(base, root / f"ft{i}", seed * 1000 + i + 1, scale=scale)
        for i in range(n_finetunes)
    ]
    return base, finetunes


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in the safetensors checkpoint at ``path`` (a file, or a directory holding
    ``model.safetensors`` or shards listed in ``model.safetensors.index.json``)."""
    import json

    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file():
        return load_file(p)
    index = p / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        shard = load_file(p / name)
        overlap = state.keys() & shard.keys()
        if overlap:
            raise ValueError(f"tensor(s) {sorted(overlap)} appear in more than one shard of {p}")
        state.update(shard)
    return state

"""A tiny random HF model copied through our reader and sharded writer loads in transformers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mergeforge.io import ShardedWriter, copy_side_files, open_checkpoint, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    return model


def test_sharded_copy_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_llama(src, torch.bfloat16)
    out.mkdir()
    with open_checkpoint(src) as ckpt:
        entries = [(n, i.dtype, i.shape) for n, i in ckpt.tensors.items()]
        with ShardedWriter(out, entries, shard_size=4096) as writer:
            for name in reversed(list(ckpt.tensors)):
                writer.write(name, ckpt.read(name))
        assert ckpt.config is not None
        write_json(out / "config.json", ckpt.config)
    assert len(writer.file_names) > 2
    assert copy_side_files(src, out) == ["generation_config.json"]

    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name]), name

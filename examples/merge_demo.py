"""`make merge-demo`: merge three fine-tunes of a small Llama with TIES and inspect the result.

The models are synthetic (random base, fine-tunes = base + a seeded low-rank update per weight)
so the demo runs offline in seconds; the merge itself is exactly what `mergeforge merge` does on
real checkpoints. Steps: build the models, validate and plan the recipe, merge with a progress bar,
load the result with transformers and compare it with its inputs.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RECIPE = """\
merge_method: ties
base_model: {root}/base
models:
  - model: {root}/ft-0
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {root}/ft-1
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {root}/ft-2
    parameters: {{weight: [0.5, 1.0], density: 0.5}}   # a per-layer gradient
parameters:
  normalize: true
dtype: float32
"""


def build_models(root: Path) -> None:
    """A random 8-layer Llama base and three fine-tunes with low-rank task vectors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        ft = LlamaForCausalLM(cfg)
        state = {}
        for name, w in base.state_dict().items():
            if w.ndim == 2:  # rank-4 update, like a real fine-tune's low-rank task vector
                u = torch.randn(w.shape[0], 4, generator=g) * 0.02
                v = torch.randn(4, w.shape[1], generator=g) * 0.02
                w = w + u @ v
            state[name] = w
        ft.load_state_dict(state)
        ft.save_pretrained(root / f"ft-{i}")


def cli(*args: str, keep: int | None = None) -> None:
    """Run a mergeforge command; with ``keep``, show only its first and last ``keep`` lines."""
    print(f"\n$ mergeforge {' '.join(args)}", flush=True)
    cmd = [sys.executable, "-m", "mergeforge", *args]
    if keep is None:
        subprocess.run(cmd, check=True)
        return
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    if len(lines) > 3 * keep:
        lines = [*lines[: 2 * keep], f"... ({len(lines) - 3 * keep} more lines)", *lines[-keep:]]
    print("\n".join(lines), flush=True)


def compare(root: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = merged(ids).logits
        print("\nloaded the merged model with transformers; distance of its logits to each input:")
        for name in ("base", "ft-0", "ft-1", "ft-2"):
            other = AutoModelForCausalLM.from_pretrained(root / name)
            d = (other(ids).logits - out).norm() / out.norm()
            print(f"  {name:5s}  relative L2 = {d:.4f}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mergeforge-demo-") as tmp:
        root = Path(tmp)
        print(f"building a base and 3 fine-tunes (synthetic, 8-layer Llama) in {root}")
        build_models(root)
        recipe = root / "ties.yaml"
        recipe.write_text(RECIPE.format(root=root))
        print(f"\nrecipe {recipe}:\n{recipe.read_text()}")
        cli("validate", str(recipe))
        cli("plan", str(recipe), keep=5)
        cli("merge", str(recipe), str(root / "merged"), "--memory-budget", "1GB")
        print("\noutput files:", ", ".join(sorted(p.name for p in (root / "merged").iterdir())))
        compare(root)


if __name__ == "__main__":
    main()

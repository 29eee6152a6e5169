"""`extract-lora`: a PEFT LoRA adapter from the difference between a fine-tune and its base.

For every 2-D weight of a linear layer, ΔW = W_tuned − W_base (fp32) is replaced by its best
rank-r approximation (Eckart–Young–Mirsky; Eckart & Young, "The approximation of one matrix by
another of lower rank", Psychometrika 1936): with the thin SVD ΔW = U S Vᵀ,

    B = U[:, :r] · √S[:r]   (out, r)        A = √S[:r] · Vᵀ[:r]   (r, in)

so that B·A = U_r S_r V_rᵀ, and ‖ΔW − B·A‖_F = ‖S[r:]‖₂ (the tail of the singular values). This
is mergekit-extract-lora's default split (``--distribute-scale``). ``lora_alpha = r`` per module,
so PEFT's scaling alpha/r is 1. Embeddings (opt-in) use PEFT's ``lora_embedding_A/B``, whose
product is transposed: B_e·A_e = ΔWᵀ.

Tensors are read one pair at a time; only the (small) factors are held until the adapter is
written into a temporary sibling of OUT and renamed into place. Tensors that changed but are not
captured by the adapter (biases, norms, excluded embeddings/heads, filtered-out layers) are
reported, not silently dropped.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeforge.engine.output import check_output_dir
from mergeforge.errors import PlanError
from mergeforge.io import Checkpoint, ShardedWriter, atomic_output_dir, open_checkpoint, write_json

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
EMBEDDING = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|embed_positions)\.weight$"
)
HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)(?:\.decoder)?\.weight$")
# Model types whose linear layers are transformers' Conv1D (weight stored (in, out)).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt")
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


@dataclass(frozen=True)
class Target:
    """One module to factorize: its weight tensor name and whether it is an embedding."""

    name: str
    embedding: bool

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def kind(self) -> str:
        return self.module.rsplit(".", 1)[-1]


@dataclass
class Factors:
    """The LoRA factors of one module and its squared errors (for per-kind aggregation)."""

    target: Target
    a: torch.Tensor  # (r, in), or (r, vocab) for an embedding
    b: torch.Tensor  # (out, r), or (dim, r) for an embedding
    err_sq: float  # ‖ΔW − B·A‖_F²
    norm_sq: float  # ‖ΔW‖_F²

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction wrote: per-kind and total relative errors, and what it left out."""

    out_dir: Path
    modules: int
    rank: int
    kind_errors: dict[str, float]
    total_error: float
    not_captured: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with B·A the best rank-≤``rank`` approximation of ``delta`` (out, in), in fp32.

    The rank is min(``rank``, numerical rank), the numerical rank counting singular values above
    σ_max · max(out, in) · eps(fp32) (as ``torch.linalg.matrix_rank``); 0 gives empty factors.
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (o,k) (k,) (k,i)
    tol = (s[0] if s.numel() else 0.0) * max(delta.shape) * torch.finfo(torch.float32).eps
    r = min(rank, int((s > tol).sum()))
    root = s[:r].sqrt()  # (r,)
    return u[:, :r] * root, root[:, None] * vh[:r]  # (o, r), (r, i)


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    out_dir: str | Path,
    *,
    rank: int,
    include: str | None = None,
    exclude: str | None = None,
    include_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> ExtractResult:
    """Write the PEFT adapter of ``tuned − base`` at rank ≤ ``rank`` into ``out_dir``."""
    t0 = time.perf_counter()
    if rank < 1:
        raise PlanError("extract-lora", [f"--rank must be at least 1, got {rank}"])
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    filters = _compile("--include", include), _compile("--exclude", exclude)
    with open_checkpoint(base) as bck, open_checkpoint(tuned) as tck:
        _check_pair(bck, tck)
        targets, skipped = _select(bck, filters, include_embeddings)
        factors, unchanged = _factorize_all(bck, tck, targets, rank, dtype)
        if not factors:
            raise PlanError(
                "extract-lora",
                [f"no selected linear weight differs between {bck.root} and {tck.root}; "
                 "check the model paths and the --include/--exclude filters"],
            )  # fmt: skip
        not_captured = _changed(bck, tck, skipped)
        report = _report(factors, rank, not_captured, unchanged)
        with atomic_output_dir(out, overwrite) as tmp:
            _write_adapter(tmp, factors)
            config = adapter_config(factors, bck, str(base))
            write_json(tmp / "adapter_config.json", config)
            write_json(tmp / "extraction.json", report)
    return ExtractResult(
        out, len(factors), config["r"], report["kinds"], report["total_rel_error"],
        [(n, why) for n, why in not_captured], time.perf_counter() - t0,
    )  # fmt: skip


def _compile(flag: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PlanError("extract-lora", [f"{flag} {pattern!r} is not a valid regex: {e}"]) from None


def _check_pair(base: Checkpoint, tuned: Checkpoint) -> None:
    """Both checkpoints must hold the same tensor names with the same shapes."""
    problems: list[str] = []
    for a, b in ((base, tuned), (tuned, base)):
        extra = sorted(set(a.tensors) - set(b.tensors))
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            shown = ", ".join(map(repr, extra[:5])) + more
            problems.append(f"{a.root} has {len(extra)} tensor(s) that {b.root} lacks: {shown}")
    for name, info in base.tensors.items():
        other = tuned.tensors.get(name)
        if other is not None and other.shape != info.shape:
            problems.append(
                f"tensor {name!r} has shape {list(info.shape)} in {base.root} but "
                f"{list(other.shape)} in {tuned.root}"
            )
    model_type = (base.config or {}).get("model_type")
    if model_type in CONV1D_MODEL_TYPES:
        problems.append(
            f"{base.root} is a {model_type} model, whose linear layers are Conv1D (weights stored "
            "transposed, PEFT fan_in_fan_out); extract-lora supports nn.Linear models only"
        )
    if problems:
        raise PlanError(
            "extract-lora inputs (BASE and TUNED must be the same architecture: a model and a "
            "fine-tune of it)",
            problems,
        )


def _select(
    base: Checkpoint,
    filters: tuple[re.Pattern[str] | None, re.Pattern[str] | None],
    include_embeddings: bool,
) -> tuple[list[Target], dict[str, str]]:
    """Targets to factorize, and every other tensor with why it is not a target."""
    include, exclude = filters
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    for name, info in base.tensors.items():
        embedding = bool(EMBEDDING.search(name))
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(info.shape) != 2:
            skipped[name] = "not a 2-D weight (bias, norm or buffer)"
        elif not info.dtype.is_floating_point:
            skipped[name] = "not a floating-point tensor"
        elif (embedding or HEAD.search(name)) and not include_embeddings:
            skipped[name] = "embedding or output head (pass --include-embeddings)"
        elif (include and not include.search(module)) or (exclude and exclude.search(module)):
            skipped[name] = "filtered out by --include/--exclude"
        else:
            targets.append(Target(name, embedding))
    return targets, skipped


def _factorize_all(
    base: Checkpoint, tuned: Checkpoint, targets: list[Target], rank: int, dtype: torch.dtype
) -> tuple[list[Factors], list[str]]:
    """Factors of every target whose ΔW is not (numerically) zero; names of the unchanged."""
    factors: list[Factors] = []
    unchanged: list[str] = []
    for t in targets:
        delta = tuned.read(t.name).float() - base.read(t.name).float()  # (out, in)
        if t.embedding:
            delta = delta.T  # (dim, vocab): PEFT's embedding delta is (B·A)ᵀ
        b, a = factorize(delta, rank)
        if a.shape[0] == 0:
            unchanged.append(t.name)
            continue
        b, a = b.to(dtype), a.to(dtype)
        err = delta - b.float() @ a.float()  # (out, in), error of the stored factors
        factors.append(Factors(t, a, b, float(err.square().sum()), float(delta.square().sum())))
    return factors, unchanged


def _changed(base: Checkpoint, tuned: Checkpoint, skipped: dict[str, str]) -> list[tuple[str, str]]:
    """Non-target tensors that differ between the models: the adapter does not carry them."""
    return [
        (name, why) for name, why in skipped.items()
        if not torch.equal(base.read(name), tuned.read(name))
    ]  # fmt: skip


def _rel(err_sq: float, norm_sq: float) -> float:
    return math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0


def _report(
    factors: list[Factors], rank: int, not_captured: list[tuple[str, str]], unchanged: list[str]
) -> dict:
    """``extraction.json``: ‖ΔW − B·A‖_F / ‖ΔW‖_F per module, per kind and in total."""
    kinds: dict[str, list[float]] = {}
    for f in factors:
        acc = kinds.setdefault(f.target.kind, [0.0, 0.0])
        acc[0] += f.err_sq
        acc[1] += f.norm_sq
    total_err = sum(f.err_sq for f in factors)
    total_norm = sum(f.norm_sq for f in factors)
    return {
        "max_rank": rank,
        "total_rel_error": _rel(total_err, total_norm),
        "kinds": {k: _rel(e, n) for k, (e, n) in sorted(kinds.items())},
        "modules": {
            f.target.module: {"rank": f.rank, "rel_error": _rel(f.err_sq, f.norm_sq)}
            for f in factors
        },
        "unchanged": unchanged,
        "not_captured": [{"tensor": n, "reason": why} for n, why in not_captured],
    }


def _write_adapter(tmp: Path, factors: list[Factors]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        key = PREFIX + f.target.module
        if f.target.embedding:
            tensors[f"{key}.lora_embedding_A"] = f.a  # (r, vocab)
            tensors[f"{key}.lora_embedding_B"] = f.b  # (dim, r)
        else:
            tensors[f"{key}.lora_A.weight"] = f.a  # (r, in)
            tensors[f"{key}.lora_B.weight"] = f.b  # (out, r)
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp, entries, shard_size=2**62, metadata={"format": "pt"})
    with writer:
        for n, t in tensors.items():
            writer.write(n, t.contiguous())
    (tmp / writer.file_names[0]).rename(tmp / ADAPTER_FILE)


def adapter_config(factors: list[Factors], base: Checkpoint, base_path: str) -> dict:
    """PEFT ``LoraConfig`` fields: r = the largest rank, patterns for smaller ranks, alpha = r."""
    r = max(f.rank for f in factors)
    pattern = {f.target.module: f.rank for f in factors if f.rank < r}
    return {
        "peft_type": "LORA",
        "task_type": task_type(base.config),
        "base_model_name_or_path": base_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": target_modules(factors, base),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def target_modules(factors: list[Factors], base: Checkpoint) -> list[str]:
    """Short module names (``q_proj``) where every module of that name has factors, else the
    full module paths, so PEFT never wraps a module the adapter holds no weights for."""
    done = {f.target.module for f in factors}
    out: set[str] = set()
    for kind in {f.target.kind for f in factors}:
        same = {n.removesuffix(".weight") for n in base.tensors if n.endswith(f".{kind}.weight")}
        same |= {kind} if f"{kind}.weight" in base.tensors else set()
        out |= {kind} if same <= done else {m for m in done if m.rsplit(".", 1)[-1] == kind}
    return sorted(out)


def task_type(config: dict | None) -> str | None:
    """PEFT task type from ``architectures[0]`` (``…ForCausalLM`` → CAUSAL_LM), else None."""
    archs = (config or {}).get("architectures") or []
    name = archs[0] if archs and isinstance(archs[0], str) else ""
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)

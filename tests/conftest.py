"""Shared fixtures: a small corpus the tests write themselves and overrides for a tiny model."""
from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ["the", "king", "queen", "lord", "lady", "doth", "thou", "art", "thee", "hath", "night", "day", "love", "death", "sword", "crown", "speak", "hear", "come", "go", "where", "what", "why", "noble", "gentle", "fair", "foul", "heaven", "earth", "blood"]


def write_corpus(directory, num_docs: int = 4, words_per_doc: int = 3000, seed: int = 0) -> list[str]:
    """Plain-text documents of pseudo-Shakespearean words, deterministic for a seed."""
    rng = random.Random(seed)
    paths = []
    os.makedirs(directory, exist_ok=True)
    for d in range(num_docs):
        lines = []
        for _ in range(words_per_doc // 10):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
        path = os.path.join(directory, f"doc{d}.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        paths.append(path)
    return paths


def tiny_overrides(tmp_path, run_dir=None, steps: int = 20) -> list[str]:
    """A 2-layer hidden-32 model on a written corpus: a 20-step run takes about a second."""
    paths = write_corpus(tmp_path / "corpus")
    return [
        "data=text_files", "data.tokenizer=shakespeare_bpe", f"data.paths=[{','.join(paths)}]",
        f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32", "data.micro_batch_size=2",
        "data.global_batch_size=4", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.max_position_embeddings=64", f"trainer.max_steps={steps}",
        "trainer.log_interval=1", "trainer.eval_interval=10", "trainer.eval_iters=2",
        "trainer.peak_tflops=1.0", f"trainer.run_dir={run_dir or tmp_path / 'run'}", "optim.lr=3e-3",
        "optim.schedule.warmup_steps=2", "trainer.num_threads=1",
    ]


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_overrides(tmp_path, **kw)

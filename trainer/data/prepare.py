"""Tokenize the corpus once into flat token files that training memory-maps.

Layout: `<cache_dir>/tokens/<source>-<tokenizer>-<key>/{train.bin, val.bin, meta.json}`. The key hashes
everything the tokens depend on (corpus identity, tokenizer definition, val_fraction, this module's format
version), so changing any of them prepares a new directory instead of reusing stale tokens. meta.json is
written last: its presence is what marks the directory as complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.config import DEFAULT_EOD_TOKEN, DataConfig
from trainer.data.corpus import atomic_write, corpus_identity, load_documents
from trainer.data.tokenizer import TextTokenizer, load_tokenizer

FORMAT_VERSION = 1
"""Bump when the token files' content or layout changes, so old caches are not reused."""
SPLITS = ("train", "val")
META_NAME = "meta.json"


@dataclass(frozen=True)
class PreparedData:
    """A complete tokenized corpus on disk, and what training needs to know about it."""

    directory: str
    """The token directory holding train.bin, val.bin and meta.json."""

    vocab_size: int
    eos_id: int
    dtype: str
    """numpy dtype of the token files: uint16 when the vocabulary fits, else uint32."""

    train_tokens: int
    val_tokens: int
    num_documents: int
    unigram_entropy: float
    """Entropy of the train split's token frequencies, in nats: the loss of the best model that ignores
    context, so a trained model's loss should end well below it."""

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream, memory-mapped read-only (nothing is loaded until indexed)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        count = self.train_tokens if split == "train" else self.val_tokens
        if count == 0:
            return np.empty(0, dtype=self.dtype)  # np.memmap cannot map an empty file
        return np.memmap(Path(self.directory) / f"{split}.bin", dtype=self.dtype, mode="r", shape=(count,))


def prepare(cfg: DataConfig) -> PreparedData:
    """Tokenize `cfg`'s corpus into the cache unless an identical preparation is already there.

    Several processes may call this at once (e.g. every rank of a job): they may all do the work, but each
    file is installed by an atomic rename and all copies are identical, so readers only ever see complete
    files. To avoid the duplicate work, call it on one rank, barrier, and pass the result to the others.
    """
    _check_val_fraction(cfg.val_fraction)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    inputs = {
        "format": FORMAT_VERSION,
        "corpus": corpus_identity(cfg),
        "tokenizer": {"name": cfg.tokenizer, "sha256": tokenizer.fingerprint},
        "val_fraction": cfg.val_fraction,
    }
    if cfg.eod_token != DEFAULT_EOD_TOKEN:
        # Only a non-default token enters the key, so caches prepared before data.eod_token existed
        # (always with the default) keep their keys and are reused.
        inputs["tokenizer"]["eod_token"] = cfg.eod_token
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    directory = Path(cfg.cache_dir) / "tokens" / f"{cfg.source}-{_slug(Path(cfg.tokenizer).stem)}-{key}"
    if (directory / META_NAME).is_file():
        return _read_prepared(directory)
    return _tokenize_into(directory, cfg, tokenizer, inputs)


def split_document(ids: list[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) parts of one document's tokens: the last `val_fraction` of them go to val."""
    num_val = int(len(ids) * val_fraction)
    cut = len(ids) - num_val
    return ids[:cut], ids[cut:]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < 2**16 else "uint32"


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the empirical token distribution of `tokens`."""
    counts = np.bincount(tokens, minlength=vocab_size)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def _tokenize_into(
    directory: Path, cfg: DataConfig, tokenizer: TextTokenizer, inputs: dict[str, Any]
) -> PreparedData:
    documents = load_documents(cfg)
    dtype = token_dtype(tokenizer.vocab_size)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for ids in tokenizer.encode_batch([doc.text for doc in documents]):
        # Every part ends with eos so the concatenated stream keeps documents apart; a train part cut
        # before its val tail also ends with eos, a small price for never mixing the two splits.
        for split, part in zip(SPLITS, split_document(ids, cfg.val_fraction)):
            if part:
                parts[split] += [np.asarray(part, dtype=dtype), eos]
    streams = {
        split: np.concatenate(arrays) if arrays else np.empty(0, dtype) for split, arrays in parts.items()
    }
    if streams["train"].size == 0:
        raise ValueError(
            f"data.source={cfg.source!r} gave {len(documents)} documents but no tokens; "
            "check data.paths / data.text_field point at non-empty text"
        )

    directory.mkdir(parents=True, exist_ok=True)
    for split, stream in streams.items():
        atomic_write(directory / f"{split}.bin", stream.tofile)
    prepared = PreparedData(
        directory=str(directory),
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        dtype=dtype,
        train_tokens=int(streams["train"].size),
        val_tokens=int(streams["val"].size),
        num_documents=len(documents),
        unigram_entropy=unigram_entropy(streams["train"], tokenizer.vocab_size),
    )
    meta = {key: value for key, value in asdict(prepared).items() if key != "directory"}
    meta["inputs"] = inputs  # what the key was made of, for a human wondering why a cache was (not) reused
    text = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
    atomic_write(directory / META_NAME, lambda f: f.write(text))
    return prepared


def _read_prepared(directory: Path) -> PreparedData:
    meta = json.loads((directory / META_NAME).read_text(encoding="utf-8"))
    prepared = PreparedData(
        directory=str(directory),
        vocab_size=meta["vocab_size"],
        eos_id=meta["eos_id"],
        dtype=meta["dtype"],
        train_tokens=meta["train_tokens"],
        val_tokens=meta["val_tokens"],
        num_documents=meta["num_documents"],
        unigram_entropy=meta["unigram_entropy"],
    )
    itemsize = np.dtype(prepared.dtype).itemsize
    for split, count in (("train", prepared.train_tokens), ("val", prepared.val_tokens)):
        path = directory / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != count * itemsize:
            raise RuntimeError(
                f"{path} does not hold the {count} tokens {directory / META_NAME} promises; the cache was "
                f"modified outside foldtron. Delete {directory} and prepare again."
            )
    return prepared


def _check_val_fraction(val_fraction: float) -> None:
    if not (0.0 < val_fraction < 1.0) or math.isnan(val_fraction):
        raise ValueError(
            f"data.val_fraction={val_fraction} must be in (0, 1): it is the tail of each document held out "
            "for validation; 0.05 is typical"
        )


def _slug(text: str) -> str:
    """A short file-name-safe rendering of `text` for readable cache directory names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "tokenizer"

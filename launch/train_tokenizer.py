"""Train the committed byte-level BPE (`data.tokenizer=shakespeare_bpe`) on the default corpus' train split.

    python launch/train_tokenizer.py            # writes trainer/data/assets/shakespeare_bpe_4k.json

The validation split is the tail of each document's *tokens*, which needs a tokenizer to define; here the
tail is cut by characters instead (at a line boundary at or before the same fraction), so the tokenizer
never sees validation text up to the few characters where the two cuts differ.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from trainer.data.config import DataConfig
from trainer.data.corpus import load_documents
from trainer.data.tokenizer import SHAKESPEARE_BPE_ASSET, SHAKESPEARE_BPE_VOCAB_SIZE, train_byte_level_bpe

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "trainer" / "data" / "assets" / SHAKESPEARE_BPE_ASSET


def train_part(text: str, val_fraction: float) -> str:
    """The head of `text` before the validation tail, cut at a line boundary so no line is split."""
    cut = int(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    return text[: line_start or cut]


def main() -> None:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=defaults.cache_dir, help="where the corpus is downloaded")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="tail held out")
    parser.add_argument("--vocab-size", type=int, default=SHAKESPEARE_BPE_VOCAB_SIZE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    cfg = DataConfig(source="shakespeare", cache_dir=args.cache_dir, val_fraction=args.val_fraction)
    started = time.perf_counter()
    texts = [train_part(doc.text, args.val_fraction) for doc in load_documents(cfg)]
    tokenizer = train_byte_level_bpe(texts, vocab_size=args.vocab_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output), pretty=True)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()[:16]
    print(
        f"trained on {len(texts)} documents ({sum(len(t) for t in texts):,} chars) in "
        f"{time.perf_counter() - started:.1f}s: vocab {tokenizer.get_vocab_size()} -> {args.output} "
        f"(sha256 {digest})"
    )


if __name__ == "__main__":
    main()

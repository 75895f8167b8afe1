"""Download (if needed) and tokenize the training corpus into the cache; a no-op when already prepared.

python launch/prepare_data.py                                   # the default Shakespeare corpus
python launch/prepare_data.py --source text_files --paths a.txt b.jsonl
"""

from __future__ import annotations

import argparse
import time

from trainer.data.config import SOURCES, DataConfig
from trainer.data.prepare import prepare


def parse_config() -> DataConfig:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=defaults.source, choices=SOURCES)
    parser.add_argument(
        "--tokenizer", default=defaults.tokenizer, help="shakespeare_bpe | gpt2 | path/to/tokenizer.json"
    )
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument(
        "--paths", nargs="*", default=list(defaults.paths), help="text_files inputs / hf data_files"
    )
    parser.add_argument("--hf-path", default=defaults.hf_path)
    parser.add_argument("--hf-name", default=defaults.hf_name)
    parser.add_argument("--hf-split", default=defaults.hf_split)
    parser.add_argument("--text-field", default=defaults.text_field)
    args = parser.parse_args()
    return DataConfig(
        source=args.source,
        tokenizer=args.tokenizer,
        cache_dir=args.cache_dir,
        val_fraction=args.val_fraction,
        paths=args.paths,
        hf_path=args.hf_path,
        hf_name=args.hf_name,
        hf_split=args.hf_split,
        text_field=args.text_field,
    )


def main() -> None:
    cfg = parse_config()
    started = time.perf_counter()
    prepared = prepare(cfg)
    print(
        f"[data] {cfg.source} / {cfg.tokenizer}: {prepared.num_documents} documents, "
        f"train {prepared.train_tokens:,} tokens, val {prepared.val_tokens:,} tokens, "
        f"vocab {prepared.vocab_size}, unigram entropy {prepared.unigram_entropy:.4f} nats "
        f"({time.perf_counter() - started:.1f}s) -> {prepared.directory}"
    )


if __name__ == "__main__":
    main()

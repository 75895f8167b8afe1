"""The data pipeline: corpus -> tokenizer -> prepared token files -> windows -> per-rank microbatches.

Typical use (the trainer prepares once on one rank, then every rank builds its pipeline):

    prepared = prepare(cfg.data)
    data = DataPipeline(cfg.data, seed=cfg.seed, dp_rank=ps.dp_rank, dp_size=ps.dp_size, prepared=prepared)
    for microbatch in data.train_microbatches(step): ...
"""

from trainer.data.config import DataConfig
from trainer.data.corpus import Document, corpus_identity, ensure_shakespeare, load_documents
from trainer.data.dataset import TokenWindows
from trainer.data.pipeline import DataPipeline, Microbatch, make_microbatch
from trainer.data.prepare import PreparedData, prepare
from trainer.data.sampler import EpochShuffledSampler, epoch_permutation
from trainer.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "DataPipeline",
    "Document",
    "EpochShuffledSampler",
    "Microbatch",
    "PreparedData",
    "TextTokenizer",
    "TokenWindows",
    "corpus_identity",
    "ensure_shakespeare",
    "epoch_permutation",
    "load_documents",
    "load_tokenizer",
    "make_microbatch",
    "prepare",
]

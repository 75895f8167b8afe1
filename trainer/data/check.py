"""The `data.*` rules, checked once before anything is built (the data pipeline trusts them).

They include what the layout asks of the data: batch sizes that split over DP ranks and
microbatches, a microbatch count the interleaved pipeline can run, and sequence lengths that the
context-parallel zigzag split and sequence parallelism can cut.
"""
from __future__ import annotations

from parallel_state import ParallelConfig, Topology
from parallel_state.errors import ConfigError, require, require_choice, require_positive
from trainer.data.config import SOURCES, DataConfig
from trainer.data.corpus import resolve_paths
from trainer.pipeline.orders import check_interleaved


def check(cfg: DataConfig, parallel: ParallelConfig, topology: Topology, max_positions: int) -> None:
    """Raise ConfigError on the first bad `data.*` value for this layout and a model that takes up to
    `max_positions` positions."""
    require_choice("data.source", cfg.source, SOURCES)
    for name in ("seq_len", "micro_batch_size", "global_batch_size"):
        require_positive(f"data.{name}", getattr(cfg, name))
    require(cfg.seq_len <= max_positions, "data.seq_len", cfg.seq_len,
            f"exceeds model.max_position_embeddings={max_positions}",
            "shorten data.seq_len or raise model.max_position_embeddings")
    per_step = cfg.micro_batch_size * topology.dp
    require(cfg.global_batch_size % per_step == 0, "data.global_batch_size", cfg.global_batch_size,
            f"not divisible by micro_batch_size * dp = {cfg.micro_batch_size} * {topology.dp}",
            f"use a multiple of {per_step} (gradient accumulation steps = global / (micro * dp))")
    require(0.0 < cfg.val_fraction < 1.0, "data.val_fraction", cfg.val_fraction, "must lie in (0, 1)",
            "hold out e.g. 0.05 of each document for validation")
    _check_source(cfg)
    _check_sequence_split(cfg, parallel, topology)
    if parallel.vpp > 1:
        _check_interleaved_microbatches(cfg, parallel, topology)


def _check_source(cfg: DataConfig) -> None:
    if cfg.source == "text_files":
        require(len(cfg.paths) > 0, "data.paths", cfg.paths, "text_files needs input files",
                "list .txt or .jsonl files in data.paths")
        try:
            resolve_paths(list(cfg.paths))
        except ValueError as e:
            raise ConfigError("data.paths", list(cfg.paths), str(e).split(";")[0],
                              "list existing .txt/.jsonl files or glob patterns that match some") from e
    if cfg.source == "hf":
        require(bool(cfg.hf_path), "data.hf_path", cfg.hf_path, "the hf source needs a dataset",
                "set data.hf_path to a local dataset dir or a builder such as json (with data.paths)")


def _check_sequence_split(cfg: DataConfig, parallel: ParallelConfig, topology: Topology) -> None:
    """Context parallelism cuts each sequence into 2*cp zigzag chunks; sequence parallelism splits
    each CP rank's tokens over tp."""
    seq, cp, tp = cfg.seq_len, topology.cp, topology.tp
    if cp > 1:
        require(seq % (2 * cp) == 0, "data.seq_len", seq,
                f"not a multiple of 2 * parallel.cp = {2 * cp} (the zigzag split cuts each sequence into 2*cp "
                "chunks)", f"use a multiple of {2 * cp}")
    if parallel.sequence_parallel:
        per_cp_rank = seq // cp
        require(per_cp_rank % tp == 0, "data.seq_len", seq,
                f"each CP rank's {per_cp_rank} tokens do not split over parallel.tp={tp} (sequence parallelism)"
                if cp > 1 else f"the sequence length is not divisible by parallel.tp={tp} (split over TP by "
                "sequence parallelism)",
                f"use a multiple of {2 * cp * tp if cp > 1 else tp}, or parallel.sequence_parallel=false")


def _check_interleaved_microbatches(cfg: DataConfig, parallel: ParallelConfig, topology: Topology) -> None:
    microbatches = cfg.global_batch_size // (cfg.micro_batch_size * topology.dp)
    try:
        check_interleaved(parallel.pp, parallel.vpp, microbatches)
    except ValueError as e:
        raise ConfigError("data.global_batch_size", cfg.global_batch_size,
                          f"gives {microbatches} microbatches per pipeline, which the interleaved schedule "
                          f"cannot run: {e}",
                          f"use a number of microbatches (global / (micro * dp)) that is a multiple of "
                          f"parallel.pp={parallel.pp}") from e

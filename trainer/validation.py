"""Every config rule, checked before any tokenizer, model, data or process group exists.

Each package owns its rules as a `check` function of its own config and the topology
(`parallel_state.check`, `models.check`, `moe.config.check`, `optim.check`, `trainer.data.check`,
`trainer.config.check_trainer` / `check_logger`); this module only composes them, in a fixed order
so the first problem a user meets is always the same one. A violation raises one ConfigError that
names the field, its value and a fix. Layers and builders trust a checked config.
"""
from __future__ import annotations

import models.check
import optim
import parallel_state
import trainer.data.check
from moe.config import check as check_moe
from parallel_state import Topology
from parallel_state.errors import ConfigError
from trainer.config import Config, check_logger, check_trainer
from trainer.precision import precision_of

__all__ = ["ConfigError", "validate"]


def validate(cfg: Config, world_size: int = 1) -> Topology:
    """Check every rule for a run on `world_size` ranks; raise ConfigError on the first. Returns the
    layout's Topology, built once here and handed to the trainer."""
    topology = parallel_state.check(cfg.parallel, world_size)
    models.check.check(cfg.model, cfg.parallel, topology)
    if "moe" in cfg.model.channel_mixers:
        check_moe(cfg.model.moe, topology, cfg.parallel.sequence_parallel, cfg.data.micro_batch_size,
                  cfg.data.seq_len)
    trainer.data.check.check(cfg.data, cfg.parallel, topology, cfg.model.max_position_embeddings)
    check_trainer(cfg.trainer, world_size)
    optim.check(cfg.optim, cfg.trainer.max_steps, loss_scaling=precision_of(cfg.trainer.precision).loss_scaling,
                topology=topology)
    optim.check_backend(cfg.optim, topology, cfg.trainer.precision, cfg.trainer.nan_policy)
    check_logger(cfg.logger)
    return optim.outer_topology(cfg.optim, topology)  # the outer optimizer's workers, if any

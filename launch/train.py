"""Entry point: `torchrun --nproc-per-node=N launch/train.py +experiment=NAME [overrides]`.

Every rank composes the same config; the trainer validates it before building anything.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from trainer.config import register_configs, to_config
from trainer.trainer import NonFiniteLossError, train
from trainer.validation import ConfigError

register_configs()
# `kill -USR1 <pid>` prints every thread's stack: how a hung rank is diagnosed (the e2e tests use it).
faulthandler.register(signal.SIGUSR1, all_threads=True)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    try:
        train(to_config(dict_cfg))
    except (ConfigError, NonFiniteLossError) as e:
        # A user-facing error: one clear line, not a traceback.
        print(f"foldtron: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

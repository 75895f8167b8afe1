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
from trainer.faults import EXIT_CONFIG, CollectiveTimeoutError, RunStopped, restart_store_warning
from trainer.trainer import NonFiniteLossError, train
from trainer.validation import ConfigError

register_configs()
# `kill -USR1 <pid>` prints every thread's stack: how a hung rank is diagnosed (the e2e tests use it).
faulthandler.register(signal.SIGUSR1, all_threads=True)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    warning = restart_store_warning()
    if warning and os.environ.get("RANK", "0") == "0":
        print(f"foldtron: warning: {warning}", file=sys.stderr)
    try:
        train(to_config(dict_cfg))
    except (ConfigError, NonFiniteLossError) as e:
        # A user-facing error: one clear line, not a traceback.
        print(f"foldtron: error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except RunStopped as e:  # SIGTERM or trainer.time_limit: saved; a scheduler requeues on this status
        # torchrun sends SIGTERM to the other ranks once one exits; ignore it so this rank's status
        # stays 75 (Python resets its own handlers to the default while the interpreter shuts down).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"foldtron: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except CollectiveTimeoutError as e:  # every rank's stack was dumped already
        print(f"foldtron: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

"""Print each rank's training memory for a config and layout, without launching it (docs/memory.md).

    python launch/memory.py --world 8 +experiment=quickstart parallel.tp=2 parallel.pp=2 model.recompute=selective
    python launch/memory.py --world 8 model=llama3_8b model.vocab_size=128256 parallel.tp=2 \\
        parallel.sequence_parallel=true parallel.pp=2 optim.distributed=true trainer.precision=bf16 \\
        model.recompute=selective data.seq_len=8192 data.micro_batch_size=1 data.global_batch_size=16

The arguments after --world are the Hydra overrides launch/train.py takes; the config is validated
as a run would be. Per pipeline rank it prints the bytes of weights, fp32 main gradients, optimizer
state, separate fp32 masters and bucket padding (counted on the rank's model and optimizer step built
on the meta device in a fake process group: the same numbers a run holds), and the activations of
the microbatches the pipeline keeps in flight (the derived formula of trainer/memory_model.py).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from parallel_state.errors import ConfigError
from trainer.config import compose
from trainer.memory_estimate import estimate, format_estimate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, required=True, help="number of ranks (GPUs) of the run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch/train.py")
    args = parser.parse_args(argv)
    cfg = compose(args.overrides)
    try:
        ranks = estimate(cfg, args.world)
    except ConfigError as error:
        print(f"foldtron: error: {error}", file=sys.stderr)
        return 2
    print(format_estimate(cfg, ranks))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bytes of model state per parameter each rank really holds, against the analytic table.

For d = 1, 2, 4, 8 data-parallel gloo ranks, builds the Trainer on a small model, takes one step
(so the optimizer state exists) and counts the tensors rank 0 holds for its model shard: weights,
gradients (bucket padding excluded, reported apart), optimizer state and separate fp32 masters,
divided by the shard's parameters; for trainer.precision fp32 and bf16, with the all-reduce step and
the distributed optimizer. Reference: Megatron-LM's table (optim/memory.py), measured/analytic
printed per row.

    .venv/bin/python bench/memory.py [--worlds 1 2 4 8] [--precisions fp32 bf16]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optim.memory import analytic_bytes_per_param, measured_state_bytes
from tests.conftest import tiny_overrides
from tests.multirank.harness import RankPool
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer


def held_bytes(overrides: list[str]) -> dict:
    """On one rank: its measured state bytes after one step."""
    world, rank = dist.get_world_size(), dist.get_rank()
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's start-up log
        trainer = Trainer(compose(overrides), env=RuntimeEnv(rank=rank, world_size=world, local_rank=rank,
                                                             local_world_size=world))
        trainer.train_step()
    held = measured_state_bytes(trainer.optim_step)
    return {"per_param": held.per_param, "params": held.params, "padding": held.padding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    print(f"{'d':>3} {'precision':>9} {'optimizer':>12} {'measured B/param':>17} {'analytic':>9} {'ratio':>7} "
          f"{'padding B':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            pool = RankPool(world, timeout_s=900)
            try:
                for precision in args.precisions:
                    for distributed in (False, True):
                        run = os.path.join(tmp, f"d{world}-{precision}-{distributed}")
                        overrides = tiny_overrides(_Path(run), run_dir=os.path.join(run, "run"), steps=3) + [
                            f"optim.distributed={str(distributed).lower()}", "trainer.save_final=false",
                            f"trainer.precision={precision}", "data.micro_batch_size=1",
                            f"data.global_batch_size={world}"]
                        rank0 = pool.run(held_bytes, overrides)[0]
                        analytic = analytic_bytes_per_param(precision, distributed, world)
                        name = "distributed" if distributed else "all-reduce"
                        print(f"{world:>3} {precision:>9} {name:>12} {rank0['per_param']:>17.3f} {analytic:>9.3f} "
                              f"{rank0['per_param'] / analytic:>7.4f} {rank0['padding']:>10}")
            finally:
                pool.close()


class _Path(str):
    """tiny_overrides takes a pathlib-like directory (it joins with `/`)."""

    def __truediv__(self, other: str) -> str:
        return os.path.join(self, other)


if __name__ == "__main__":
    main()

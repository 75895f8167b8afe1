"""Training throughput of DeepSpeed's engine against foldtron's own step, in one run (docs/deepspeed.md).

On `--world` data-parallel gloo ranks, a small model trains with foldtron's native step at each
ZeRO stage it has (stage 0: the bucketed all-reduce step; stage 1: the distributed optimizer,
optim.distributed=true) and with optim.backend=deepspeed at stages 1, 2 and 3. Rounds alternate
the contenders so machine noise hits all of them; each round times `--steps` steps after one
warm-up step on a fresh Trainer. Prints tokens/s per contender (median over rounds) and the ratio
DeepSpeed / native at the same stage (stages 2 and 3 against native stage 1, the nearest).

    .venv/bin/python bench/deepspeed_throughput.py [--world 2] [--rounds 3] [--steps 10] [--hidden 256]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import REPO_ROOT, tiny_overrides
from tests.multirank.harness import RankPool
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

CONTENDERS = {
    "native stage 0 (all-reduce)": ["optim.distributed=false"],
    "native stage 1 (distributed optimizer)": ["optim.distributed=true"],
    "deepspeed stage 1": ["optim.backend=deepspeed", "optim.deepspeed.stage=1"],
    "deepspeed stage 2": ["optim.backend=deepspeed", "optim.deepspeed.stage=2"],
    "deepspeed stage 3": ["optim.backend=deepspeed", "optim.deepspeed.stage=3"],
}
REFERENCE = {"deepspeed stage 1": "native stage 1 (distributed optimizer)",
             "deepspeed stage 2": "native stage 1 (distributed optimizer)",
             "deepspeed stage 3": "native stage 1 (distributed optimizer)"}


def tokens_per_second(overrides: list[str], steps: int) -> float:
    """On one rank: a fresh Trainer, one warm-up step, then `steps` timed steps; global tokens/s."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO_ROOT, ".cache", "torch_extensions"))
    world, rank = dist.get_world_size(), dist.get_rank()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cfg = compose(overrides)
        trainer = Trainer(cfg, env=RuntimeEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world))
        trainer.train_step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        dist.barrier()
        elapsed = time.perf_counter() - start
    return steps * cfg.data.global_batch_size * cfg.data.seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_overrides(_Path(tmp), run_dir=os.path.join(tmp, "run"), steps=args.steps + 2) + [
            "trainer.save_final=false", "trainer.eval_interval=100000", f"model.hidden_size={args.hidden}",
            "model.num_heads=4", "model.num_kv_heads=4", "model.num_layers=4", "data.seq_len=64",
            "model.max_position_embeddings=64", "data.micro_batch_size=2",
            f"data.global_batch_size={4 * args.world}", "trainer.num_threads=1"]
        pool = RankPool(args.world, timeout_s=1800)
        try:
            for round_index in range(args.rounds):
                for name, extra in CONTENDERS.items():
                    results[name].append(pool.run(tokens_per_second, base + extra, args.steps)[0])
                print(f"round {round_index + 1}: " + ", ".join(f"{n}: {v[-1]:.0f}" for n, v in results.items()),
                      flush=True)
        finally:
            pool.close()
    print(f"\n{args.world} data-parallel gloo ranks, hidden {args.hidden}, 4 layers, seq 64, "
          f"{4 * args.world} sequences per step, {args.rounds} alternating rounds of {args.steps} steps")
    print(f"{'contender':>40} {'tokens/s (median)':>18} {'ratio':>7}  reference")
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, value in medians.items():
        reference = REFERENCE.get(name)
        ratio = f"{value / medians[reference]:>7.3f}" if reference else f"{'':>7}"
        print(f"{name:>40} {value:>18.0f} {ratio}  {reference or ''}")


class _Path(str):
    """tiny_overrides takes a pathlib-like directory (it joins with `/`)."""

    def __truediv__(self, other: str) -> str:
        return os.path.join(self, other)


if __name__ == "__main__":
    main()

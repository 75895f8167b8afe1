"""Final validation loss of the quickstart trained in bf16 (and fp16) against fp32, same data and seed.

Runs `launch/train.py +experiment=quickstart` once per precision with torchrun, in the layout of
`make train` by default (8 gloo ranks: tp2 with SP x pp2 x dp2), and prints each run's final
validation loss, its ratio to fp32's and the wall time. Reference: the fp32 run of the same
invocation. Target: bf16 within 2% of fp32.

    .venv/bin/python bench/precision.py [--precisions fp32 bf16] [--nproc 8] [--layout "parallel.tp=2 ..."]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_TRAIN_LAYOUT = "parallel.tp=2 parallel.sequence_parallel=true parallel.pp=2 data.micro_batch_size=3"


def final_val_loss(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def train(precision: str, nproc: int, layout: str, run_dir: str, extra: list[str]) -> tuple[float, float]:
    """(final validation loss, seconds) of one quickstart run."""
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
               f"--nproc-per-node={nproc}", os.path.join(ROOT, "launch", "train.py"), "+experiment=quickstart",
               *layout.split(), f"trainer.precision={precision}", f"trainer.run_dir={run_dir}",
               "trainer.save_interval=0", "trainer.save_final=false", *extra]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return final_val_loss(run_dir), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--nproc", type=int, default=8)
    parser.add_argument("--layout", default=MAKE_TRAIN_LAYOUT, help="overrides of the parallel layout")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    precisions = ["fp32"] + [p for p in args.precisions if p != "fp32"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            results[precision] = train(precision, args.nproc, args.layout, os.path.join(tmp, precision), args.extra)
    reference = results["fp32"][0]
    print(f"quickstart, {args.nproc} ranks, {args.layout or 'one process'}")
    print(f"{'precision':>14} {'final val loss':>15} {'/ fp32':>8} {'wall s':>8}")
    for precision, (loss, seconds) in results.items():
        print(f"{precision:>14} {loss:>15.4f} {loss / reference:>8.4f} {seconds:>8.0f}")


if __name__ == "__main__":
    main()

"""Ladder residual speed: step time of a ladder model over the standard model at tp = 2 and 4 (gloo).

Two workloads, each with and without an injected link latency:
- generate: forward only, a short greedy generation (launch/generate.py: prefill a prompt, then one
  token per call with the KV cache), what inference serving pays per token;
- train: forward + backward of the token losses (no optimizer step, which is the same for both).

The injected latency makes every collective complete `latency` after it was launched, or later:
a timer on a background thread releases the collective's handle (a blocking call sleeps it out).
Both models pay it on every collective, so the ratio measures how much of it the ladder hides
behind the next module's compute, not the CPU. By default it is calibrated to one sub-module's
compute: the standard model's no-latency step time over (its collectives per step).

Every figure is the median over rounds of (ladder time / standard time) measured in the same
round, the two models alternating which goes first. Without latency the CPU time of rank 0's
process is reported too: on a machine shared with other jobs it shows the ladder's own overhead
when wall times are dominated by scheduling noise. Targets at tp = 2: ladder <= 0.8x the standard
with the latency, within 5% without. tp = 4 runs 4 ranks on a 2-core machine: reported, no target.

    .venv/bin/python bench/ladder.py                     # tp 2 and 4, both workloads
    .venv/bin/python bench/ladder.py --tp 2 --rounds 3   # quicker
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.generate import greedy_generate
from models import ModelConfig, build_model
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from parallel_state import Topology, collectives, init
from tests.multirank.harness import RankPool

MODELS = ("standard", "ladder")
WORKLOADS = ("generate", "train")


class DelayedWork:
    """A collective's handle that completes no earlier than `delay` seconds after launch."""

    def __init__(self, work, delay: float):
        self.work, self.released = work, threading.Event()
        self.timer = threading.Timer(delay, self.released.set)
        self.timer.daemon = True
        self.timer.start()

    def wait(self, *args) -> bool:
        self.work.wait(*args)
        self.released.wait()
        return True

    def is_completed(self) -> bool:
        return self.released.is_set() and self.work.is_completed()


class LinkLatency:
    """Adds `seconds` to every collective parallel_state.collectives issues (the bench's own knob,
    installed in the bench's rank processes only); 0 leaves the collectives untouched."""

    def __init__(self):
        self.seconds = 0.0
        self._patched: dict[tuple[object, str], Callable] = {}
        for owner, name in ((dist, "all_reduce"), (collectives, "_reduce_scatter_single"),
                            (collectives, "_all_gather_single"), (dist, "all_to_all_single")):
            real = getattr(owner, name)
            self._patched[(owner, name)] = real
            setattr(owner, name, self._delayed(real))

    def _delayed(self, real: Callable) -> Callable:
        def call(*args, async_op: bool = False, **kwargs):
            work = real(*args, async_op=async_op, **kwargs)
            if self.seconds <= 0:
                return work
            if async_op:
                return DelayedWork(work, self.seconds)
            time.sleep(self.seconds)
            return work
        return call

    def remove(self) -> None:
        for (owner, name), real in self._patched.items():
            setattr(owner, name, real)


def model_config(args: dict, residual: str) -> ModelConfig:
    return ModelConfig(vocab_size=args["vocab"], hidden_size=args["hidden"], num_layers=args["layers"],
                       num_heads=args["heads"], num_kv_heads=args["heads"], ffn_hidden_size=4 * args["hidden"],
                       max_position_embeddings=1024, residual=residual)


def collectives_per_step(args: dict, workload: str) -> int:
    """TP collectives of one step of the standard model (per sub-module one; embedding and loss extra)."""
    modules = 2 * args["layers"]
    if workload == "generate":
        return (modules + 2) * (args["new_tokens"])  # + embedding all-reduce + logits gather per call
    return 2 * modules + 6  # forward row reductions + backward column reductions + embedding and loss


def time_models(args: dict) -> dict:
    """On one rank: per workload and latency setting, each round's (standard, ladder) seconds."""
    torch.set_num_threads(1)
    world = dist.get_world_size()
    ps = init(Topology(world, tp=world))
    par = ParallelContext(tp=TPContext(ps.tp, sequence_parallel=False))
    models = {name: build_model(model_config(args, name), seed=0, par=par) for name in MODELS}
    g = torch.Generator().manual_seed(0)  # the same tokens on every TP rank
    prompt = torch.randint(0, args["vocab"], (1, args["prompt"]), generator=g)
    batch = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=g)
    latency = LinkLatency()

    def run(name: str, workload: str) -> None:
        model = models[name]
        if workload == "generate":
            greedy_generate(model.eval(), prompt, args["new_tokens"])
            return
        model.train()
        model.token_losses(batch[:, :-1], batch[:, 1:]).mean().backward()
        model.zero_grad(set_to_none=True)

    def measure(workload: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Per round (standard, ladder): wall seconds per step, and this process's CPU seconds."""
        rounds, cpu_rounds = [], []
        for round_index in range(args["rounds"]):
            order = MODELS if round_index % 2 == 0 else MODELS[::-1]
            seconds, cpu = {}, {}
            for name in order:
                run(name, workload)  # warm-up (and the same cache state for both)
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(args["steps"]):
                    run(name, workload)
                dist.barrier()
                seconds[name] = (time.perf_counter() - start) / args["steps"]
                cpu[name] = (time.process_time() - cpu_start) / args["steps"]
            rounds.append((seconds["standard"], seconds["ladder"]))
            cpu_rounds.append((cpu["standard"], cpu["ladder"]))
        return rounds, cpu_rounds

    results = {}
    try:
        for workload in args["workloads"]:
            latency.seconds = 0.0
            plain, plain_cpu = measure(workload)
            calibrated = statistics.median(s for s, _ in plain) / collectives_per_step(args, workload)
            latency.seconds = args["latency_ms"] / 1e3 if args["latency_ms"] is not None else calibrated
            delayed, _ = measure(workload)
            results[workload] = {"plain": plain, "plain_cpu": plain_cpu, "latency": delayed,
                                 "latency_s": latency.seconds}
    finally:
        latency.remove()
        ps.destroy()
    return results


def ratio(rounds: list[tuple[float, float]]) -> float:
    return statistics.median(ladder / standard for standard, ladder in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2, help="training micro-batch")
    parser.add_argument("--seq", type=int, default=128, help="training sequence length")
    parser.add_argument("--prompt", type=int, default=16, help="generation prompt length")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per step")
    parser.add_argument("--steps", type=int, default=2, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="injected latency per collective (default: calibrated to one sub-module's compute)")
    a = parser.parse_args()
    args = {k: getattr(a, k) for k in ("hidden", "heads", "layers", "vocab", "batch", "seq", "prompt",
                                       "new_tokens", "steps", "rounds", "latency_ms", "workloads")}
    print(f"hidden={a.hidden} layers={a.layers} heads={a.heads}; generate: prompt {a.prompt}, {a.new_tokens} new "
          f"tokens, batch 1; train: {a.batch}x{a.seq} forward+backward; {a.rounds} rounds x {a.steps} steps")
    for tp in a.tp:
        pool = RankPool(tp, timeout_s=3600)
        try:
            per_rank = pool.run(time_models, args)
        finally:
            pool.close()
        result = per_rank[0]  # barriers end every timing together: rank 0's times are the step's
        for workload in a.workloads:
            r = result[workload]
            std_ms = statistics.median(s for s, _ in r["plain"]) * 1e3
            target = "" if tp != 2 else "  (target <= 0.80 with latency, 0.95..1.05 without)"
            print(f"tp={tp} {workload:8s} standard {std_ms:8.1f} ms/step | ladder/standard: "
                  f"no latency {ratio(r['plain']):.3f} (CPU time {ratio(r['plain_cpu']):.3f}), with "
                  f"{r['latency_s'] * 1e3:.2f} ms latency {ratio(r['latency']):.3f}{target}", flush=True)


if __name__ == "__main__":
    main()

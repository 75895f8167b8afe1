"""TPLA against exact MLA decoding (docs/tpla.md): KV-cache bytes and decode speed under TP on gloo
ranks, and quality on a trained mla_quickstart checkpoint.

speed (item "memory and speed"): an MLA model with DeepSeek-V3's latent widths (kv_lora_rank 512,
  RoPE key 64) on tp = g gloo ranks; at each context length the caches are filled to T tokens, then
  single-token decode steps (batch 1) are timed for exact MLA under TP (heads split, the whole latent
  on every rank) and for TPLA (all heads, latent / g per rank), alternating which goes first in each
  round, in the same run; the figure is the median over rounds of the two tokens/s and their ratio.
  Per-rank cache bytes are read from the caches themselves. Rank processes run with one thread each.
quality (item "quality"): a trained mla_quickstart checkpoint (given, or trained here for
  --train-steps steps on one process); on validation windows the first --prefix tokens are prefilled
  exactly and the rest are decoded (teacher-forced, one call) with exact MLA and with TPLA simulated
  on one process at g = 2, 4, without transform, with Hadamard and with PCA (calibrated on the
  training split), with each decode latent normalised per slice (the paper) and by the whole latent. Reported: relative error of the logits ||TPLA - MLA|| / ||MLA|| over the decoded
  positions, and the validation perplexity of both.

    .venv/bin/python bench/tpla.py speed --degrees 2 4 --contexts 4096 8192 16384 32768
    .venv/bin/python bench/tpla.py quality --checkpoint runs/mla_quickstart/<stamp>
    .venv/bin/python bench/tpla.py quality --train-steps 200     # trains mla_quickstart first (~25 min)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.generate import calibration_tokens, load_model
from models import ModelConfig, build_model
from models.config import MLAConfig
from models.inference.config import LATENT_NORMS, TPLAConfig
from models.inference.generation import LatentDecoder, teacher_forced_logits
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from parallel_state import Topology, init
from tests.multirank.harness import RankPool

MODES = ("mla", "tpla")
TRANSFORMS = ("none", "hadamard", "pca")


# ---- speed and memory ------------------------------------------------------------------------------

def speed_model_cfg(args: dict) -> ModelConfig:
    mla = MLAConfig(q_lora_rank=args["q_lora_rank"], kv_lora_rank=args["kv_lora_rank"], qk_nope_head_dim=64,
                    qk_rope_head_dim=args["rope"], v_head_dim=64)
    return ModelConfig(vocab_size=256, hidden_size=args["hidden"], num_layers=args["layers"], num_heads=args["heads"],
                       ffn_hidden_size=2 * args["hidden"], token_mixers=["mla"], mla=mla,
                       max_position_embeddings=max(args["contexts"]) + 64)


def fill(decoder: LatentDecoder, context: int, capacity: int) -> dict:
    """Caches holding `context` tokens of random latents (their values do not change the time)."""
    caches = decoder.caches(capacity)
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(context)[None]
    for i, layer in decoder.layers.items():
        held = layer.kv_lora_rank if i not in decoder.weights else len(decoder.weights[i].slices) * decoder.weights[i].width
        caches[i].cache.append(torch.randn(1, context, held, generator=g), torch.randn(1, context, layer.rope_dim,
                                                                                        generator=g), positions)
    return caches


def time_decode(model, caches: dict, context: int, steps: int) -> float:
    """Seconds for `steps` one-token decode calls after `context` cached tokens (caches reset after)."""
    token = torch.zeros(1, 1, dtype=torch.long)
    dist.barrier()
    start = time.perf_counter()
    with torch.inference_mode():
        for step in range(steps):
            model(token, torch.full((1, 1), context + step), caches=caches)
    dist.barrier()
    elapsed = time.perf_counter() - start
    for cache in caches.values():
        cache.cache.truncate(context)
    return elapsed


def speed_on_rank(args: dict) -> dict:
    n = dist.get_world_size()
    ps = init(Topology(n, tp=n))
    model = build_model(speed_model_cfg(args), seed=0, par=ParallelContext(tp=TPContext(ps.tp))).eval()
    decoders = {"mla": LatentDecoder(model), "tpla": LatentDecoder(model, TPLAConfig(enabled=True))}
    results = {}
    for context in args["contexts"]:
        caches = {mode: fill(decoders[mode], context, context + args["steps"]) for mode in MODES}
        cache_bytes = {mode: decoders[mode].cache_bytes(caches[mode]) for mode in MODES}
        for mode in MODES:  # warm-up
            time_decode(model, caches[mode], context, 1)
        rounds = []
        for r in range(args["rounds"]):
            order = MODES if r % 2 == 0 else MODES[::-1]
            times = {mode: time_decode(model, caches[mode], context, args["steps"]) for mode in order}
            rounds.append(times)
        results[context] = {"bytes": cache_bytes, "rounds": rounds}
        del caches
    ps.destroy()
    return results


def run_speed(a: argparse.Namespace) -> None:
    args = {k: getattr(a, k) for k in ("hidden", "heads", "layers", "q_lora_rank", "kv_lora_rank", "rope",
                                       "contexts", "steps", "rounds")}
    print(f"speed: hidden {a.hidden}, {a.layers} MLA layers, {a.heads} heads, latent {a.kv_lora_rank} + RoPE key "
          f"{a.rope}, fp32, batch 1; {a.rounds} rounds x {a.steps} decode steps; one thread per rank", flush=True)
    print("| g = tp | context | cache MiB/rank MLA | TPLA | bytes TPLA/MLA | tok/s MLA | tok/s TPLA | TPLA/MLA speed |")
    print("|---|---|---|---|---|---|---|---|")
    for g in a.degrees:
        pool = RankPool(g, timeout_s=3600)
        try:
            result = pool.run(speed_on_rank, args)[0]  # barriers end every timing together
        finally:
            pool.close()
        for context, r in result.items():
            mib = {m: r["bytes"][m] / 2**20 for m in MODES}
            tps = {m: statistics.median(a.steps / t[m] for t in r["rounds"]) for m in MODES}
            speedup = statistics.median(t["mla"] / t["tpla"] for t in r["rounds"])
            print(f"| {g} | {context} | {mib['mla']:.1f} | {mib['tpla']:.1f} | {mib['tpla'] / mib['mla']:.3f} | "
                  f"{tps['mla']:.2f} | {tps['tpla']:.2f} | {speedup:.2f}x |", flush=True)


# ---- quality ---------------------------------------------------------------------------------------

def train_checkpoint(a: argparse.Namespace) -> str:
    run_dir = a.run_dir or os.path.join("runs", "mla_quickstart", f"tpla-bench-{a.train_steps}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "launch/train.py", "+experiment=mla_quickstart", f"trainer.max_steps={a.train_steps}",
               f"trainer.save_interval={a.train_steps}", f"trainer.eval_interval={a.train_steps}", "logger=none",
               f"trainer.run_dir={run_dir}"]
    if a.train_steps <= 20:  # the experiment warms up for 20 steps
        command.append("optim.schedule.warmup_steps=0")
    print("training:", " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return run_dir


def val_windows(cfg, count: int, length: int) -> torch.Tensor:
    from trainer.data.prepare import prepare

    stream = prepare(cfg.data).tokens("val")
    stride = max(length, (len(stream) - length) // count)
    return torch.stack([torch.from_numpy(stream[i * stride:i * stride + length].astype("int64")) for i in range(count)])


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return math.exp(loss.item())


def run_quality(a: argparse.Namespace) -> None:
    checkpoint = a.checkpoint or train_checkpoint(a)
    model, cfg = load_model(checkpoint)
    windows = val_windows(cfg, a.windows, a.length)
    calibration = calibration_tokens(cfg, a.calibration_tokens)
    targets = windows[:, a.prefix + 1:]
    exact = teacher_forced_logits(model, windows, a.prefix, LatentDecoder(model).caches())[:, :-1]
    base_ppl = perplexity(exact, targets)
    print(f"quality: {checkpoint}; {a.windows} validation windows of {a.length} tokens, first {a.prefix} prefilled "
          f"(exact MLA), {a.length - a.prefix} decoded; PCA calibrated on {calibration.numel()} training tokens")
    print(f"exact MLA decode: validation perplexity {base_ppl:.3f}")
    print("| g | latent norm | transform | rel. logit error | perplexity | change |")
    print("|---|---|---|---|---|---|")
    for g in a.degrees:
        for norm in a.latent_norms:
            for transform in a.transforms:
                model, _ = load_model(checkpoint)  # the transforms are folded into the weights: a fresh copy
                tpla = TPLAConfig(enabled=True, degree=g, transform=transform, latent_norm=norm)
                decoder = LatentDecoder(model, tpla, calibration)
                logits = teacher_forced_logits(model, windows, a.prefix, decoder.caches())[:, :-1]
                rel = ((logits - exact).norm() / exact.norm()).item()
                ppl = perplexity(logits, targets)
                print(f"| {g} | {norm} | {transform} | {rel:.4f} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["speed", "quality"])
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 4])
    # speed
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--q-lora-rank", type=int, default=192)
    parser.add_argument("--kv-lora-rank", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    # quality
    parser.add_argument("--checkpoint", help="a trained mla_quickstart run or checkpoint (default: train one)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--run-dir", help="where --train-steps trains (default runs/mla_quickstart/tpla-bench-N)")
    parser.add_argument("--transforms", nargs="+", choices=TRANSFORMS, default=list(TRANSFORMS))
    parser.add_argument("--latent-norms", nargs="+", choices=LATENT_NORMS, default=list(LATENT_NORMS))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    a = parser.parse_args()
    if a.part == "speed":
        run_speed(a)
    else:
        run_quality(a)


if __name__ == "__main__":
    main()

"""MoE layer (one process): grouped GEMM vs the per-expert loop, and the routing overhead vs a dense MLP.

Forward+backward of one MoE layer on [batch, seq, hidden] tokens, median over rounds that
alternate the contenders (so machine noise hits each alike):

- experts "grouped_mm" (torch._grouped_mm) vs "loop" (one matmul per expert), same layer otherwise;
- the MoE layer (E experts, top-k, width F each) vs a dense SwiGLU of width k * F ("dense k*F"): the
  same active FLOPs per token, so the ratio is the price of routing, dispatch and combine. The
  headline ratio is the layer's default experts (grouped_gemm=auto: the loop on CPU, grouped_mm on
  CUDA in bf16 on compute capability >= 9.0); both GEMM modes are printed too.

    .venv/bin/python bench/moe_dispatch.py                     # CPU fp32, about half a minute
    .venv/bin/python bench/moe_dispatch.py --tokens 8192 --experts 64 --topk 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.init import materialize
from moe import MoEConfig, MoELayer


def step_time(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    start = time.perf_counter()
    fn().float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def layer(mode: str) -> MoELayer:
        cfg = MoEConfig(num_experts=args.experts, topk=args.topk, ffn_hidden_size=args.ffn, grouped_gemm=mode)
        with torch.device("meta"):
            m = MoELayer(cfg, args.hidden, init_std=0.02, output_init_std=0.02)
        return materialize(m, seed=0, device=device, dtype=dtype)

    grouped, loop = layer("grouped_mm"), layer("loop")
    probe = torch.zeros(1, args.hidden, device=device, dtype=dtype)
    auto = "moe grouped_mm" if layer("auto").experts.uses_grouped_mm(probe) else "moe loop"
    width = args.topk * args.ffn
    dense = [(torch.randn(width, args.hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
             for _ in range(3)]
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)

    def dense_mlp() -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, dense[0])) * F.linear(x, dense[1]), dense[2].t())

    contenders = {"moe grouped_mm": lambda: grouped(x), "moe loop": lambda: loop(x), "dense k*F": dense_mlp}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name, fn in contenders.items():  # warm-up
        step_time(fn, device)
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name].append(step_time(fn, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"device={device} dtype={dtype} tokens={args.tokens} hidden={args.hidden} E={args.experts} "
          f"k={args.topk} F={args.ffn} rounds={args.rounds}")
    for name, t in med.items():
        print(f"  {name:16s} {t * 1e3:8.2f} ms  {args.tokens / t:10.0f} tokens/s")
    print(f"  grouped_mm / loop time: {med['moe grouped_mm'] / med['moe loop']:.2f}")
    print(f"  moe grouped_mm / dense k*F time: {med['moe grouped_mm'] / med['dense k*F']:.2f}")
    print(f"  moe loop / dense k*F time: {med['moe loop'] / med['dense k*F']:.2f}")
    print(f"  moe (grouped_gemm=auto: {auto.removeprefix('moe ')}) / dense k*F time (routing overhead): "
          f"{med[auto] / med['dense k*F']:.2f}")


if __name__ == "__main__":
    main()

"""MLA vs GQA attention layers of the same hidden size: forward+backward time, saved activations,
and the decode cache per token (docs/mla.md).

Whole token-mixer layers (projections, RoPE, causal attention, output projection), fp32, batch 1,
one process, measured in the same run; the median over rounds that alternate the two layers so
machine noise hits both. The reference is GQA (`attention`):

- time: MLA fwd+bwd time / GQA fwd+bwd time at each T;
- memory: bytes of the distinct storages autograd saves for backward (what grows with T on CPU,
  which has no allocator statistics), MLA / GQA;
- decode cache: what a decoder keeps per token and layer, (kv_lora_rank + d_rope) for MLA against
  2 x kv_heads x head_dim for GQA (a computation, any machine).

Default shapes scale DeepSeek-V3's ratios down to hidden 512: 8 heads; GQA 2 K/V heads of 64;
MLA q latent 192, K/V latent 128, per head 64 (nope) + 32 (rope) query/key and 64 value channels.

    .venv/bin/python bench/mla.py                        # T = 1k .. 8k on CPU, about 2-4 minutes
    .venv/bin/python bench/mla.py --lens 1024 --rounds 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.config import MLAConfig, ModelConfig
from models.init import materialize
from models.layers.attention import Attention
from models.layers.mla import MultiHeadLatentAttention


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs its forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def fwd_bwd_seconds(layer: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out = layer(x)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def build_layers(args) -> dict[str, torch.nn.Module]:
    mla = MLAConfig(q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.nope,
                    qk_rope_head_dim=args.rope, v_head_dim=args.v)
    cfg = ModelConfig(vocab_size=32, hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=max(args.lens), mla=mla)
    layers = {}
    for name, cls in (("gqa", Attention), ("mla", MultiHeadLatentAttention)):
        with torch.device("meta"):
            layer = cls(cfg)
        layers[name] = materialize(layer, seed=0)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="GQA K/V heads")
    parser.add_argument("--q-lora-rank", type=int, default=192)
    parser.add_argument("--kv-lora-rank", type=int, default=128)
    parser.add_argument("--nope", type=int, default=64, help="MLA per-head query/key width without RoPE")
    parser.add_argument("--rope", type=int, default=32, help="MLA RoPE width (per query head, one shared key)")
    parser.add_argument("--v", type=int, default=64, help="MLA per-head value width")
    args = parser.parse_args()
    layers = build_layers(args)
    params = {name: sum(p.numel() for p in layer.parameters()) for name, layer in layers.items()}
    gqa_cache = 2 * args.kv_heads * (args.hidden // args.heads)
    mla_cache = args.kv_lora_rank + args.rope
    print(f"hidden={args.hidden} heads={args.heads}; GQA: {args.kv_heads} K/V heads of {args.hidden // args.heads}, "
          f"{params['gqa'] / 1e6:.2f}M params; MLA: q latent {args.q_lora_rank}, K/V latent {args.kv_lora_rank}, "
          f"heads {args.nope}+{args.rope} (q/k) x {args.v} (v), {params['mla'] / 1e6:.2f}M params")
    print(f"decode cache per token and layer: GQA {gqa_cache} values, MLA {mla_cache} values, "
          f"MLA/GQA {mla_cache / gqa_cache:.2f}")
    print(f"fwd+bwd of one layer, batch 1, fp32, {torch.get_num_threads()} threads, median of {args.rounds} "
          f"alternating rounds; memory = bytes saved for backward")
    print(f"{'T':>6} {'gqa ms':>9} {'mla ms':>9} {'gqa MiB':>9} {'mla MiB':>9}   ratios (MLA / GQA)")
    for seq_len in args.lens:
        x = torch.randn(1, seq_len, args.hidden, generator=torch.Generator().manual_seed(seq_len))
        times: dict[str, list[float]] = {name: [] for name in layers}
        for layer in layers.values():  # warm-up: allocator and the kernels' first-call work
            fwd_bwd_seconds(layer, x)
        for _ in range(args.rounds):
            for name, layer in layers.items():
                times[name].append(fwd_bwd_seconds(layer, x))
        memory = {name: saved_bytes(lambda layer=layer, x=x: layer(x)) / 2**20 for name, layer in layers.items()}
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        print(f"{seq_len:>6} {ms['gqa']:>9.1f} {ms['mla']:>9.1f} {memory['gqa']:>9.1f} {memory['mla']:>9.1f}   "
              f"time {ms['mla'] / ms['gqa']:.2f}x, saved activations {memory['mla'] / memory['gqa']:.2f}x")


if __name__ == "__main__":
    main()

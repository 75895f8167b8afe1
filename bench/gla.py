"""GLA kernels: chunkwise form vs the step recurrence and vs softmax attention (PyTorch SDPA).

Forward+backward of the token-mixing core only (no projections), all sides measured in the same
run on the same device, median over rounds that alternate the contenders to share machine noise.

- chunk_gla (torch path on CPU) vs fused_recurrent_gla (the step loop), T = 512 .. --max-recurrent-len
  Target: chunk >= 10x the step recurrence at T=2048.
- chunk_gla vs F.scaled_dot_product_attention(is_causal=True) at the same model width, T = 512 .. 8192
  Target: chunk faster than SDPA at T=8192.
- On CUDA (when available): the Triton chunk kernels vs the torch chunk path, and tokens/s of a full
  GLA layer vs a full attention layer (SDPA picks its FlashAttention kernel) in bf16 autocast.

Shapes follow a hidden size of --hidden with the paper's GLA widths: GLA has --gla-heads heads of
key dim hidden/2/heads and value dim hidden/heads; attention has --attn-heads heads of hidden/heads.

Memory: on CUDA the peak allocated bytes of one forward+backward; on CPU (no allocator statistics)
the bytes autograd saves for backward (distinct storages), which is what grows with T.

    .venv/bin/python bench/gla.py                       # CPU default, about 1-3 minutes
    .venv/bin/python bench/gla.py --lens 512 1024 --rounds 1
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

from kernels.dispatch import KernelsConfig
from kernels.gla import chunk_gla, fused_recurrent_gla


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while running `fn`."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def measure(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(seconds, MiB) of one forward+backward; MiB is CUDA peak or CPU saved-for-backward bytes."""
    def run() -> torch.Tensor:
        out = step()
        out.backward(torch.ones_like(out))
        return out

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    return elapsed, saved_tensor_bytes(step) / 2**20


def gla_inputs(batch, seq_len, heads, key_dim, value_dim, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(seq_len)

    def make(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q, k = make(batch, seq_len, heads, key_dim), make(batch, seq_len, heads, key_dim)
    v = make(batch, seq_len, heads, value_dim)
    g = (F.logsigmoid(torch.randn(batch, seq_len, heads, key_dim, generator=gen)) / 16)
    return q, k, v, g.to(device=device, dtype=torch.float32).requires_grad_()


def contenders(args, seq_len: int, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gla_k, gla_v = args.hidden // 2 // args.gla_heads, args.hidden // args.gla_heads
    q, k, v, g = gla_inputs(args.batch, seq_len, args.gla_heads, gla_k, gla_v, device, dtype)
    head_dim = args.hidden // args.attn_heads
    aq, ak, av = (torch.randn(args.batch, args.attn_heads, seq_len, head_dim, device=device, dtype=dtype)
                  .requires_grad_() for _ in range(3))
    torch_kernels = KernelsConfig(backend="torch")
    sides = {
        "chunk": lambda: chunk_gla(q, k, v, g, kernels=torch_kernels)[0],
        "sdpa": lambda: F.scaled_dot_product_attention(aq, ak, av, is_causal=True),
    }
    if seq_len <= args.max_recurrent_len:
        sides["recurrent"] = lambda: fused_recurrent_gla(q, k, v, g)[0]
    if device.type == "cuda":
        sides["triton"] = lambda: chunk_gla(q, k, v, g, kernels=KernelsConfig(backend="triton", on_missing="fail"))[0]
    return sides


def bench_kernels(args, device: torch.device) -> None:
    print(f"device={device} batch={args.batch} hidden={args.hidden} GLA heads={args.gla_heads} "
          f"(K={args.hidden // 2 // args.gla_heads}, V={args.hidden // args.gla_heads}) "
          f"SDPA heads={args.attn_heads} (D={args.hidden // args.attn_heads}); fwd+bwd, median of "
          f"{args.rounds} rounds; memory = {'CUDA peak' if device.type == 'cuda' else 'saved for backward'}")
    header = f"{'T':>6} {'side':>9} {'ms':>10} {'MiB':>9}"
    print(header + "   ratios (> 1: chunk faster)")
    for seq_len in args.lens:
        sides = contenders(args, seq_len, device)
        for step in sides.values():  # warm-up (allocator, kernel compilation)
            measure(step, device) if seq_len == args.lens[0] or device.type == "cuda" else None
        times: dict[str, list[float]] = {name: [] for name in sides}
        memory: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, step in sides.items():
                seconds, mib = measure(step, device)
                times[name].append(seconds)
                memory[name] = mib
        median = {name: statistics.median(values) for name, values in times.items()}
        for name in sides:
            ratio = ""
            if name != "chunk":
                ratio = f"{name}/chunk time {median[name] / median['chunk']:.2f}x"
            print(f"{seq_len:>6} {name:>9} {median[name] * 1e3:>10.1f} {memory[name]:>9.1f}   {ratio}")
        if "recurrent" in median and seq_len == 2048:
            verdict = "met" if median["recurrent"] >= 10 * median["chunk"] else "MISSED"
            print(f"       target chunk >= 10x recurrent at T=2048: {verdict}")
        if seq_len == 8192:
            verdict = "met" if median["sdpa"] > median["chunk"] else "MISSED"
            print(f"       target chunk faster than SDPA at T=8192: {verdict}")


def bench_layers_cuda(args, device: torch.device) -> None:
    """Tokens/s of a whole GLA layer vs a whole attention layer (bf16 autocast, fwd+bwd)."""
    from models.config import GLAConfig, ModelConfig
    from models.layers.attention import Attention
    from models.layers.gla import GatedLinearAttention

    cfg = ModelConfig(vocab_size=32000, hidden_size=args.hidden, num_heads=args.attn_heads,
                      token_mixers=["gla"], gla=GLAConfig(num_heads=args.gla_heads))
    print(f"\nlayers on {device}: hidden={args.hidden}, bf16 autocast, tokens/s of fwd+bwd (median of {args.rounds})")
    for seq_len in args.lens:
        batch = max(1, args.layer_tokens // seq_len)
        x = torch.randn(batch, seq_len, args.hidden, device=device, requires_grad=True)
        rates = {}
        for name, cls in (("gla", GatedLinearAttention), ("attention", Attention)):
            layer = cls(cfg).to(device)
            for p in layer.parameters():
                torch.nn.init.normal_(p, std=0.02)

            def step(layer=layer, x=x):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return layer(x).float()

            measure(step, device)
            seconds = statistics.median(measure(step, device)[0] for _ in range(args.rounds))
            rates[name] = batch * seq_len / seconds
        print(f"  T={seq_len:>6} batch={batch:>3}  gla {rates['gla']:>12,.0f} tok/s  attention "
              f"{rates['attention']:>12,.0f} tok/s  gla/attention {rates['gla'] / rates['attention']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--max-recurrent-len", type=int, default=2048,
                        help="longest T for the step recurrence (it is O(T) Python steps)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--gla-heads", type=int, default=4)
    parser.add_argument("--attn-heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer-tokens", type=int, default=16384, help="tokens per batch in the CUDA layer run")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    bench_kernels(args, device)
    if device.type == "cuda":
        bench_layers_cuda(args, device)


if __name__ == "__main__":
    main()

"""What the start-up log says about kernels: the implementation each op of this model will run.

The line must name what really runs (the fused C ParaRNN solver on CPU, Triton only on CUDA, the
expert GEMM path), decided from the config and the device with the same rules the layers apply at
their first call, so a missing fast path is visible before training starts.
"""
from __future__ import annotations

import torch

from kernels.dispatch import requested_backend, select_backend
from kernels.fast_paths import FastPaths
from kernels.pararnn import compile_available
from kernels.pararnn_cpu import fused_solver_available
from models.config import ModelConfig
from moe.experts import grouped_mm_supported

PARARNN_MIXERS = ("pararnn_gru", "pararnn_lstm")


def _pararnn_kernel(model: ModelConfig, device: torch.device) -> str:
    p, kernels = model.pararnn, model.kernels
    unavailable, fused = "", False
    if device.type == "cpu" and requested_backend(kernels) == "auto":
        fused, why = fused_solver_available(torch.float32)  # the recurrence runs in fp32 under any precision
        unavailable = "" if fused else f" (fused C solver unavailable: {why})"
    passes = "compiled torch passes" if p.compile and compile_available()[0] else "torch passes"
    torch_solver = f"{passes} + {select_backend(device, kernels, 'pararnn_scan')} scan"
    if not fused:
        return torch_solver + unavailable
    if p.newton_tol is None and p.newton_iterations > 0:
        return "fused C Newton solver and adjoint (kernels/pararnn_cpu.c)"
    # The C solver runs a fixed number of updates; adaptive Newton keeps the torch passes forward.
    return f"{torch_solver} forward, fused C adjoint backward (kernels/pararnn_cpu.c)"


def _gla_kernel(model: ModelConfig, device: torch.device) -> str:
    if model.gla.mode == "chunk":
        return f"{select_backend(device, model.kernels, 'chunk_gla')} chunkwise"
    return "torch recurrent"


def _expert_gemm(model: ModelConfig, device: torch.device, precision: str, etp: int) -> str:
    moe = model.moe
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    supported = grouped_mm_supported(device, dtype, model.hidden_size, moe.ffn_hidden_size // etp)
    grouped = moe.grouped_gemm == "grouped_mm" or (moe.grouped_gemm == "auto" and supported
                                                   and device.type == "cuda")
    return "torch._grouped_mm" if grouped else "one matmul per expert"


def kernel_plan(model: ModelConfig, device: torch.device, precision: str, etp: int = 1) -> dict[str, str]:
    """op -> the implementation this model's layers call on `device` (only ops the model has)."""
    plan: dict[str, str] = {}
    mixers = set(model.token_mixers)
    if "attention" in mixers:
        plan["attention"] = "torch SDPA"
    if "gla" in mixers:
        plan["gla"] = _gla_kernel(model, device)
    if mixers & set(PARARNN_MIXERS):
        plan["pararnn"] = _pararnn_kernel(model, device)
    if "moe" in model.channel_mixers:
        plan["moe_experts"] = _expert_gemm(model, device, precision, etp)
    return plan


def describe_kernels(plan: dict[str, str], fast: FastPaths) -> str:
    """`kernels: attention=torch SDPA, pararnn=...; triton=..., apex=installed, not used, ...`"""
    ops = ", ".join(f"{op}={impl}" for op, impl in plan.items())
    return f"kernels: {ops}; {fast.describe()}"

"""What the start-up log says about kernels: the implementation each op of this model will run.

The line must name what really runs (the fused C ParaRNN solver on CPU, Triton only on CUDA, the
expert GEMM path), decided from the config and the device with the same rules the layers apply at
their first call, so a missing fast path is visible before training starts. ParaRNN's line is the
description of the kernels.pararnn_plan.SolverPlan its layers build, from the same function.
"""
from __future__ import annotations

import torch

from kernels.dispatch import select_backend
from kernels.fast_paths import FastPaths
from kernels.pararnn_plan import plan_solver
from models.config import ModelConfig
from models.layers.pararnn import PARARNN_CELLS, newton_options, recurrence_dtype
from moe.experts import grouped_mm_chosen
from trainer.precision import precision_of

PARARNN_MIXERS = tuple(PARARNN_CELLS)


def _pararnn_kernel(model: ModelConfig, device: torch.device) -> str:
    """The plan the model's ParaRNN layers build on `device` (kernels.pararnn_plan, the same function
    they call), described. The recurrence runs in fp32 under any precision."""
    described = {name: plan_solver(PARARNN_CELLS[name](), device, recurrence_dtype(torch.float32),
                                   newton_options(model), model.kernels, model.pararnn.compile).describe()
                 for name in dict.fromkeys(model.token_mixers) if name in PARARNN_CELLS}
    if len(set(described.values())) == 1:
        return next(iter(described.values()))
    return "; ".join(f"{name}: {text}" for name, text in described.items())


def _gla_kernel(model: ModelConfig, device: torch.device) -> str:
    if model.gla.mode == "chunk":
        return f"{select_backend(device, model.kernels, 'chunk_gla')} chunkwise"
    return "torch recurrent"


def _expert_gemm(model: ModelConfig, device: torch.device, precision: str, etp: int) -> str:
    # The experts see the dtype of the weights (under bf16_autocast the stream stays fp32).
    dtype = precision_of(precision).param_dtype
    grouped = grouped_mm_chosen(model.moe.grouped_gemm, device, dtype, model.hidden_size,
                                model.moe.ffn_hidden_size // etp)
    return "torch._grouped_mm" if grouped else "one matmul per expert"


def kernel_plan(model: ModelConfig, device: torch.device, precision: str, etp: int = 1) -> dict[str, str]:
    """op -> the implementation this model's layers call on `device` (only ops the model has)."""
    plan: dict[str, str] = {}
    mixers = set(model.token_mixers)
    if "attention" in mixers:
        plan["attention"] = "torch SDPA"
    if "mla" in mixers:
        plan["mla"] = "torch SDPA (Q/K or V zero-padded to one head width in memory)"
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

"""What `trainer.precision` means: the dtype of the weights, autocast, loss scaling (docs/precision.md).

    fp32           fp32 weights, gradients and optimizer state (the default; the parity tests use it)
    bf16           Megatron's --bf16: bf16 weights compute in bf16; gradients accumulate in fp32 main
                   gradient buffers; the optimizer updates fp32 master weights and copies them back
    fp16           as bf16 with fp16 weights, plus dynamic loss scaling (optim.loss_scale_window)
    bf16_autocast  fp32 weights (so fp32 gradients and masters), forward under torch.autocast(bf16)
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "bf16_autocast")


@dataclass(frozen=True)
class Precision:
    """The pieces of one `trainer.precision` value."""

    name: str
    param_dtype: torch.dtype  # the model's weights, hence the activations between layers and stages
    autocast_dtype: torch.dtype | None  # the forward runs under torch.autocast(this) when set
    loss_scaling: bool  # fp16's narrow exponent needs a dynamic loss scale

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in (which peak FLOP/s MFU is measured against)."""
        return self.autocast_dtype or self.param_dtype

    @property
    def peak_key(self) -> str:
        """The column of trainer.mfu's peak table: bf16 and fp16 tensor cores share one peak."""
        return "fp32" if self.compute_dtype == torch.float32 else "bf16"

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def precision_of(name: str) -> Precision:
    """The Precision of a `trainer.precision` value (trainer.config.check_trainer has checked it)."""
    table = {
        "fp32": Precision("fp32", torch.float32, None, False),
        "bf16": Precision("bf16", torch.bfloat16, None, False),
        "fp16": Precision("fp16", torch.float16, None, True),
        "bf16_autocast": Precision("bf16_autocast", torch.float32, torch.bfloat16, False),
    }
    return table[name]


def cast_parameters(modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Cast every floating parameter to `dtype` in place (the same Parameter objects, so hooks and
    metadata stay). Buffers keep their dtype: RoPE frequencies and the MoE routing bias are fp32 state
    that the layers read in fp32."""
    for module in modules:
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)

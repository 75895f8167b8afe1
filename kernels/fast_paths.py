"""Which optional fast paths this process can use: Triton, apex, Transformer Engine.

None is required. They are probed by importing, once per call (no cached global), and the trainer
reports the result once at start-up so a missing fast path is never a silent fallback.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass


def module_importable(module: str) -> bool:
    """Whether `module` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class FastPaths:
    """Availability of each optional accelerated backend on this machine."""

    cuda: bool
    triton: bool  # Triton kernels need it and a CUDA device; otherwise the torch reference runs
    apex: bool
    transformer_engine: bool

    def describe(self) -> str:
        def flag(ok: bool) -> str:
            return "yes" if ok else "no"

        triton = flag(self.triton) + ("" if self.cuda or not self.triton else " (no CUDA: torch reference kernels)")
        return (f"cuda={flag(self.cuda)} triton={triton} apex={flag(self.apex)} "
                f"transformer_engine={flag(self.transformer_engine)}")


def detect_fast_paths() -> FastPaths:
    import torch

    return FastPaths(cuda=torch.cuda.is_available(), triton=module_importable("triton"), apex=module_importable("apex"),
                     transformer_engine=module_importable("transformer_engine"))

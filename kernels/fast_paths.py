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
        """Which optional packages are installed and whether anything here uses them.

        apex and Transformer Engine are reported as "installed, not used": no foldtron code calls them.
        """
        def installed(ok: bool, use: str) -> str:
            return f"installed, {use}" if ok else "not installed"

        triton_use = "used on CUDA" if self.cuda else "not used (no CUDA)"
        return (f"cuda={'yes' if self.cuda else 'no'}, triton={installed(self.triton, triton_use)}, "
                f"apex={installed(self.apex, 'not used')}, "
                f"transformer_engine={installed(self.transformer_engine, 'not used')}")


def detect_fast_paths() -> FastPaths:
    import torch

    return FastPaths(cuda=torch.cuda.is_available(), triton=module_importable("triton"), apex=module_importable("apex"),
                     transformer_engine=module_importable("transformer_engine"))

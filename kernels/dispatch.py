"""Choose between a kernel's Triton implementation and its pure-torch reference.

Every fused op in ``kernels/`` (GLA chunk, ParaRNN scan, ...) has a torch implementation that runs
everywhere and may have a Triton one that runs on CUDA. This module decides which one a call uses.
It holds no registry: each op module keeps its own constant table ``{"torch": fn, "triton": fn}``
and asks `select_backend` (or `pick`) which entry to call.

Resolution, in order:
1. the requested backend: ``FOLDTRON_KERNELS_BACKEND`` in the environment if set, else the
   ``KernelsConfig.backend`` passed in (default ``"auto"``);
2. ``"auto"`` means Triton when the tensors are on CUDA and ``import triton`` works, torch otherwise;
3. ``"triton"`` requested but unusable (no triton, or CPU tensors without ``TRITON_INTERPRET=1``):
   with ``on_missing="fallback"`` the torch path runs and a warning says so (Python shows a given
   warning once per call site, so the run says it once); with ``on_missing="fail"`` it raises.

Usage from an op module::

    from kernels.dispatch import KernelsConfig, pick
    IMPLS = {"torch": my_op_torch, "triton": my_op_triton}   # constant table
    def my_op(x, kernels: KernelsConfig | None = None):
        return pick(IMPLS, "my_op", x.device, kernels)(x)
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from kernels.fast_paths import module_importable

# Environment variable that overrides KernelsConfig.backend (useful for benchmarks and tests).
BACKEND_ENV = "FOLDTRON_KERNELS_BACKEND"
BACKENDS = ("auto", "torch", "triton")
ON_MISSING = ("fallback", "fail")


class KernelBackendWarning(UserWarning):
    """A requested fast kernel path is unavailable and the torch reference runs instead."""


@dataclass
class KernelsConfig:
    """Which implementation fused ops use (mountable as a top-level ``kernels`` config node)."""

    # "auto": Triton on CUDA when it imports, torch elsewhere (ParaRNN on CPU: its fused C kernels,
    # kernels/pararnn_cpu.py); "torch" or "triton" force one.
    backend: str = "auto"
    # When "triton" is requested but unusable: "fallback" runs torch with a warning, "fail" raises.
    on_missing: str = "fallback"


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported (not that a GPU is present)."""
    return module_importable("triton")


def triton_interpreter_on() -> bool:
    """True under ``TRITON_INTERPRET=1``, where Triton kernels run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend(cfg: KernelsConfig | None = None) -> str:
    """The backend asked for: the environment override, else the config, else "auto"."""
    value = os.environ.get(BACKEND_ENV) or (cfg.backend if cfg is not None else "auto")
    if value not in BACKENDS:
        source = BACKEND_ENV if os.environ.get(BACKEND_ENV) else "kernels.backend"
        raise ValueError(f"{source}={value!r}: unknown kernel backend. Fix: use one of {', '.join(BACKENDS)}")
    return value


def on_missing_policy(cfg: KernelsConfig | None = None) -> str:
    """kernels.on_missing ("fallback" when no config is given), checked."""
    on_missing = cfg.on_missing if cfg is not None else "fallback"
    if on_missing not in ON_MISSING:
        raise ValueError(f"kernels.on_missing={on_missing!r}: unknown policy. Fix: use one of "
                         f"{', '.join(ON_MISSING)}")
    return on_missing


def resolve_backend(device: torch.device, cfg: KernelsConfig | None = None,
                    has_triton: bool = True) -> tuple[str, str]:
    """("torch" | "triton", why Triton cannot run) for an op on `device`, without warning.

    The reason is non-empty only when Triton was asked for by name and cannot run here; the torch
    reference is then the backend, and the caller reports it (`report_missing_triton`).
    """
    requested = requested_backend(cfg)
    on_missing_policy(cfg)
    usable, why = _triton_usable(device, has_triton)
    if requested == "torch":
        return "torch", ""
    if requested == "auto":
        return ("triton" if usable and device.type == "cuda" else "torch"), ""
    if usable:
        return "triton", ""
    return "torch", why


def report_missing_triton(op_name: str, why: str, cfg: KernelsConfig | None = None, stacklevel: int = 2) -> None:
    """Triton was requested for `op_name` but cannot run (`why`): raise under on_missing="fail",
    else warn (KernelBackendWarning) that the torch reference runs; `stacklevel` as in warnings.warn."""
    message = (f"{op_name}: Triton backend requested ({BACKEND_ENV} or kernels.backend=triton) but {why}")
    if on_missing_policy(cfg) == "fail":
        raise RuntimeError(f"{message}. Fix: install triton / run on CUDA, or set kernels.backend=auto")
    warnings.warn(f"{message}; using the torch reference implementation", KernelBackendWarning,
                  stacklevel=stacklevel + 1)


def select_backend(
    device: torch.device,
    cfg: KernelsConfig | None = None,
    op_name: str = "kernel",
    has_triton: bool = True,
) -> str:
    """Return "torch" or "triton" for an op on `device`; `has_triton` says whether the op has one.

    A Triton backend requested by name that cannot run warns or raises here (`report_missing_triton`).
    """
    backend, missing = resolve_backend(device, cfg, has_triton)
    if missing:
        report_missing_triton(op_name, missing, cfg, stacklevel=3)
    return backend


def pick(
    impls: Mapping[str, Callable],
    op_name: str,
    device: torch.device,
    cfg: KernelsConfig | None = None,
) -> Callable:
    """The implementation of `op_name` from `impls` ({"torch": ..., optional "triton": ...}) to call."""
    return impls[select_backend(device, cfg, op_name, has_triton="triton" in impls)]


def _triton_usable(device: torch.device, has_triton: bool) -> tuple[bool, str]:
    if not has_triton:
        return False, "this op has no Triton kernel"
    if not triton_importable():
        return False, "triton is not installed"
    if device.type != "cuda" and not triton_interpreter_on():
        return False, f"tensors are on {device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    return True, ""

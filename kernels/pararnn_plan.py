"""How a ParaRNN solve runs: its Newton options and its backends, decided once per layer.

A `SolverPlan` names the implementation of each part of a solve (docs/pararnn.md, "Backends"):

    forward   "fused_c"   the fused C Newton solve (kernels/pararnn_cpu.c): CPU, fixed-iteration mode
              "compiled"  the torch passes, fused by torch.compile
              "eager"     the torch passes
    scan      "triton"    the linear scan the torch passes run (forward and adjoint): Triton kernels
              "torch"     ... or the torch scan
    backward  "fused_c"   the fused C adjoint (kernels/pararnn_cpu.c): CPU
              "torch"     the torch adjoint passes, compiled when the forward is "compiled"

`plan_solver` derives it from (cell, device, dtype, NewtonOptions, KernelsConfig, compiled) alone, and
never warns: a fast path that applies but cannot run here is recorded in the plan (`fused_unavailable`,
`compile_unavailable`, `triton_unavailable`). `build_solver_plan` also reports those as
`kernels.on_missing` says (warn and run the reference, or raise). A ParaRNN layer builds its plan with
it once per (device, dtype), on its first forward; kernels.pararnn's newton_solve and adjoint run
what the plan says; the start-up kernel report prints `plan_solver(...).describe()`. One function
decides, so the report names what runs.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from kernels import pararnn_cpu
from kernels.dispatch import KernelsConfig, on_missing_policy, report_missing_triton, resolve_backend

FORWARD_SOLVERS = ("fused_c", "compiled", "eager")
SCANS = ("triton", "torch")
BACKWARDS = ("fused_c", "torch")


@dataclass(frozen=True)
class NewtonOptions:
    """How many Newton updates a solve runs and when it counts as converged."""

    # Updates in fixed mode (tol is None); the paper uses 3.
    iterations: int = 3
    # Adaptive mode when set: stop once max |residual| <= tol, after at most max_iterations updates.
    tol: float | None = None
    # Upper bound on updates in adaptive mode (T updates always reach the exact solution).
    max_iterations: int = 20
    # Fixed mode: warn when the final max |residual| is above this.
    warn_residual: float = 1e-3

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"newton iterations={self.iterations}: must be >= 0. Fix: use e.g. 3")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"newton tol={self.tol}: must be > 0. Fix: use e.g. 1e-5, or None for fixed mode")
        if self.max_iterations < 1:
            raise ValueError(f"newton max_iterations={self.max_iterations}: must be >= 1. Fix: use e.g. 20")


@dataclass(frozen=True)
class SolverPlan:
    """The implementation each part of a ParaRNN solve runs (see the module docstring)."""

    forward: str = "eager"
    scan: str = "torch"
    backward: str = "torch"
    # Why a fast path that applies cannot run here ("" when nothing is missing): the fused C
    # kernels, torch.compile (when asked for), Triton (when asked for by name).
    fused_unavailable: str = ""
    compile_unavailable: str = ""
    triton_unavailable: str = ""

    def __post_init__(self) -> None:
        for name, value, allowed in (("forward", self.forward, FORWARD_SOLVERS), ("scan", self.scan, SCANS),
                                     ("backward", self.backward, BACKWARDS)):
            if value not in allowed:
                raise ValueError(f"SolverPlan.{name}={value!r}; use one of {', '.join(allowed)}")
        if self.forward == "fused_c" and self.backward != "fused_c":
            raise ValueError("SolverPlan: a fused_c forward needs the fused_c backward (the fused kernels "
                             "apply to both or to neither)")

    @property
    def compiled(self) -> bool:
        """Whether the torch passes (forward, and the torch backward) run compiled."""
        return self.forward == "compiled"

    def describe(self) -> str:
        """What runs, as the start-up kernel line says it."""
        passes = "compiled torch passes" if self.compiled else "torch passes"
        torch_solver = f"{passes} + {self.scan} scan"
        if self.backward != "fused_c":
            missing = f" (fused C solver unavailable: {self.fused_unavailable})" if self.fused_unavailable else ""
            return torch_solver + missing
        if self.forward == "fused_c":
            return "fused C Newton solver and adjoint (kernels/pararnn_cpu.c)"
        # The C solver runs a fixed number of updates; adaptive Newton keeps the torch passes forward.
        return f"{torch_solver} forward, fused C adjoint backward (kernels/pararnn_cpu.c)"


@functools.cache
def compile_available() -> tuple[bool, str]:
    """(True, "") when torch.compile can fuse the solver's passes here, else (False, why).

    Compiles and runs a tiny function once per process (cached): on CPU inductor needs a working
    C++ compiler.
    """
    try:
        probe = torch.compile(lambda x: torch.sigmoid(x) * x + 1, dynamic=False)
        x = torch.linspace(-1, 1, 8, device="cpu")  # explicit: models are built under torch.device("meta")
        if not torch.allclose(probe(x), torch.sigmoid(x) * x + 1):
            return False, "torch.compile gave a wrong result on a probe"
    except Exception as err:  # noqa: BLE001 - any failure means "use eager"; the reason is reported
        return False, f"{type(err).__name__}: {err}".splitlines()[0]
    return True, ""


def plan_solver(cell: object, device: torch.device | str, dtype: torch.dtype,
                options: NewtonOptions = NewtonOptions(), kernels: KernelsConfig | None = None,
                compiled: bool = False, fused_inputs: bool = True) -> SolverPlan:
    """The plan for solving `cell` on inputs of (device, dtype) (the recurrence's compute dtype).

    - forward: the fused C solve where the fused kernels apply (kernels.backend auto, a cell that
      opts in with `fused_cpu_cell`, CPU, float32/float64, the kernel builds) and Newton runs a fixed
      number (> 0) of updates; else the torch passes, compiled when `compiled` (torch.compile asked
      for: model.pararnn.compile) and torch.compile works here.
    - backward: the fused C adjoint wherever the fused kernels apply (adaptive mode too).
    - scan: kernels.dispatch's choice for "pararnn_scan" (Triton on CUDA under auto).
    `fused_inputs=False` says the inputs are not of the shapes the fused kernel reads
    (pararnn_cpu.fused_inputs_fit), so it does not apply. Pure: nothing is warned or raised for a
    missing fast path; `build_solver_plan` does that.
    """
    device = torch.device(device)
    scan, triton_unavailable = resolve_backend(device, kernels, has_triton=True)
    fused, fused_unavailable = (pararnn_cpu.fused_solver_status(cell, device, dtype, kernels) if fused_inputs
                                else (False, ""))
    compiled, compile_unavailable = compile_available() if compiled else (False, "")
    fixed_updates = options.tol is None and options.iterations > 0
    if fused and fixed_updates:
        forward = "fused_c"
    else:
        forward = "compiled" if compiled else "eager"
    return SolverPlan(forward=forward, scan=scan, backward="fused_c" if fused else "torch",
                      fused_unavailable=fused_unavailable, compile_unavailable=compile_unavailable,
                      triton_unavailable=triton_unavailable)


def report_missing(plan: SolverPlan, kernels: KernelsConfig | None, stacklevel: int = 2) -> None:
    """Warn about (kernels.on_missing="fallback") or refuse ("fail") each fast path the plan could not
    use; `stacklevel` counted from the caller."""
    on_missing = on_missing_policy(kernels)
    if plan.compile_unavailable:
        why = plan.compile_unavailable
        if on_missing == "fail":
            raise RuntimeError(f"model.pararnn.compile=true but torch.compile does not work here ({why}). Fix: "
                               "set model.pararnn.compile=false, or model.kernels.on_missing=fallback to run eager")
        warnings.warn(f"model.pararnn.compile=true but torch.compile does not work here ({why}); "
                      "the ParaRNN solver runs eager (model.kernels.on_missing=fallback)", stacklevel=stacklevel + 1)
    if plan.triton_unavailable:
        report_missing_triton("pararnn_scan", plan.triton_unavailable, kernels, stacklevel=stacklevel + 1)
    if plan.fused_unavailable:
        pararnn_cpu.report_missing_fused_solver(plan.fused_unavailable, kernels, stacklevel=stacklevel + 1)


def build_solver_plan(cell: object, device: torch.device | str, dtype: torch.dtype,
                      options: NewtonOptions = NewtonOptions(), kernels: KernelsConfig | None = None,
                      compiled: bool = False, fused_inputs: bool = True) -> SolverPlan:
    """`plan_solver`, with every missing fast path reported as kernels.on_missing says (warn, or raise)."""
    plan = plan_solver(cell, device, dtype, options, kernels, compiled, fused_inputs)
    report_missing(plan, kernels, stacklevel=2)
    return plan

"""ParaRNN's fixed-iteration Newton solve as one fused C kernel on CPU (kernels/pararnn_cpu.c).

The torch.compile solver is bounded by memory traffic on CPU: it writes every step's Jacobian and
residual and reads them back in the scan. The C kernel evaluates the cell, its Jacobian and the
scan's recurrence in one loop and updates h in place (the file's header says how the parallel scan
is split into phases). It is built on first use with the system C compiler (`CC`, default `cc`),
cached on disk, and loaded with ctypes: no Python build step and no torch headers.

It also runs the backward: the adjoint scan and the cell's vector-Jacobian products in one reverse
sweep. Supported: the ParaGRU and ParaLSTM cells, float32 and float64; the forward in fixed-iteration
mode (the adaptive mode's per-update residual checks stay in torch).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from kernels.dispatch import KernelBackendWarning, KernelsConfig, requested_backend

SOURCE = Path(__file__).with_name("pararnn_cpu.c")
# Must match the enum in pararnn_cpu.c.
CELL_IDS = {"gru": 0, "lstm": 1}
MAX_SLAB = 512  # pararnn_cpu.c's MAX_SLAB
# Narrowest channel slab the split makes before it cuts time into chunks (a few vector registers).
MIN_SLAB = 32
# Shortest time chunk worth a parallel-scan pass (shorter ones are mostly fixed cost).
MIN_CHUNK = 64
# Chunks per thread when time must be split: chunk 0 is final after phase 1, so more chunks keep
# both phases' loads even.
CHUNKS_PER_THREAD = 4
CACHE_ENV = "FOLDTRON_KERNEL_CACHE"
# -fno-trapping-math lets gcc vectorise the clamped exp's conditionals; 512-bit vectors where the CPU
# has them (measured 10.2 -> 7.8 ms for the LSTM solve at T = 4096 on AVX-512); ignored elsewhere.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-mprefer-vector-width=512",
         "-std=gnu11", "-shared", "-fPIC")
_DTYPES = {torch.float32: ("float32", ["-DREAL=float"], ctypes.c_float),
           torch.float64: ("float64", ["-DREAL=double", "-DREAL_IS_DOUBLE"], ctypes.c_double)}


def work_split(batch: int, channels: int, seq_len: int, threads: int) -> tuple[int, int]:
    """(slab width, time chunks per sequence) for the kernel's work items.

    Channels are independent, so splitting them costs nothing: slabs narrow (down to MIN_SLAB) until
    batch x slabs items fill the threads. Only then is time cut into chunks, which doubles the work
    (parallel scan: reduce, then sweep), so it pays only beyond two threads per item.
    """
    if min(batch, channels, seq_len, threads) < 1:
        raise ValueError(f"work_split needs positive sizes, got batch={batch} channels={channels} "
                         f"seq_len={seq_len} threads={threads}")
    slab = min(channels, MAX_SLAB)
    while batch * -(-channels // slab) < threads and slab > MIN_SLAB:
        slab = max(MIN_SLAB, -(-slab // 2))
    items = batch * -(-channels // slab)
    chunks = 1
    if items * 2 < threads:
        chunks = min(CHUNKS_PER_THREAD * -(-threads // items), max(1, seq_len // MIN_CHUNK))
    return slab, chunks


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "foldtron", "kernels")
    return Path(root)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (one cache may serve several hosts)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _build(dtype_name: str, defines: list[str]) -> Path:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} (the CC environment variable, default cc) is not on PATH")
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, _cpu_signature(), *FLAGS,
                                    *defines]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"pararnn_cpu_{dtype_name}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: ranks of one job may build at the same time.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, *defines, str(SOURCE), "-o", str(out), "-lm"],
                                check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(out, target)
    return target


@functools.cache
def _library(dtype: torch.dtype):
    dtype_name, defines, c_real = _DTYPES[dtype]
    lib = ctypes.CDLL(str(_build(dtype_name, defines)))
    ptr, long, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    solve, adjoint = lib.pararnn_newton_solve, lib.pararnn_adjoint
    solve.argtypes = [int_, ptr, ptr, ptr, ptr, long, long, long, int_, int_, long, long, ctypes.POINTER(c_real)]
    adjoint.argtypes = [int_, ptr, ptr, ptr, ptr, ptr, long, long, long, int_, long, long, ptr, ptr, ptr]
    solve.restype = adjoint.restype = int_
    return solve, adjoint, c_real


@functools.cache
def fused_solver_available(dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """(True, "") when the kernel for `dtype` builds and loads here, else (False, why); once per process."""
    if dtype not in _DTYPES:
        return False, f"no kernel for {dtype} (float32 and float64 only)"
    try:
        _library(dtype)
    except (RuntimeError, OSError) as err:
        return False, str(err).splitlines()[0]
    return True, ""


def fused_cell_id(cell: object) -> int | None:
    """The kernel's id for `cell`'s f, or None. Cells opt in with a class attribute `fused_cpu_cell`
    ("gru" or "lstm") set on their own class: a subclass that changes f does not inherit it."""
    name = type(cell).__dict__.get("fused_cpu_cell")
    return CELL_IDS.get(name) if isinstance(name, str) else None


def fused_solver_status(cell: object, device: torch.device | str, dtype: torch.dtype,
                        kernels: KernelsConfig | None) -> tuple[bool, str]:
    """Whether the fused kernels (solve and adjoint) serve `cell` for inputs on (device, dtype), without
    warning: (True, ""); (False, "") where they do not apply (kernels.backend not auto: torch asks for
    the reference passes; a cell that does not opt in; not CPU; not float32/float64); (False, why)
    where they apply but the kernel cannot be built here (`report_missing_fused_solver` says so)."""
    if (fused_cell_id(cell) is None or requested_backend(kernels) != "auto" or torch.device(device).type != "cpu"
            or dtype not in _DTYPES):
        return False, ""
    return fused_solver_available(dtype)


def fused_inputs_fit(cell: object, u: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether `u` and `params` are what the kernel reads for `cell`: u [B, T, 3, N], a [3, N] (and
    p [2, N] for the LSTM), all of one dtype and device."""
    cell_id = fused_cell_id(cell)
    if cell_id is None or u.dim() != 4 or u.shape[2] != 3:
        return False
    shapes = [(3, u.shape[3])] + ([(2, u.shape[3])] if cell_id == CELL_IDS["lstm"] else [])
    return len(params) == len(shapes) and all(tuple(p.shape) == s and p.dtype == u.dtype and p.device == u.device
                                              for p, s in zip(params, shapes))


def report_missing_fused_solver(why: str, kernels: KernelsConfig | None, stacklevel: int = 2) -> None:
    """The fused kernels apply but cannot be built (`why`): raise under kernels.on_missing="fail",
    else warn (KernelBackendWarning) that the torch passes run; `stacklevel` counted from the caller."""
    missing = f"ParaRNN: the fused CPU Newton solver is unavailable ({why})"
    fix = "Fix: install a C compiler with OpenMP (gcc) or set CC"
    if kernels is not None and kernels.on_missing == "fail":
        raise RuntimeError(f"{missing} and model.kernels.on_missing=fail. {fix}, or set "
                           "model.kernels.on_missing=fallback to run the torch passes")
    warnings.warn(f"{missing}; the torch passes run instead (2-3x slower at T = 4096). {fix}",
                  KernelBackendWarning, stacklevel=stacklevel + 1)


def fused_solver_applies(cell: object, u: torch.Tensor, params: Sequence[torch.Tensor],
                         kernels: KernelsConfig | None) -> bool:
    """Whether the fixed-iteration CPU solve can run on these inputs: `fused_inputs_fit` and
    `fused_solver_status`. (A ParaRNN layer decides once, in its kernels.pararnn_plan.SolverPlan.)

    When everything applies but the kernel cannot be built: warns (KernelBackendWarning), or raises
    under kernels.on_missing="fail".
    """
    if not fused_inputs_fit(cell, u, params):
        return False
    ok, why = fused_solver_status(cell, u.device, u.dtype, kernels)
    if why:
        report_missing_fused_solver(why, kernels, stacklevel=2)
    return ok


def fused_newton_solve(cell: object, u: torch.Tensor, params: Sequence[torch.Tensor], updates: int,
                       split: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """States [B, T, (2,) N] after h^0_t = f(0, u_t) and `updates` Newton updates, and the final
    max |residual| (0-dim). `split` = (slab, chunks) overrides `work_split` (tests use it)."""
    solve, _, c_real = _library(u.dtype)
    cell_id, u, a, p = _kernel_args(cell, u, params)
    batch, seq_len, _, n = u.shape
    state = u.new_empty((batch, seq_len, n) if cell_id == CELL_IDS["gru"] else (batch, seq_len, 2, n))
    if seq_len == 0:
        return state, u.new_zeros(())
    threads, slab, chunks = _threads_and_split(batch, n, seq_len, split)
    residual = c_real()
    _check(solve(cell_id, u.data_ptr(), a.data_ptr(), _ptr(p), state.data_ptr(), batch, seq_len, n, updates,
                 threads, slab, chunks, ctypes.byref(residual)), slab, chunks, seq_len, threads)
    return state, torch.tensor(residual.value, dtype=u.dtype)


def fused_adjoint(cell: object, u: torch.Tensor, params: Sequence[torch.Tensor], h: torch.Tensor,
                  grad_h: torch.Tensor, split: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """[dL/du, dL/da(, dL/dp)] for dL/dh = grad_h through the solved states h: the adjoint scan and
    the vector-Jacobian products of f in one reverse sweep (the C file says how). `split` as in
    `fused_newton_solve`."""
    _, adjoint, _ = _library(u.dtype)
    cell_id, u, a, p = _kernel_args(cell, u, params)
    batch, seq_len, _, n = u.shape
    grads = [torch.empty_like(u), torch.empty_like(a)] + ([torch.empty_like(p)] if p is not None else [])
    if seq_len == 0:
        return [g.zero_() for g in grads]
    h, grad_h = h.contiguous(), grad_h.to(u.dtype).contiguous()  # grad_h may be an expanded view
    threads, slab, chunks = _threads_and_split(batch, n, seq_len, split)
    _check(adjoint(cell_id, u.data_ptr(), a.data_ptr(), _ptr(p), h.data_ptr(), grad_h.data_ptr(), batch, seq_len,
                   n, threads, slab, chunks, grads[0].data_ptr(), grads[1].data_ptr(),
                   _ptr(grads[2] if p is not None else None)), slab, chunks, seq_len, threads)
    return grads


def _threads_and_split(batch: int, n: int, seq_len: int, split: tuple[int, int] | None) -> tuple[int, int, int]:
    threads = torch.get_num_threads()
    return (threads, *(split if split is not None else work_split(batch, n, seq_len, threads)))


def _kernel_args(cell: object, u: torch.Tensor, params: Sequence[torch.Tensor]):
    cell_id = fused_cell_id(cell)
    p = params[1].contiguous() if cell_id == CELL_IDS["lstm"] else None
    return cell_id, u.contiguous(), params[0].contiguous(), p


def _ptr(x: torch.Tensor | None) -> int | None:
    return x.data_ptr() if x is not None else None


def _check(status: int, slab: int, chunks: int, seq_len: int, threads: int) -> None:
    if status == -1:
        raise MemoryError("pararnn_cpu: out of memory for the kernel's chunk buffers")
    if status != 0:
        raise ValueError(f"pararnn_cpu: bad arguments (slab={slab}, chunks={chunks}, T={seq_len}, "
                         f"threads={threads})")

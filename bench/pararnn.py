"""ParaRNN speed: the parallel solve (Newton + scan, adjoint backward) vs the sequential loop.

Times forward + backward of the recurrence of ParaGRU and ParaLSTM (input projections u given, as
the part ParaRNN parallelises; the projections cost the same in both modes) for hidden 256 at
T = 1024, 4096, 16384, batch 1, in the same run. Prints the speedup (sequential / parallel, medians
over --rounds alternating rounds), the Newton iterations, the final residual and the largest
difference between the two modes' states. Target on CPU: >= 30x at T = 4096.

On CPU the solve and its adjoint backward are the fused C kernels (kernels/pararnn_cpu.c, built on
first use); FOLDTRON_KERNELS_BACKEND=torch times the torch passes instead. The passes (on CUDA, or
under that override) are fused by torch.compile when that works here (inductor needs a C++
compiler on CPU; `--compile auto`, the default) and run eagerly otherwise; the header says which.
Compilation happens in the untimed warm-up run. The sequential reference is always the plain
eager loop. On a shared machine other jobs slow the 2-thread parallel solve far more than the
single-threaded loop: compare numbers from quiet runs.

On CUDA it also times the Triton scan against the torch scan, and runs the comparison with each
scan backend, with the speedup at T = 4096 next to the paper's up to 665x (Danieli et al. 2025).

    .venv/bin/python bench/pararnn.py [--lengths 1024 4096 16384] [--cells gru lstm] [--threads N]
                                      [--rounds 5] [--repeats 3]
                                      [--compile auto|on|off] [--malloc default|keep] [--parts modes scan]
                                      [--scan-backends torch triton]

`--malloc keep` (glibc only) stops malloc from handing freed memory back to the OS between passes:
by default glibc trims the heap and re-faults every page of the solver's next large buffers (about
10 ms of page faults per LSTM solve at T = 4096; jemalloc/tcmalloc avoid the same). It applies to
the whole process, the sequential reference included.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.dispatch import BACKEND_ENV, KernelsConfig, requested_backend
from kernels.pararnn import (
    NewtonOptions,
    compile_available,
    linear_scan,
    parallel_recurrence,
    sequential_recurrence,
)
from kernels.pararnn_cpu import fused_solver_available
from models.layers.pararnn import ParaGRU, ParaLSTM

PAPER_SPEEDUP_T4096 = 665.0
LAYERS = {"gru": ParaGRU, "lstm": ParaLSTM}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def interleaved_medians(parallel: Callable[[], object], sequential: Callable[[], object], rounds: int,
                        repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of each mode, measured in alternation: `rounds` x (`repeats` parallel runs, one
    sequential run).

    Alternating makes both modes sample the same stretches of a shared machine: on this VM the same
    sequential LSTM loop took 0.9 s in one minute and 1.1-1.47 s in another, and back-to-back blocks let
    such drift land on one side of the ratio only.
    """
    parallel()  # warm-up: compiles the solver's passes
    t_par, t_seq = [], []
    for _ in range(rounds):
        t_par.extend(timed(parallel, device) for _ in range(repeats))
        t_seq.append(timed(sequential, device))
    return statistics.median(t_par), statistics.median(t_seq)


def recurrence_inputs(cell_name: str, hidden: int, batch: int, seq_len: int, device: torch.device, seed: int):
    """A layer initialised as in training, and the projections u of a random input (requires grad)."""
    torch.manual_seed(seed)
    layer = LAYERS[cell_name](hidden).to(device)
    with torch.no_grad():
        u = layer.input_projections(torch.randn(batch, seq_len, hidden, device=device))
    params = [getattr(layer, name).detach().requires_grad_(True) for name in layer.recurrent_names]
    return layer.cell, u.requires_grad_(True), params


def compare_modes(cell_name: str, seq_len: int, args, device: torch.device, kernels: KernelsConfig | None,
                  compiled: bool) -> dict:
    cell, u, params = recurrence_inputs(cell_name, args.hidden, args.batch, seq_len, device, args.seed)
    options = NewtonOptions(iterations=args.iterations)
    reports = []

    def fresh_grads() -> None:
        # As in a training step, the backward writes new gradients instead of adding to old ones.
        for leaf in (u, *params):
            leaf.grad = None

    def parallel() -> torch.Tensor:
        fresh_grads()
        h, report = parallel_recurrence(cell, u, params, options, kernels, compiled)
        h.sum().backward()
        reports.append(report)
        return h

    def sequential() -> torch.Tensor:
        fresh_grads()
        h = sequential_recurrence(cell, u, params)
        h.sum().backward()
        return h

    t_par, t_seq = interleaved_medians(parallel, sequential, args.rounds, args.repeats, device)
    diff = float((parallel() - sequential()).detach().abs().max())
    return {"cell": cell_name, "T": seq_len, "parallel_s": t_par, "sequential_s": t_seq,
            "speedup": t_seq / t_par, "iterations": reports[-1].iterations,
            "residual": float(reports[-1].residual), "max_diff": diff}


def scan_backends(seq_len: int, args, device: torch.device) -> list[dict]:
    """Triton vs torch scan (forward only) for both Jacobian structures."""
    rows = []
    for structure in ("diagonal", "block2"):
        block = () if structure == "diagonal" else (2,)
        b = torch.randn(args.batch, seq_len, *block, args.hidden, device=device)
        a = torch.rand(args.batch, seq_len, *block, *block, args.hidden, device=device) * (0.9 if not block else 0.45)
        times = {}
        for name in ("torch", "triton"):
            config = KernelsConfig(backend=name, on_missing="fail")
            times[name] = median_seconds(
                lambda a=a, b=b, s=structure, c=config: linear_scan(a, b, s, kernels=c), args.repeats, device)
        err = float((linear_scan(a, b, structure, kernels=KernelsConfig(backend="torch"))
                     - linear_scan(a, b, structure, kernels=KernelsConfig(backend="triton"))).abs().max())
        rows.append({"structure": structure, "T": seq_len, **times, "max_diff": err})
    return rows


def print_mode_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'cell':5} {'T':>6} {'parallel':>10} {'sequential':>11} {'speedup':>8} {'newton':>7} "
          f"{'residual':>9} {'max|par-seq|':>12}")
    for r in rows:
        print(f"{r['cell']:5} {r['T']:>6} {r['parallel_s'] * 1e3:>8.1f}ms {r['sequential_s'] * 1e3:>9.1f}ms "
              f"{r['speedup']:>7.1f}x {r['iterations']:>7} {r['residual']:>9.1e} {r['max_diff']:>12.1e}")


def keep_freed_memory() -> str:
    """Pin glibc's mmap and trim thresholds so freed buffers stay in the heap; returns what was set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as err:
        return f"not set ({err})"
    # mallopt params: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3; 32 MiB is glibc's largest mmap threshold.
    # Setting either one also turns off glibc's own adaptive thresholds.
    ok = libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1
    return "glibc keeps freed memory (mmap threshold 32 MiB, trim threshold 1 GiB)" if ok else "mallopt failed"


def print_machine_load(when: str) -> None:
    """The 1-minute load average: other jobs on the cores slow the multi-threaded parallel solve most."""
    if not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    # Only judged before the run: afterwards the average includes this bench's own threads.
    busy = " (busy: other jobs share the cores, speedups will read low)" if when == "start" and load > cores - 0.5 else ""
    print(f"load average at {when}: {load:.2f} on {cores} cores{busy}")


def solver_description(device: torch.device, compiled: bool, why_not: str) -> str:
    """Which code runs the parallel solve: the fused C kernels on CPU (unless FOLDTRON_KERNELS_BACKEND
    asks for the torch passes), else the passes, compiled or eager."""
    passes = "torch.compile (fused passes)" if compiled else f"eager passes ({why_not})"
    if device.type != "cpu":
        return passes
    fused, why = fused_solver_available()
    if fused and requested_backend() == "auto":
        return "forward and backward: fused C kernels (kernels/pararnn_cpu.c)"
    reason = f"{BACKEND_ENV}={requested_backend()}" if fused else f"fused C kernel unavailable: {why}"
    return f"forward and backward: {passes} ({reason})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=sorted(LAYERS))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3, help="Newton updates (fixed mode)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurement rounds; each times --repeats parallel solves and one sequential loop")
    parser.add_argument("--repeats", type=int, default=3, help="parallel solves per round (medians over all rounds); on CUDA also the "
                             "timed runs of each scan backend")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="fuse the parallel solve's passes with torch.compile (auto: when it works here); "
                             "the sequential reference always runs eagerly")
    parser.add_argument("--malloc", choices=["default", "keep"], default="default",
                        help="keep: glibc malloc keeps freed memory instead of trimming (see the module docstring)")
    parser.add_argument("--scan-backends", nargs="+", choices=["torch", "triton"], default=["torch", "triton"],
                        help="CUDA: the scan backends the parallel solve is timed with")
    parser.add_argument("--parts", nargs="+", choices=["modes", "scan"], default=["modes", "scan"],
                        help="modes: parallel vs sequential; scan: Triton vs torch scan (CUDA only)")
    args = parser.parse_args()
    malloc = "default" if args.malloc == "default" else keep_freed_memory()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compiled, why_not = False, "--compile off"
    if args.compile != "off":
        compiled, why_not = compile_available()
        if args.compile == "on" and not compiled:
            raise SystemExit(f"--compile on, but torch.compile does not work here: {why_not}")
    solver = solver_description(device, compiled, why_not)
    print(f"ParaRNN bench: device={device} threads={torch.get_num_threads()} hidden={args.hidden} "
          f"batch={args.batch} newton_iterations={args.iterations}; reference = sequential loop (eager), same run")
    print(f"parallel solve: {solver}; malloc: {malloc}")
    print_machine_load("start")

    backends = [("auto", None)]
    if device.type == "cuda":
        backends = [(f"{name} scan", KernelsConfig(backend=name)) for name in args.scan_backends]
    results = {}
    for label, kernels in backends if "modes" in args.parts else ():
        rows = [compare_modes(cell, seq_len, args, device, kernels, compiled) for cell in args.cells for seq_len in args.lengths]
        results[label] = rows
        print_mode_table(rows, f"forward+backward, parallel ({label}) vs sequential")

    for label, rows in results.items():
        for r in rows:
            if r["T"] == 4096:
                target = f"paper: up to {PAPER_SPEEDUP_T4096:.0f}x" if device.type == "cuda" else "target >= 30x"
                print(f"{label}: {r['cell']} T=4096 speedup {r['speedup']:.1f}x ({target}; solver {solver})")

    print_machine_load("end")

    if device.type == "cuda" and "scan" in args.parts:
        print("\nscan only (forward): Triton vs torch")
        for seq_len in args.lengths:
            for r in scan_backends(seq_len, args, device):
                print(f"{r['structure']:8} T={r['T']:>6} torch {r['torch'] * 1e3:8.3f}ms triton {r['triton'] * 1e3:8.3f}ms "
                      f"ratio {r['torch'] / r['triton']:6.1f}x max_diff {r['max_diff']:.1e}")


if __name__ == "__main__":
    main()

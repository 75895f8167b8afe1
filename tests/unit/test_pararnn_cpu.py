"""The fused CPU Newton solver (kernels/pararnn_cpu.c) against the sequential loop and the torch passes."""
from __future__ import annotations

import pytest
import torch

from kernels import pararnn_cpu
from kernels.dispatch import KernelBackendWarning, KernelsConfig
from kernels.pararnn import (
    NewtonNotConvergedWarning,
    NewtonOptions,
    newton_solve,
    parallel_recurrence,
    sequential_recurrence,
)
from kernels.pararnn_cpu import (
    MIN_SLAB,
    fused_adjoint,
    fused_newton_solve,
    fused_solver_applies,
    fused_solver_available,
    work_split,
)
from models.layers.pararnn import GRUCell, LSTMCell
from tests.unit.test_pararnn import cell_inputs

pytestmark = pytest.mark.skipif(not fused_solver_available()[0],
                                reason=f"fused CPU solver unavailable: {fused_solver_available()[1]}")

CELLS = {"gru": GRUCell, "lstm": LSTMCell}
# (slab, chunks): one item; slabs with a remainder (10 = 4 + 4 + 2); time chunks that do not divide
# T, one-step chunks, and both at once.
SPLITS = [(10, 1), (4, 1), (10, 3), (10, 40), (3, 7)]


def _problem(cell_name: str, batch: int, seq_len: int, channels: int, dtype: torch.dtype, seed: int = 0):
    cell = CELLS[cell_name]()
    return (cell, *cell_inputs(cell, batch, seq_len, channels, scale=0.8, seed=seed, dtype=dtype))


@pytest.mark.parametrize("cell_name", sorted(CELLS))
@pytest.mark.parametrize("split", SPLITS)
def test_converged_solve_matches_sequential_loop_fp64(cell_name, split):
    # T updates reach the exact solution of a length-T recurrence (Newton on a triangular system).
    seq_len = 40
    cell, u, params = _problem(cell_name, 2, seq_len, 10, torch.float64)
    h, residual = fused_newton_solve(cell, u, params, updates=seq_len, split=split)
    expected = sequential_recurrence(cell, u, params)
    assert (h - expected).abs().max() < 1e-10
    assert float(residual) < 1e-10


@pytest.mark.parametrize("cell_name", sorted(CELLS))
@pytest.mark.parametrize("split", [(10, 1), (4, 5), (3, 17)])
@pytest.mark.parametrize("updates", [0, 1, 3])
def test_each_iterate_matches_torch_passes(cell_name, split, updates):
    """Fixed-iteration solves give the same Newton iterate and residual as the torch reference."""
    cell, u, params = _problem(cell_name, 2, 33, 10, torch.float32, seed=updates)
    h, residual = fused_newton_solve(cell, u, params, updates=updates, split=split)
    options = NewtonOptions(iterations=updates, warn_residual=float("inf"))
    reference, report = newton_solve(cell, u, params, options, KernelsConfig(backend="torch"))
    assert (h - reference).abs().max() < 1e-5
    assert abs(float(residual) - float(report.residual)) < 1e-5


@pytest.mark.parametrize("cell_name", sorted(CELLS))
@pytest.mark.parametrize("split", SPLITS)
def test_adjoint_matches_autograd_through_the_loop_fp64(cell_name, split):
    cell, u, params = _problem(cell_name, 2, 40, 10, torch.float64, seed=7)
    leaves = [u.requires_grad_(True), *(p.requires_grad_(True) for p in params)]
    h = sequential_recurrence(cell, u, params)
    grad_h = torch.randn_like(h)
    expected = torch.autograd.grad((h * grad_h).sum(), leaves)
    got = fused_adjoint(cell, u.detach(), [p.detach() for p in params], h.detach(), grad_h, split=split)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and (g - e).abs().max() < 1e-10


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_adjoint_matches_torch_passes_fp32(cell_name):
    cell, u, params = _problem(cell_name, 1, 300, 40, torch.float32, seed=8)
    leaves = [u.requires_grad_(True), *(p.requires_grad_(True) for p in params)]
    results = []
    for backend in ("torch", "auto"):
        h, _ = parallel_recurrence(cell, u, params, NewtonOptions(iterations=6), KernelsConfig(backend=backend))
        results.append(torch.autograd.grad(h.sum(), leaves))  # an expanded grad_h
    results.append(fused_adjoint(cell, u.detach(), [p.detach() for p in params], h.detach(),
                                 torch.ones_like(h), split=(16, 7)))
    for got in results[1:]:
        for g, e in zip(got, results[0]):
            assert (g - e).abs().max() < 1e-5 * max(1.0, float(e.abs().max()))


def test_backward_returns_only_wanted_gradients():
    cell, u, params = _problem("lstm", 1, 16, 6, torch.float32)
    params[1].requires_grad_(True)
    h, _ = parallel_recurrence(cell, u, params, NewtonOptions(iterations=16))
    h.sum().backward()
    assert u.grad is None and params[0].grad is None
    peephole = params[1].detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(sequential_recurrence(cell, u, [params[0], peephole]).sum(), [peephole])
    assert (params[1].grad - expected).abs().max() < 1e-5


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_fp32_solve_and_gradients_match_sequential(cell_name):
    """Through newton_solve's default path (fused forward and backward), fp32 1e-5."""
    cell, u, params = _problem(cell_name, 2, 64, 12, torch.float32, seed=3)
    u.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    h, report = parallel_recurrence(cell, u, params, NewtonOptions(iterations=8))
    assert report.iterations == 8 and report.converged
    h_ref = sequential_recurrence(cell, u, params)
    weights = torch.randn_like(h_ref)
    grads = torch.autograd.grad((h * weights).sum(), [u, *params])
    grads_ref = torch.autograd.grad((h_ref * weights).sum(), [u, *params])
    assert (h - h_ref).abs().max() < 1e-5
    for got, want in zip(grads, grads_ref):
        assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max()))


def test_long_sequence_split_over_time_matches_one_chunk():
    # Converged deltas decay through the denormal range (the kernel flushes them): results stay equal.
    cell, u, params = _problem("gru", 1, 3000, 40, torch.float32, seed=5)
    one, r_one = fused_newton_solve(cell, u, params, updates=3, split=(40, 1))
    many, r_many = fused_newton_solve(cell, u, params, updates=3, split=(16, 24))
    assert (one - many).abs().max() < 1e-5 and abs(float(r_one) - float(r_many)) < 1e-6


def test_nan_input_gives_nan_residual_and_warning():
    cell, u, params = _problem("lstm", 1, 20, 8, torch.float32)
    u[0, 7, 1, 3] = float("nan")
    _, residual = fused_newton_solve(cell, u, params, updates=2)
    assert torch.isnan(residual)
    with pytest.warns(NewtonNotConvergedWarning, match="residual nan"):
        newton_solve(cell, u, params, NewtonOptions(iterations=2))


def test_empty_sequence():
    cell, u, params = _problem("gru", 2, 0, 8, torch.float32)
    h, residual = fused_newton_solve(cell, u, params, updates=3)
    assert h.shape == (2, 0, 8) and float(residual) == 0.0


def test_applies_only_where_the_kernel_computes_the_same_function():
    cell, u, params = _problem("lstm", 1, 8, 6, torch.float32)
    assert fused_solver_applies(cell, u, params, None)
    assert fused_solver_applies(cell, u, params, KernelsConfig(backend="auto"))
    # The torch reference asked for by name, other dtypes, other shapes.
    assert not fused_solver_applies(cell, u, params, KernelsConfig(backend="torch"))
    assert not fused_solver_applies(cell, u.bfloat16(), [p.bfloat16() for p in params], None)
    assert not fused_solver_applies(cell, u, params[:1], None)
    assert not fused_solver_applies(cell, u, [params[0], params[1].double()], None)

    class ScaledLSTM(LSTMCell):
        """A subclass may change f: it must not inherit the kernel."""

    assert not fused_solver_applies(ScaledLSTM(), u, params, None)


def test_backend_override_from_environment(monkeypatch):
    cell, u, params = _problem("gru", 1, 8, 6, torch.float32)
    monkeypatch.setenv("FOLDTRON_KERNELS_BACKEND", "torch")
    assert not fused_solver_applies(cell, u, params, None)


def test_missing_compiler_warns_and_falls_back(monkeypatch):
    cell, u, params = _problem("gru", 1, 16, 6, torch.float32)
    monkeypatch.setattr(pararnn_cpu, "fused_solver_available", lambda dtype: (False, "no C compiler: 'cc'"))
    with pytest.warns(KernelBackendWarning, match="fused CPU Newton solver is unavailable"):
        assert not fused_solver_applies(cell, u, params, None)
    with pytest.warns(KernelBackendWarning):
        h, report = newton_solve(cell, u, params, NewtonOptions(iterations=16))
    assert (h - sequential_recurrence(cell, u, params)).abs().max() < 1e-5 and report.iterations == 16
    with pytest.raises(RuntimeError, match="on_missing=fail"):
        fused_solver_applies(cell, u, params, KernelsConfig(on_missing="fail"))


def test_build_names_a_missing_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="no C compiler.*CC"):
        pararnn_cpu._build("float32", ["-DREAL=float"])


def test_build_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv(pararnn_cpu.CACHE_ENV, str(tmp_path))
    first = pararnn_cpu._build("float64", ["-DREAL=double", "-DREAL_IS_DOUBLE"])
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert pararnn_cpu._build("float64", ["-DREAL=double", "-DREAL_IS_DOUBLE"]) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no build directory left behind


@pytest.mark.parametrize(("batch", "channels", "seq_len", "threads", "expected"), [
    (1, 256, 4096, 2, (128, 1)),     # two slabs fill two threads: no time split
    (8, 256, 4096, 2, (256, 1)),     # sequences alone fill the threads
    (1, 256, 4096, 8, (32, 1)),      # slabs narrow to MIN_SLAB
    (1, 64, 4096, 8, (32, 16)),      # then time is cut: 4 chunks per thread per item
    (1, 64, 100, 8, (32, 1)),        # too short to cut into MIN_CHUNK steps
    (1, 1000, 16, 1, (512, 1)),      # the kernel's widest slab
    (1, 5, 4096, 16, (5, 64)),       # fewer channels than a slab
])
def test_work_split(batch, channels, seq_len, threads, expected):
    slab, chunks = work_split(batch, channels, seq_len, threads)
    assert (slab, chunks) == expected
    assert slab >= min(MIN_SLAB, channels) and 1 <= chunks <= seq_len


def test_work_split_rejects_empty_sizes():
    with pytest.raises(ValueError, match="threads=0"):
        work_split(1, 8, 8, 0)


def test_bad_split_is_refused():
    cell, u, params = _problem("gru", 1, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="chunks=9"):
        fused_newton_solve(cell, u, params, updates=1, split=(6, 9))

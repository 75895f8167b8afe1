"""ParaRNN: parallel scans, Newton solver, adjoint backward and the ParaGRU / ParaLSTM layers.

References are independent of the code under test: Python loops over time (scans, the recurrence
with plain autograd) and torch.func Jacobians of one cell step, in float64.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pytest
import torch

from kernels import pararnn_cpu
from kernels.dispatch import KernelBackendWarning, KernelsConfig
from kernels.pararnn import (
    NewtonNotConvergedWarning,
    NewtonOptions,
    _transposed_linear_scan_blocked,
    _transposed_linear_scan_torch,
    adjoint_scan,
    block2_linear_scan,
    compile_available,
    diag_linear_scan,
    linear_scan_blocked,
    newton_solve,
    parallel_recurrence,
    sequential_recurrence,
)
from kernels.pararnn_plan import SolverPlan, build_solver_plan, plan_solver
from models.layers.pararnn import GRUCell, LSTMCell, ParaGRU, ParaLSTM

F64 = torch.float64


def _random_affine(structure: str, batch: int, seq_len: int, channels: int, gen: torch.Generator):
    """Random maps with spectral radius below ~1, so 1000 steps neither explode nor vanish."""
    if structure == "diagonal":
        a = torch.rand(batch, seq_len, channels, generator=gen, dtype=F64) * 1.9 - 0.95
        b = torch.randn(batch, seq_len, channels, generator=gen, dtype=F64)
        h0 = torch.randn(batch, channels, generator=gen, dtype=F64)
    else:
        a = torch.randn(batch, seq_len, 2, 2, channels, generator=gen, dtype=F64) * 0.45
        b = torch.randn(batch, seq_len, 2, channels, generator=gen, dtype=F64)
        h0 = torch.randn(batch, 2, channels, generator=gen, dtype=F64)
    return a, b, h0


@pytest.mark.parametrize("structure", ["diagonal", "block2"])
@pytest.mark.parametrize("seq_len", [1, 2, 17, 1000])
def test_scan_matches_sequential_loop(structure, seq_len):
    gen = torch.Generator().manual_seed(seq_len)
    a, b, h0 = _random_affine(structure, 2, seq_len, 5, gen)
    scan = diag_linear_scan if structure == "diagonal" else block2_linear_scan
    for initial in (None, h0):
        # The loop written out here, not kernels.pararnn.linear_scan_sequential, to stay independent.
        h = torch.zeros_like(b[:, 0]) if initial is None else initial
        expected = []
        for t in range(seq_len):
            if structure == "diagonal":
                h = a[:, t] * h + b[:, t]
            else:
                h = torch.einsum("bijd,bjd->bid", a[:, t], h) + b[:, t]
            expected.append(h)
        torch.testing.assert_close(scan(a, b, initial), torch.stack(expected, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["diagonal", "block2"])
@pytest.mark.parametrize("seq_len", [1, 2, 17, 1000])
def test_transposed_scan_matches_loop_with_transposed_maps(structure, seq_len):
    # The adjoint's scan applies every stored map transposed, without a transposed copy.
    gen = torch.Generator().manual_seed(100 + seq_len)
    a, b, _ = _random_affine(structure, 2, seq_len, 5, gen)
    h = torch.zeros_like(b[:, 0])
    expected = []
    for t in range(seq_len):
        h = a[:, t] * h + b[:, t] if structure == "diagonal" else torch.einsum("bjid,bjd->bid", a[:, t], h) + b[:, t]
        expected.append(h)
    torch.testing.assert_close(_transposed_linear_scan_torch(a, b, structure), torch.stack(expected, 1),
                               rtol=1e-10, atol=1e-10)


def _loop_scan(a: torch.Tensor, b: torch.Tensor, structure: str, transposed: bool = False,
               h0: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t (a_t^T when `transposed`), one step per t, written out independently."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    states = []
    for t in range(b.shape[1]):
        if structure == "diagonal":
            h = a[:, t] * h + b[:, t]
        else:
            h = torch.einsum("bjid,bjd->bid" if transposed else "bijd,bjd->bid", a[:, t], h) + b[:, t]
        states.append(h)
    return torch.stack(states, 1)


@pytest.mark.parametrize("structure", ["diagonal", "block2"])
@pytest.mark.parametrize("seq_len", [1, 2, 17, 1000, 4096])
@pytest.mark.parametrize("chunk", [8, 4])
def test_blocked_scan_matches_sequential_loop(structure, seq_len, chunk):
    # Lengths below, at and far above the chunk (padding of a partial last chunk, several recursion levels).
    gen = torch.Generator().manual_seed(200 + seq_len)
    a, b, h0 = _random_affine(structure, 2, seq_len, 3, gen)
    for initial in (None, h0):
        torch.testing.assert_close(linear_scan_blocked(a, b, structure, initial, chunk=chunk),
                                   _loop_scan(a, b, structure, h0=initial), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_transposed_linear_scan_blocked(a, b, structure, chunk=chunk),
                               _loop_scan(a, b, structure, transposed=True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["diagonal", "block2"])
def test_compiled_blocked_scan_matches_loop_in_fp32(structure):
    # The compiled solver runs the blocked scan inside torch.compile graphs, in fp32.
    available, why = compile_available()
    if not available:
        pytest.skip(f"torch.compile unavailable: {why}")
    gen = torch.Generator().manual_seed(7)
    a, b, _ = _random_affine(structure, 1, 1000, 16, gen)
    a, b = a.float(), b.float()
    forward = torch.compile(linear_scan_blocked, dynamic=False)(a, b, structure)
    transposed = torch.compile(_transposed_linear_scan_blocked, dynamic=False)(a, b, structure)
    torch.testing.assert_close(forward, _loop_scan(a.double(), b.double(), structure).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(transposed, _loop_scan(a.double(), b.double(), structure, transposed=True).float(),
                               rtol=1e-4, atol=1e-4)


def test_scan_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"a \[B, T, 2, 2, D\] and b \[B, T, 2, D\]"):
        block2_linear_scan(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4))


@pytest.mark.parametrize("structure", ["diagonal", "block2"])
def test_adjoint_scan_matches_reverse_loop(structure):
    gen = torch.Generator().manual_seed(3)
    jac, grad, _ = _random_affine(structure, 2, 23, 4, gen)
    lam = torch.zeros_like(grad[:, 0])
    expected = [None] * 23
    for t in reversed(range(23)):
        if t < 22:
            nxt = jac[:, t + 1]
            lam = grad[:, t] + (nxt * lam if structure == "diagonal" else torch.einsum("bjid,bjd->bid", nxt, lam))
        else:
            lam = grad[:, t]
        expected[t] = lam
    torch.testing.assert_close(adjoint_scan(jac, grad, structure), torch.stack(expected, 1), rtol=1e-10, atol=1e-10)


def cell_inputs(cell, batch: int, seq_len: int, n: int, scale: float, seed: int, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, seq_len, 3, n, generator=gen, dtype=dtype)
    shapes = [(3, n)] if isinstance(cell, GRUCell) else [(3, n), (2, n)]
    params = [torch.randn(*s, generator=gen, dtype=dtype) * scale for s in shapes]
    return u, params


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
def test_cell_jacobian_matches_autodiff(cell):
    u, params = cell_inputs(cell, 1, 1, 3, scale=0.8, seed=0)
    u = u[0, 0]
    state = torch.randn(cell.zero_state(u).shape, dtype=F64)
    _, jac = cell.step_and_jacobian(state, u, params)
    full = torch.func.jacrev(lambda s: cell.step(s, u, params))(state)
    if cell.structure == "diagonal":  # full [N, N] must be diagonal with our entries
        torch.testing.assert_close(full, torch.diag(jac), rtol=1e-12, atol=1e-12)
    else:  # full [2, N, 2, N]: only same-channel blocks are non-zero
        for d in range(3):
            torch.testing.assert_close(full[:, d, :, d], jac[:, :, d], rtol=1e-12, atol=1e-12)
        off_channel = full.clone()
        for d in range(3):
            off_channel[:, d, :, d] = 0
        assert off_channel.abs().max() == 0
    torch.testing.assert_close(cell.step_and_jacobian(state, u, params)[0], cell.step(state, u, params))


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
def test_cell_step_vjp_matches_autograd_of_step(cell):
    u, params = cell_inputs(cell, 2, 5, 4, scale=0.8, seed=3)
    gen = torch.Generator().manual_seed(4)
    state_shape = cell.zero_state(u).shape
    state = torch.randn(state_shape, generator=gen, dtype=F64)
    cotangent = torch.randn(state_shape, generator=gen, dtype=F64)
    u.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    expected = torch.autograd.grad(cell.step(state, u, params), [u, *params], cotangent)
    grad_u, per_step = cell.step_vjp(state, u, params, cotangent)
    got = [grad_u, *(g.flatten(0, 1).sum(0) for g in per_step)]  # the caller's sum over (B, T)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
def test_cell_solver_step_equals_step_to_float_rounding(cell):
    u, params = cell_inputs(cell, 1, 64, 16, scale=0.8, seed=5, dtype=torch.float32)
    state = torch.randn(cell.zero_state(u).shape, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(cell.solver_step(state, u, params), cell.step(state, u, params),
                               rtol=1.3e-6, atol=5e-7)
    x = torch.linspace(-30, 30, 10001)
    torch.testing.assert_close(cell.fast_tanh(x), torch.tanh(x), rtol=0, atol=2.5e-7)


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_adjoint_backward_equals_autograd_through_the_loop(cell, dtype, tol):
    u, params = cell_inputs(cell, 2, 40, 6, scale=0.7, seed=1, dtype=dtype)
    u.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    upstream = torch.randn(cell.zero_state(u).shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    options = NewtonOptions(tol=1e-13 if dtype == torch.float64 else 1e-6, max_iterations=40)
    h_par, report = parallel_recurrence(cell, u, params, options)
    h_seq = sequential_recurrence(cell, u, params)
    torch.testing.assert_close(h_par, h_seq, rtol=tol, atol=tol)
    grads_par = torch.autograd.grad((h_par * upstream).sum(), [u, *params])
    grads_seq = torch.autograd.grad((h_seq * upstream).sum(), [u, *params])
    for gp, gs in zip(grads_par, grads_seq):
        torch.testing.assert_close(gp, gs, rtol=tol, atol=tol)
    assert report.iterations < 40


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
def test_compiled_solve_and_backward_match_the_loop(cell):
    available, why = compile_available()
    if not available:
        pytest.skip(f"torch.compile unusable here: {why}")
    u, params = cell_inputs(cell, 2, 37, 6, scale=0.7, seed=8)
    u.requires_grad_(True)
    params[0].requires_grad_(True)  # a parameter without gradient too (LSTM's peephole)
    upstream = torch.randn(cell.zero_state(u).shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    options = NewtonOptions(iterations=12)
    h_par, report = parallel_recurrence(cell, u, params, options, compiled=True)
    h_seq = sequential_recurrence(cell, u, params)
    torch.testing.assert_close(h_par, h_seq, rtol=1e-10, atol=1e-10)
    wanted = [u, params[0]]
    grads_par = torch.autograd.grad((h_par * upstream).sum(), wanted)
    grads_seq = torch.autograd.grad((h_seq * upstream).sum(), wanted)
    for gp, gs in zip(grads_par, grads_seq):
        torch.testing.assert_close(gp, gs, rtol=1e-10, atol=1e-10)
    assert report.iterations == 12 and report.converged


def test_only_requested_gradients_are_computed():
    cell = GRUCell()
    u, params = cell_inputs(cell, 1, 8, 4, scale=0.5, seed=3)
    params[0].requires_grad_(True)
    h, _ = parallel_recurrence(cell, u, params)
    (grad,) = torch.autograd.grad(h.sum(), params)
    h_seq = sequential_recurrence(cell, u, params)
    torch.testing.assert_close(grad, torch.autograd.grad(h_seq.sum(), params)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
def test_after_k_updates_the_first_k_plus_1_states_are_exact(cell):
    # Large recurrent weights: far from linear, so later states are visibly wrong after few updates.
    u, params = cell_inputs(cell, 2, 30, 8, scale=2.5, seed=4)
    exact = sequential_recurrence(cell, u, params)
    for k in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NewtonNotConvergedWarning)
            h, report = newton_solve(cell, u, params, NewtonOptions(iterations=k))
        assert report.iterations == k
        torch.testing.assert_close(h[:, : k + 1], exact[:, : k + 1], rtol=1e-12, atol=1e-12)
        assert (h[:, k + 1 :] - exact[:, k + 1 :]).abs().max() > 1e-6  # the claim is not vacuous


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
def test_residual_converges_quadratically_for_contractive_cells(cell):
    u, params = cell_inputs(cell, 2, 200, 16, scale=0.5, seed=5)
    residuals = []
    for k in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NewtonNotConvergedWarning)
            _, report = newton_solve(cell, u, params, NewtonOptions(iterations=k))
        residuals.append(float(report.residual))
    assert residuals[0] > 1e-3
    # Quadratic: each residual is below a constant times the square of the previous one, until the
    # float64 floor. A linearly converging method would keep log r_{k+1} / log r_k near 1.
    for before, after in itertools.pairwise(residuals):
        if before < 1e-7:
            break
        assert after < 10 * before**2, residuals
    assert residuals[-1] < 1e-12, residuals


def test_adaptive_mode_stops_at_tolerance_and_fixed_mode_warns():
    cell = GRUCell()
    u, params = cell_inputs(cell, 1, 64, 8, scale=0.5, seed=6)
    _, report = newton_solve(cell, u, params, NewtonOptions(tol=1e-9, max_iterations=50))
    assert float(report.residual) <= 1e-9 and report.converged and report.iterations < 10
    with pytest.warns(NewtonNotConvergedWarning, match="newton_iterations"):
        _, report = newton_solve(cell, u, params, NewtonOptions(iterations=0, warn_residual=1e-9))
    assert not report.converged
    with pytest.warns(NewtonNotConvergedWarning, match="after 2 updates"):
        newton_solve(cell, u, params, NewtonOptions(tol=1e-30, max_iterations=2))


@pytest.mark.parametrize("cell", [GRUCell(), LSTMCell()], ids=["gru", "lstm"])
def test_saved_memory_does_not_grow_with_iterations(cell):
    u, params = cell_inputs(cell, 2, 64, 8, scale=0.5, seed=7)
    u.requires_grad_(True)

    def saved_bytes(iterations: int) -> tuple[int, int]:
        packed = []

        def pack(t):
            packed.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            parallel_recurrence(cell, u, params, NewtonOptions(iterations=iterations, warn_residual=1.0))
        return len(packed), sum(packed)

    one, many = saved_bytes(1), saved_bytes(12)
    assert one == many
    # Exactly u and the solved states (plus the small recurrent weights).
    state_bytes = cell.zero_state(u).numel() * 8
    assert many[1] == u.numel() * 8 + state_bytes + sum(p.numel() * 8 for p in params)


@pytest.mark.parametrize("layer_class", [ParaGRU, ParaLSTM])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_layer_parallel_matches_sequential(layer_class, dtype, tol):
    torch.manual_seed(0)
    newton = NewtonOptions(tol=1e-13 if dtype == torch.float64 else 1e-6, max_iterations=40)
    layer = layer_class(24, state_size=16, newton=newton).to(dtype)
    x = torch.randn(2, 33, 24, dtype=dtype, requires_grad=True)
    y_par = layer(x, mode="parallel")
    assert y_par.shape == x.shape and layer.last_newton_report.converged
    grads_par = torch.autograd.grad(y_par.square().sum(), [x, *layer.parameters()])
    y_seq = layer(x, mode="sequential")
    grads_seq = torch.autograd.grad(y_seq.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y_par, y_seq, rtol=tol, atol=tol)
    for (name, _), gp, gs in zip([("x", None), *layer.named_parameters()], grads_par, grads_seq):
        torch.testing.assert_close(gp, gs, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_layer_default_three_iterations_converge_at_init():
    torch.manual_seed(0)
    layer = ParaGRU(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewtonNotConvergedWarning)
        y = layer(torch.randn(2, 256, 64))
    assert layer.last_newton_report.iterations == 3 and float(layer.last_newton_report.residual) < 1e-5
    assert torch.isfinite(y).all()


def test_layer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode='scan'"):
        ParaGRU(8)(torch.randn(1, 3, 8), mode="scan")


def test_input_projection_is_one_matmul_with_first_gate_bias_offset():
    torch.manual_seed(0)
    layer = ParaLSTM(8, state_size=5)
    x = torch.randn(2, 7, 8)
    u = layer.input_projections(x)
    expected_bias = torch.zeros(3, 5)
    expected_bias[0] = -torch.linspace(0, 1, 5)
    expected = torch.einsum("bth,gnh->btgn", x, layer.w_in) + expected_bias
    torch.testing.assert_close(u, expected)


def test_init_follows_specs():
    layer = ParaLSTM(512, state_size=400)
    n = 400
    std = {name: float(p.detach().std()) for name, p in layer.named_parameters()}
    assert math.isclose(std["recurrent"], 2 / math.sqrt(5 * n), rel_tol=0.1)
    assert math.isclose(std["peephole"], 2 / math.sqrt(5 * n), rel_tol=0.1)
    assert math.isclose(std["w_in"], math.sqrt(2 / (512 + n)), rel_tol=0.05)
    assert float(layer.b_in.detach().abs().max()) == 0.0
    assert set(layer.init_specs()) == {name for name, _ in layer.named_parameters()}


@pytest.mark.parametrize("mixer", ["pararnn_gru", "pararnn_lstm"])
def test_model_with_pararnn_mixers_builds_and_trains_a_step(mixer):
    from models import build_model
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                      token_mixers=[mixer, "attention"])
    model = build_model(cfg, seed=0)
    again = build_model(cfg, seed=0)
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), name  # weights depend only on (seed, name)
    block = model.layers["0"]
    assert torch.equal(block.token_mixer.first_gate_bias_offset, -torch.linspace(0, 1, 32))
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in block.token_mixer.parameters())
    assert block.flops_per_token(16) > 0


def test_experiment_configs_compose():
    from trainer.config import compose

    gru = compose(["+experiment=pararnn_quickstart"])
    lstm = compose(["+experiment=pararnn_lstm_quickstart", "model.pararnn.newton_tol=1e-5"])
    assert list(gru.model.token_mixers) == ["pararnn_gru"] and gru.model.pararnn.newton_iterations == 3
    assert list(lstm.model.token_mixers) == ["pararnn_lstm"] and lstm.model.pararnn.newton_tol == 1e-5


def test_layer_runs_under_bf16_autocast_with_fp32_recurrence():
    torch.manual_seed(0)
    layer = ParaLSTM(16)
    x = torch.randn(2, 9, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert layer.last_newton_report.residual.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_model_parallel_and_sequential_modes_give_the_same_loss_and_gradients():
    from models import build_model
    from models.config import ModelConfig, ParaRNNConfig

    def loss_and_grads(mode: str):
        cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                          token_mixers=["pararnn_gru", "pararnn_lstm"],
                          pararnn=ParaRNNConfig(mode=mode, newton_tol=1e-6, newton_max_iterations=30))
        model = build_model(cfg, seed=0)
        tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_par, grads_par = loss_and_grads("parallel")
    loss_seq, grads_seq = loss_and_grads("sequential")
    torch.testing.assert_close(loss_par, loss_seq, rtol=1e-5, atol=1e-5)
    for name in grads_seq:
        torch.testing.assert_close(grads_par[name], grads_seq[name], rtol=1e-5, atol=1e-5, msg=name)


def test_compile_flag_reaches_the_solver_plan_and_missing_compile_follows_on_missing(monkeypatch):
    """model.pararnn.compile reaches the layer's solver plan; without a working torch.compile the plan
    runs eager with a warning (on_missing=fallback) or is refused (on_missing=fail), never silently."""
    import kernels.pararnn_plan as plan_module
    import models.layers.pararnn as layer_module
    from kernels.dispatch import KernelsConfig

    seen = []
    real = layer_module.parallel_recurrence

    def spy(*args, plan, **kwargs):
        seen.append(plan.forward)
        # Run eager: the compiled passes have their own test; here only the decision matters.
        return real(*args, plan=dataclasses.replace(plan, forward="eager"), **kwargs)

    monkeypatch.setattr(layer_module, "parallel_recurrence", spy)
    monkeypatch.setattr(plan_module, "compile_available", lambda: (True, ""))
    torch_passes = KernelsConfig(backend="torch")  # where the fused C kernels run, the flag has no effect
    ParaGRU(8, compiled=True, kernels=torch_passes)(torch.randn(1, 5, 8))
    assert seen == ["compiled"]

    monkeypatch.setattr(plan_module, "compile_available", lambda: (False, "no C++ compiler"))
    layer = ParaGRU(8, compiled=True, kernels=KernelsConfig(backend="torch", on_missing="fallback"))
    with pytest.warns(UserWarning, match="runs eager"):
        layer(torch.randn(1, 5, 8))
    assert seen == ["compiled", "eager"]
    layer = ParaGRU(8, compiled=True, kernels=KernelsConfig(on_missing="fail"))
    with pytest.raises(RuntimeError, match="model.pararnn.compile=true.*no C\\+\\+ compiler"):
        layer(torch.randn(1, 5, 8))


# ---------------------------------------------------------------------------------------- solver plan


def _plan(cell=None, device="cpu", dtype=torch.float32, options=None, **kernels):
    return plan_solver(cell or GRUCell(), device, dtype, options or NewtonOptions(),
                       KernelsConfig(**kernels) if kernels else None)


def test_plan_names_what_runs(monkeypatch):
    monkeypatch.setattr(pararnn_cpu, "fused_solver_available", lambda dtype: (True, ""))

    def parts(plan: SolverPlan) -> tuple[str, str, str]:
        return plan.forward, plan.scan, plan.backward

    assert parts(_plan()) == ("fused_c", "torch", "fused_c")
    assert parts(_plan(LSTMCell(), dtype=F64)) == ("fused_c", "torch", "fused_c")
    # The C solve runs a fixed number of updates: adaptive mode (and 0 updates) keep the torch passes.
    assert parts(_plan(options=NewtonOptions(tol=1e-6))) == ("eager", "torch", "fused_c")
    assert parts(_plan(options=NewtonOptions(iterations=0))) == ("eager", "torch", "fused_c")
    assert parts(_plan(backend="torch")) == ("eager", "torch", "torch")
    assert parts(_plan(dtype=torch.bfloat16)) == ("eager", "torch", "torch")
    assert parts(_plan(device="meta")) == ("eager", "torch", "torch")

    class ScaledGRU(GRUCell):
        """A subclass may change f: it does not inherit the kernel."""

    assert parts(_plan(ScaledGRU())) == ("eager", "torch", "torch")


def test_plan_records_missing_fast_paths_and_the_build_reports_them(monkeypatch):
    monkeypatch.setattr(pararnn_cpu, "fused_solver_available", lambda dtype: (False, "no C compiler: 'cc'"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plan_solver itself is pure
        plan = _plan()
        triton_plan = _plan(backend="triton")
    assert (plan.forward, plan.backward, plan.fused_unavailable) == ("eager", "torch", "no C compiler: 'cc'")
    assert plan.describe() == "torch passes + torch scan (fused C solver unavailable: no C compiler: 'cc')"
    assert triton_plan.scan == "torch" and triton_plan.triton_unavailable
    with pytest.warns(KernelBackendWarning, match="fused CPU Newton solver is unavailable"):
        assert build_solver_plan(GRUCell(), "cpu", torch.float32) == plan
    with pytest.raises(RuntimeError, match="on_missing=fail"):
        build_solver_plan(GRUCell(), "cpu", torch.float32, kernels=KernelsConfig(on_missing="fail"))
    with pytest.warns(KernelBackendWarning, match="pararnn_scan: Triton backend requested"):
        build_solver_plan(GRUCell(), "cpu", torch.float32, kernels=KernelsConfig(backend="triton"))
    with pytest.raises(RuntimeError, match="Triton backend requested"):
        build_solver_plan(GRUCell(), "cpu", torch.float32, kernels=KernelsConfig(backend="triton", on_missing="fail"))


def test_plan_refuses_inconsistent_parts():
    with pytest.raises(ValueError, match="forward='fast'"):
        SolverPlan(forward="fast")
    with pytest.raises(ValueError, match="fused_c forward needs the fused_c backward"):
        SolverPlan(forward="fused_c", backward="torch")


def test_layer_decides_once_and_every_solve_runs_its_plan(monkeypatch):
    """The backends are chosen once per (device, dtype) on the first forward; later forwards and the
    backward ask nothing again, and the plan reaches the solver unchanged."""
    import kernels.pararnn as pararnn_module
    decisions, solves = [], []
    real_status, real_solve = pararnn_cpu.fused_solver_status, pararnn_module.newton_solve
    monkeypatch.setattr(pararnn_cpu, "fused_solver_status",
                        lambda *a, **k: decisions.append(1) or real_status(*a, **k))
    monkeypatch.setattr(pararnn_module, "newton_solve",
                        lambda *a, plan=None, **k: solves.append(plan) or real_solve(*a, plan=plan, **k))
    layer = ParaLSTM(8, state_size=6)
    for _ in range(3):
        layer(torch.randn(2, 5, 8)).sum().backward()
    assert len(decisions) == 1 and len(layer.solver_plans) == 1
    (plan,) = layer.solver_plans.values()
    assert solves == [plan] * 3
    layer.double()(torch.randn(1, 4, 8, dtype=F64))  # another compute dtype: its own plan
    assert len(decisions) == 2 and set(layer.solver_plans) == {(torch.device("cpu"), torch.float32),
                                                                (torch.device("cpu"), F64)}

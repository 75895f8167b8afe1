"""ParaRNN: a nonlinear recurrence h_t = f(h_{t-1}, x_t) solved in parallel over the sequence.

All T equations h_t = f(h_{t-1}, x_t) (h_{-1} = 0) form one nonlinear system. Newton iteration k
linearises it at the current guess h^k:

    A_t = df/dh (h^k_{t-1}, x_t),  r_t = f(h^k_{t-1}, x_t) - h^k_t,
    delta_t = A_t delta_{t-1} + r_t  (delta_{-1} = 0),  h^{k+1} = h^k + delta,

and the linear recurrence is an associative scan over affine maps,
(A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2), of depth log2(T). The start is h^0_t = f(0, x_t); after
k updates the first k+1 states are exact, and convergence is quadratic for contractive cells.

Backward is the adjoint of the solved system, not autograd through the iterations:
lambda_t = g_t + A_{t+1}^T lambda_{t+1} (one reverse-time scan with transposed Jacobians), then one
vector-Jacobian product of f at every t with cotangent lambda_t gives d/du and d/dparams. Only u and
the solved h are saved, so memory does not grow with the number of Newton iterations.

Jacobian structures (every channel d is independent, so channels can be split over tensor-parallel
ranks with no communication inside the recurrence):
- "diagonal": state [B, T, D], Jacobian [B, T, D] (ParaGRU).
- "block2": state [B, T, 2, D], Jacobian [B, T, 2, 2, D]: one 2x2 block per channel (ParaLSTM's
  [c, h]); entry [i, j] is d state_i / d previous state_j.

The cell itself (f and its Jacobian) is passed in as a `RecurrentCell`; the models package defines
the GRU and LSTM cells.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from kernels.dispatch import KernelsConfig, pick

JACOBIAN_STRUCTURES = ("diagonal", "block2")


class NewtonNotConvergedWarning(RuntimeWarning):
    """A Newton solve ended with a residual above its tolerance."""


class RecurrentCell(Protocol):
    """The recurrence f of a ParaRNN layer, vectorised over any leading [B, T] (or [B]) dims.

    `u` holds the input projections (x W + b) of every step; `params` the recurrent weights, which
    receive gradients. `h_prev` has the state's shape: [..., D] ("diagonal") or [..., 2, D]
    ("block2").
    """

    # "diagonal" or "block2" (see the module docstring).
    structure: str

    def zero_state(self, u: torch.Tensor) -> torch.Tensor:
        """Zeros shaped like the state for projections `u`."""

    def step(self, h_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """f(h_prev, u): the next state."""

    def step_and_jacobian(
        self, h_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(h_prev, u), df/dh_prev) with the Jacobian in the cell's structure."""


# ---------------------------------------------------------------------------------------------
# Linear scans: h_t = a_t h_{t-1} + b_t along dim 1.
# ---------------------------------------------------------------------------------------------


def _diag_compose(a_later: torch.Tensor, a_earlier: torch.Tensor) -> torch.Tensor:
    return a_later * a_earlier


def _diag_apply(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a * x


def _block2_compose(a_later: torch.Tensor, a_earlier: torch.Tensor) -> torch.Tensor:
    # [..., i, k, D] x [..., k, j, D] -> [..., i, j, D], a 2x2 matrix product per channel.
    return (a_later.unsqueeze(-2) * a_earlier.unsqueeze(-4)).sum(-3)


def _block2_apply(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # [..., i, k, D] x [..., k, D] -> [..., i, D]
    return (a * x.unsqueeze(-3)).sum(-2)


_SCAN_OPS: dict[str, tuple[Callable, Callable]] = {
    "diagonal": (_diag_compose, _diag_apply),
    "block2": (_block2_compose, _block2_apply),
}


def _odd_even_scan(a: torch.Tensor, b: torch.Tensor, compose: Callable, apply: Callable) -> torch.Tensor:
    """Odd-even reduction: compose neighbouring pairs, solve the half-length system, fill in.

    O(T) work and 2 log2(T) levels of vectorised ops (a Blelloch-style scan for affine maps).
    """
    seq_len = b.shape[1]
    if seq_len == 1:
        return b.clone()
    pairs = seq_len // 2
    a_even, a_odd = a[:, 0 : 2 * pairs : 2], a[:, 1 : 2 * pairs : 2]
    b_even, b_odd = b[:, 0 : 2 * pairs : 2], b[:, 1 : 2 * pairs : 2]
    # Pair (2i, 2i+1) as one map: h_{2i+1} = (a_{2i+1} a_{2i}) h_{2i-1} + (a_{2i+1} b_{2i} + b_{2i+1}).
    h_odd = _odd_even_scan(compose(a_odd, a_even), apply(a_odd, b_even) + b_odd, compose, apply)
    h = torch.empty_like(b)
    h[:, 1::2] = h_odd
    h[:, 0] = b[:, 0]
    # h_{2i} = a_{2i} h_{2i-1} + b_{2i} for i >= 1.
    h[:, 2::2] = apply(a[:, 2::2], h_odd[:, : (seq_len - 1) // 2]) + b[:, 2::2]
    return h


def _check_scan_shapes(a: torch.Tensor, b: torch.Tensor, structure: str) -> None:
    if structure == "diagonal":
        ok = b.dim() >= 2 and a.shape == b.shape
        expected = "a and b both [B, T, D]"
    elif structure == "block2":
        ok = b.dim() >= 3 and b.shape[-2] == 2 and a.shape == b.shape[:-2] + (2, 2, b.shape[-1])
        expected = "a [B, T, 2, 2, D] and b [B, T, 2, D]"
    else:
        raise ValueError(f"unknown Jacobian structure {structure!r}; available: {', '.join(JACOBIAN_STRUCTURES)}")
    if not ok:
        raise ValueError(f"{structure} scan needs {expected}; got a {tuple(a.shape)}, b {tuple(b.shape)}")


def _fold_initial_state(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, structure: str) -> torch.Tensor:
    """b with b_0 += a_0 h0, so the scan can always start from zero."""
    if h0 is None:
        return b
    _, apply = _SCAN_OPS[structure]
    b = b.clone()
    b[:, 0] = b[:, 0] + apply(a[:, 0], h0)
    return b


def linear_scan_torch(a: torch.Tensor, b: torch.Tensor, structure: str, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch parallel scan for h_t = a_t h_{t-1} + b_t (h_{-1} = h0 or 0), time on dim 1."""
    _check_scan_shapes(a, b, structure)
    compose, apply = _SCAN_OPS[structure]
    return _odd_even_scan(a, _fold_initial_state(a, b, h0, structure), compose, apply)


def linear_scan_sequential(a: torch.Tensor, b: torch.Tensor, structure: str,
                           h0: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: one step per t in a Python loop."""
    _check_scan_shapes(a, b, structure)
    _, apply = _SCAN_OPS[structure]
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    states = []
    for t in range(b.shape[1]):
        h = apply(a[:, t], h) + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


def _linear_scan_triton(a: torch.Tensor, b: torch.Tensor, structure: str, h0: torch.Tensor | None = None) -> torch.Tensor:
    # Imported lazily: triton is optional and the torch path must work without it.
    from kernels.triton_pararnn import linear_scan_triton

    return linear_scan_triton(a, b, structure, h0)


SCAN_IMPLS = {"torch": linear_scan_torch, "triton": _linear_scan_triton}


def linear_scan(a: torch.Tensor, b: torch.Tensor, structure: str, h0: torch.Tensor | None = None,
                kernels: KernelsConfig | None = None) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t for a Jacobian `structure`; Triton on CUDA, torch elsewhere."""
    return pick(SCAN_IMPLS, "pararnn_scan", b.device, kernels)(a, b, structure, h0)


def diag_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                     kernels: KernelsConfig | None = None) -> torch.Tensor:
    """h with h_t = a_t * h_{t-1} + b_t for a, b [B, T, D]; h_{-1} = h0 [B, D] or 0."""
    return linear_scan(a, b, "diagonal", h0, kernels)


def block2_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                       kernels: KernelsConfig | None = None) -> torch.Tensor:
    """h with h_t = a_t @ h_{t-1} + b_t per channel: a [B, T, 2, 2, D], b [B, T, 2, D], h0 [B, 2, D]."""
    return linear_scan(a, b, "block2", h0, kernels)


def transpose_jacobian(a: torch.Tensor, structure: str) -> torch.Tensor:
    """A^T per channel (a no-op for diagonal Jacobians)."""
    return a if structure == "diagonal" else a.transpose(-3, -2)


def adjoint_scan(jacobians: torch.Tensor, grad: torch.Tensor, structure: str,
                 kernels: KernelsConfig | None = None) -> torch.Tensor:
    """lambda_t = grad_t + A_{t+1}^T lambda_{t+1} (lambda_T = 0): the reverse-time adjoint scan.

    `jacobians[:, t]` is A_t = d h_t / d h_{t-1}. Solved as a forward scan on the time-reversed
    sequence whose maps are the transposed Jacobians shifted by one step.
    """
    shifted = transpose_jacobian(jacobians[:, 1:], structure).flip(1)
    reversed_maps = torch.cat([torch.zeros_like(jacobians[:, :1]), shifted], dim=1)
    return linear_scan(reversed_maps, grad.flip(1), structure, kernels=kernels).flip(1)


# ---------------------------------------------------------------------------------------------
# Newton solver.
# ---------------------------------------------------------------------------------------------


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
class NewtonReport:
    """Outcome of one Newton solve."""

    # Updates applied after the initial guess h^0_t = f(0, x_t).
    iterations: int
    # max_t |f(h_{t-1}, x_t) - h_t| at the returned h (a 0-dim tensor, read it with float()).
    residual: torch.Tensor
    # The tolerance the residual was checked against (tol, or warn_residual in fixed mode).
    tolerance: float

    @property
    def converged(self) -> bool:
        return float(self.residual) <= self.tolerance


def shift_states(h: torch.Tensor) -> torch.Tensor:
    """h_{t-1} for every t along dim 1, with zeros at t = 0."""
    return torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)


def newton_solve(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor],
                 options: NewtonOptions = NewtonOptions(),
                 kernels: KernelsConfig | None = None) -> tuple[torch.Tensor, NewtonReport]:
    """Solve h_t = f(h_{t-1}, u_t) for all t by Newton's method; no autograd graph is recorded.

    Warns with NewtonNotConvergedWarning when the final residual is above the tolerance.
    """
    adaptive = options.tol is not None
    max_updates = options.max_iterations if adaptive else options.iterations
    tolerance = options.tol if adaptive else options.warn_residual
    with torch.no_grad():
        h = cell.step(cell.zero_state(u), u, params)
        updates = 0
        while True:
            h_prev = shift_states(h)
            if updates < max_updates:
                f, jacobians = cell.step_and_jacobian(h_prev, u, params)
            else:
                f = cell.step(h_prev, u, params)
            residual = f - h
            last = updates == max_updates
            # Fixed mode reads the residual only at the end (each read is a device sync on GPU).
            if last or adaptive:
                max_residual = residual.abs().max()
                if last or float(max_residual) <= tolerance:
                    break
            h = h + linear_scan(jacobians, residual, cell.structure, kernels=kernels)
            updates += 1
    report = NewtonReport(iterations=updates, residual=max_residual, tolerance=tolerance)
    residual_value = float(max_residual)
    if not residual_value <= tolerance:  # also catches NaN
        warnings.warn(
            f"ParaRNN Newton solve did not converge: residual {residual_value:.0e} > {tolerance:g} after "
            f"{updates} updates (T={u.shape[1]}). Fix: raise model.pararnn.newton_iterations, or set "
            "model.pararnn.newton_tol with a larger newton_max_iterations",
            NewtonNotConvergedWarning,
            stacklevel=2,
        )
    return h, report


class _AdjointRecurrence(torch.autograd.Function):
    """Identity on the solved states whose backward is the adjoint of the recurrence."""

    @staticmethod
    def forward(ctx, cell, kernels, u, h, *params):
        ctx.cell, ctx.kernels = cell, kernels
        ctx.save_for_backward(u, h, *params)
        return h.view_as(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        cell: RecurrentCell = ctx.cell
        u, h, *params = ctx.saved_tensors
        h_prev = shift_states(h)
        with torch.no_grad():
            _, jacobians = cell.step_and_jacobian(h_prev, u, params)
            lam = adjoint_scan(jacobians, grad_h, cell.structure, ctx.kernels)
            del jacobians
        wants = [ctx.needs_input_grad[2]] + list(ctx.needs_input_grad[4:])
        inputs = [x.detach().requires_grad_(w) for x, w in zip([u, *params], wants)]
        differentiable = [x for x in inputs if x.requires_grad]
        grads_by_id = {}
        if differentiable:
            with torch.enable_grad():
                f = cell.step(h_prev, inputs[0], inputs[1:])
                grads = torch.autograd.grad(f, differentiable, lam)
            grads_by_id = {id(x): g for x, g in zip(differentiable, grads)}
        grad_u, *grad_params = [grads_by_id.get(id(x)) for x in inputs]
        return (None, None, grad_u, None, *grad_params)


def parallel_recurrence(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor],
                        options: NewtonOptions = NewtonOptions(),
                        kernels: KernelsConfig | None = None) -> tuple[torch.Tensor, NewtonReport]:
    """States h [B, T, ...] of the recurrence, solved by Newton + scans; differentiable by the adjoint.

    Gradients flow to `u` and `params`; the backward saves only u and h (plus the parameters).
    """
    h, report = newton_solve(cell, u.detach(), [p.detach() for p in params], options, kernels)
    return _AdjointRecurrence.apply(cell, kernels, u, h, *params), report


def sequential_recurrence(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference: h_t = f(h_{t-1}, u_t) one step at a time, differentiated by plain autograd."""
    h = cell.zero_state(u[:, 0])
    states = []
    # unbind, not u[:, t]: indexing's backward would write a full-size gradient per step (O(T^2)).
    for u_t in u.unbind(1):
        h = cell.step(h, u_t, params)
        states.append(h)
    return torch.stack(states, dim=1)

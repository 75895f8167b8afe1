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
the GRU and LSTM cells. Which implementation runs each part (the fused C kernels, compiled or eager
torch passes, the Triton or torch scan) is a kernels.pararnn_plan.SolverPlan, decided once per
layer; the solver and the adjoint below only follow it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from kernels.dispatch import KernelsConfig, pick
from kernels.pararnn_cpu import fused_adjoint, fused_inputs_fit, fused_newton_solve
from kernels.pararnn_plan import (  # noqa: F401 - compile_available is re-exported for its callers
    NewtonOptions,
    SolverPlan,
    build_solver_plan,
    compile_available,
)
from kernels.shapes import check_scan_shapes

# The default Newton options of the solve functions (fixed mode, 3 updates).
DEFAULT_NEWTON = NewtonOptions()


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

    # Optional, used by the solver when present:
    # - solver_step(h_prev, u, params): f as the solver evaluates it (e.g. a cheaper but equal-to-
    #   rounding tanh); `step` is used otherwise. `step` stays the reference the loop runs.
    # - step_vjp(h_prev, u, params, cotangent) -> (grad_u, per-step param grads [..., *param.shape]):
    #   hand-written derivatives; the solver sums the param grads over (B, T). torch.func.vjp of
    #   `step` otherwise.


# ---------------------------------------------------------------------------------------------
# Linear scans: h_t = a_t h_{t-1} + b_t along dim 1.
# ---------------------------------------------------------------------------------------------
# Two torch forms of the same associative scan: the odd-even reduction (`linear_scan_torch`, eager and
# the kernel dispatch's "torch" backend) and the cache-blocked one (`linear_scan_blocked`, which the
# compiled solver uses).


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


def _block2_compose_transposed(a_later: torch.Tensor, a_earlier: torch.Tensor) -> torch.Tensor:
    # Maps stored untransposed, applied as A^T: later^T earlier^T = (earlier later)^T.
    return _block2_compose(a_earlier, a_later)


def _block2_apply_transposed(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # [..., k, i, D] x [..., k, D] -> [..., i, D]: A^T x without materialising A^T.
    return (a * x.unsqueeze(-2)).sum(-3)


_SCAN_OPS: dict[str, tuple[Callable, Callable]] = {
    "diagonal": (_diag_compose, _diag_apply),
    "block2": (_block2_compose, _block2_apply),
}
# The same scans with every map applied transposed (the adjoint's maps, without a transposed copy).
_TRANSPOSED_SCAN_OPS: dict[str, tuple[Callable, Callable]] = {
    "diagonal": (_diag_compose, _diag_apply),
    "block2": (_block2_compose_transposed, _block2_apply_transposed),
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
    check_scan_shapes(a, b, structure)
    compose, apply = _SCAN_OPS[structure]
    return _odd_even_scan(a, _fold_initial_state(a, b, h0, structure), compose, apply)


def _transposed_linear_scan_torch(a: torch.Tensor, b: torch.Tensor, structure: str) -> torch.Tensor:
    """h_t = a_t^T h_{t-1} + b_t (h_{-1} = 0): `linear_scan_torch` with each map transposed."""
    check_scan_shapes(a, b, structure)
    compose, apply = _TRANSPOSED_SCAN_OPS[structure]
    return _odd_even_scan(a, b, compose, apply)


# Cache-blocked scan: the same associative scan, regrouped so each level-pass of the odd-even form
# is not a separate full-size read and write. Maps and states are handled as tuples of their
# per-channel entries ([B, T, D] each: 1 or 4 map entries, 1 or 2 state entries), so a torch.compile
# graph of the whole scan is plain element-wise code on strided slices that inductor fuses into a few
# loops. Eagerly it is many small ops: the uncompiled solver keeps the odd-even scan.

# Chunk length C: measured at T = 4096, N = 256 on 2 CPU cores (compiled, block2): C = 8 1.9 ms,
# C = 16 2.9 ms, odd-even 3.2 ms. Larger chunks make the unrolled in-chunk network too big to fuse well.
BLOCKED_SCAN_CHUNK = 8


def _entry_compose_diagonal(later: tuple, earlier: tuple) -> tuple:
    return (later[0] * earlier[0],)


def _entry_apply_diagonal(a: tuple, x: tuple) -> tuple:
    return (a[0] * x[0],)


def _entry_compose_block2(later: tuple, earlier: tuple) -> tuple:
    # Entries in row-major order (00, 01, 10, 11): later @ earlier per channel.
    l00, l01, l10, l11 = later
    e00, e01, e10, e11 = earlier
    return (l00 * e00 + l01 * e10, l00 * e01 + l01 * e11, l10 * e00 + l11 * e10, l10 * e01 + l11 * e11)


def _entry_apply_block2(a: tuple, x: tuple) -> tuple:
    a00, a01, a10, a11 = a
    return (a00 * x[0] + a01 * x[1], a10 * x[0] + a11 * x[1])


_ENTRY_OPS: dict[str, tuple[Callable, Callable]] = {
    "diagonal": (_entry_compose_diagonal, _entry_apply_diagonal),
    "block2": (_entry_compose_block2, _entry_apply_block2),
}


def _add_entries(x: tuple, y: tuple) -> tuple:
    return tuple(xi + yi for xi, yi in zip(x, y))


def _map_entries(a: torch.Tensor, structure: str, transposed: bool) -> tuple:
    """A map [..., D] / [..., 2, 2, D] as its entries; `transposed` reads A^T (no transposed copy)."""
    if structure == "diagonal":
        return (a,)
    e00, e01, e10, e11 = a.flatten(-3, -2).unbind(-2)
    return (e00, e10, e01, e11) if transposed else (e00, e01, e10, e11)


def _state_entries(b: torch.Tensor, structure: str) -> tuple:
    return (b,) if structure == "diagonal" else b.unbind(-2)


def _list_prefix_scan(maps: list, states: list, compose: Callable, apply: Callable) -> list:
    """Inclusive prefix states of a short list of affine maps (first state given): Hillis-Steele,
    log2(len) levels; the last level needs no composed maps."""
    maps, states = list(maps), list(states)
    length, offset = len(states), 1
    while offset < length:
        next_maps, next_states = list(maps), list(states)
        for j in range(offset, length):
            next_states[j] = _add_entries(apply(maps[j], states[j - offset]), states[j])
            if 2 * offset < length:
                next_maps[j] = compose(maps[j], maps[j - offset])
        maps, states, offset = next_maps, next_states, 2 * offset
    return states


def _list_reduce(maps: list, states: list, compose: Callable, apply: Callable) -> tuple:
    """The composition of a list of 2^k affine maps (last o ... o first) by a pairwise tree."""
    while len(states) > 1:
        pairs = range(0, len(states), 2)
        maps, states = ([compose(maps[i + 1], maps[i]) for i in pairs],
                        [_add_entries(apply(maps[i + 1], states[i]), states[i + 1]) for i in pairs])
    return maps[0], states[0]


def _stack_states(states: list, structure: str) -> torch.Tensor:
    """Per-position state entries [B, n, D] -> [B, n * len, (2,) D]: one flat stack (nested stacks
    make inductor copy twice)."""
    flat = torch.stack([x for state in states for x in state], dim=2)
    if structure == "diagonal":
        return flat.flatten(1, 2)
    return flat.unflatten(2, (len(states), 2)).flatten(1, 2)


def _blocked_scan(a: torch.Tensor, b: torch.Tensor, structure: str, transposed: bool, chunk: int) -> torch.Tensor:
    compose, apply = _ENTRY_OPS[structure]
    seq_len = b.shape[1]
    if seq_len <= chunk:
        # [:, t : t + 1] keeps a time dim of 1, as the chunked slices below have a chunk dim.
        maps = [_map_entries(a[:, t : t + 1], structure, transposed) for t in range(seq_len)]
        states = [_state_entries(b[:, t : t + 1], structure) for t in range(seq_len)]
        return _stack_states(_list_prefix_scan(maps, states, compose, apply), structure)
    padded = -seq_len % chunk
    if padded:
        # Trailing zero maps and states: they only follow the real steps, whose states are unchanged.
        a = torch.nn.functional.pad(a, (0, 0) * (a.dim() - 2) + (0, padded))
        b = torch.nn.functional.pad(b, (0, 0) * (b.dim() - 2) + (0, padded))
    chunks = b.shape[1] // chunk
    a_chunked, b_chunked = a.unflatten(1, (chunks, chunk)), b.unflatten(1, (chunks, chunk))
    maps = [_map_entries(a_chunked[:, :, j], structure, transposed) for j in range(chunk)]
    states = [_state_entries(b_chunked[:, :, j], structure) for j in range(chunk)]
    # (a) Each chunk's composed map; (b) scan those (recursively) for the state after every chunk;
    # (c) fold the state before each chunk into its first step and scan inside the chunks.
    chunk_map, chunk_state = _list_reduce(maps, states, compose, apply)
    if structure == "block2":
        chunk_map = torch.stack(chunk_map, dim=-2).unflatten(-2, (2, 2))
        chunk_state = torch.stack(chunk_state, dim=-2)
    else:
        chunk_map, chunk_state = chunk_map[0], chunk_state[0]
    # Already transposed where asked: the entries above are those of the maps as applied.
    chunk_ends = _blocked_scan(chunk_map, chunk_state, structure, False, chunk)
    carry_in = _state_entries(shift_states(chunk_ends), structure)
    states[0] = _add_entries(apply(maps[0], carry_in), states[0])
    h = _stack_states(_list_prefix_scan(maps, states, compose, apply), structure)
    return h[:, :seq_len] if padded else h


def linear_scan_blocked(a: torch.Tensor, b: torch.Tensor, structure: str, h0: torch.Tensor | None = None,
                        chunk: int = BLOCKED_SCAN_CHUNK) -> torch.Tensor:
    """`linear_scan_torch` as a cache-blocked associative scan, for use inside torch.compile graphs.

    Time is cut into chunks of `chunk` steps: a log-depth tree composes each chunk's maps, the chunk
    maps are scanned the same way recursively, and a log-depth (Hillis-Steele) scan inside every
    chunk, started from the state before it, gives all states. Depth O(log T); O(T log chunk) work.
    """
    check_scan_shapes(a, b, structure)
    return _blocked_scan(a, _fold_initial_state(a, b, h0, structure), structure, False, chunk)


def _transposed_linear_scan_blocked(a: torch.Tensor, b: torch.Tensor, structure: str,
                                    chunk: int = BLOCKED_SCAN_CHUNK) -> torch.Tensor:
    """h_t = a_t^T h_{t-1} + b_t (h_{-1} = 0) by the blocked scan."""
    check_scan_shapes(a, b, structure)
    return _blocked_scan(a, b, structure, True, chunk)


def linear_scan_sequential(a: torch.Tensor, b: torch.Tensor, structure: str,
                           h0: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: one step per t in a Python loop."""
    check_scan_shapes(a, b, structure)
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


def _reversed_shifted(jacobians: torch.Tensor) -> torch.Tensor:
    """zero, A_{T-1}, ..., A_1: the adjoint scan's maps in reversed time, before transposing."""
    return torch.nn.functional.pad(jacobians[:, 1:].flip(1), (0, 0) * (jacobians.dim() - 2) + (1, 0))


def _adjoint_maps(jacobians: torch.Tensor, structure: str) -> torch.Tensor:
    """The time-reversed maps of the adjoint scan: zero, then A_{T-1}^T, ..., A_1^T."""
    return transpose_jacobian(_reversed_shifted(jacobians), structure)


def adjoint_scan(jacobians: torch.Tensor, grad: torch.Tensor, structure: str,
                 kernels: KernelsConfig | None = None) -> torch.Tensor:
    """lambda_t = grad_t + A_{t+1}^T lambda_{t+1} (lambda_T = 0): the reverse-time adjoint scan.

    `jacobians[:, t]` is A_t = d h_t / d h_{t-1}. Solved as a forward scan on the time-reversed
    sequence whose maps are the transposed Jacobians shifted by one step.
    """
    return linear_scan(_adjoint_maps(jacobians, structure), grad.flip(1), structure, kernels=kernels).flip(1)


# ---------------------------------------------------------------------------------------------
# Newton solver.
# ---------------------------------------------------------------------------------------------


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
    # One padded copy (not zeros + cat): torch.compile folds it into the pass that reads it.
    return torch.nn.functional.pad(h[:, :-1], (0, 0) * (h.dim() - 2) + (1, 0))


def _solver_step(cell: RecurrentCell) -> Callable:
    """The cell's f as the solver's passes evaluate it: `solver_step` when it has one, else `step`."""
    return getattr(cell, "solver_step", cell.step)


def _initial_guess(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor]):
    """h^0_t = f(0, u_t) with its residual and the Jacobians at it: one fused pass."""
    h = _solver_step(cell)(cell.zero_state(u), u, params)
    return h, *_residual_and_jacobians(cell, h, u, params)


def _residual_and_jacobians(cell: RecurrentCell, h: torch.Tensor, u: torch.Tensor,
                            params: Sequence[torch.Tensor]):
    """f(h_{t-1}, u_t) - h_t and the Jacobians at h: one fused pass."""
    f, jacobians = cell.step_and_jacobian(shift_states(h), u, params)
    return f - h, jacobians


def _update(cell: RecurrentCell, h: torch.Tensor, delta: torch.Tensor, u: torch.Tensor,
            params: Sequence[torch.Tensor]):
    """h + delta with its residual and the Jacobians at it: one fused pass."""
    h = h + delta
    return h, *_residual_and_jacobians(cell, h, u, params)


def _final_update(cell: RecurrentCell, h: torch.Tensor, delta: torch.Tensor, u: torch.Tensor,
                  params: Sequence[torch.Tensor]):
    """h + delta and its max |residual| (no Jacobians: no further update follows)."""
    h = h + delta
    return h, (_solver_step(cell)(shift_states(h), u, params) - h).abs().max()


# Structures whose Newton passes run the torch scan inside the pass's graph. Measured at T = 4096,
# N = 256 on 2 CPU cores: block2 forward 29 -> 25 ms (odd-even scan); with the blocked scan the LSTM
# bench still prefers it (36 vs 47 ms fwd+bwd); diagonal 9.8 -> 10.3 ms (odd-even) and one Newton
# update 2.2 -> 2.4 ms (blocked), so it keeps them apart.
_SCAN_IN_PASS_GRAPH = frozenset({"block2"})


def _initial_guess_and_delta(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor],
                             scan: Callable = linear_scan_torch):
    """h^0 and its Newton step delta (torch scan): one graph, so inductor fuses the Jacobians into
    the scan's first level and reuses its buffers (measured ~10% faster than separate passes)."""
    h, residual, jacobians = _initial_guess(cell, u, params)
    return h, scan(jacobians, residual, cell.structure)


def _update_and_delta(cell: RecurrentCell, h: torch.Tensor, delta: torch.Tensor, u: torch.Tensor,
                      params: Sequence[torch.Tensor], scan: Callable = linear_scan_torch):
    """h + delta and its Newton step (torch scan): one graph, as `_initial_guess_and_delta`."""
    h, residual, jacobians = _update(cell, h, delta, u, params)
    return h, scan(jacobians, residual, cell.structure)


def _reversed_adjoint_jacobians(cell: RecurrentCell, h: torch.Tensor, u: torch.Tensor,
                                params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The adjoint scan's maps at the solved h, untransposed (see `_reversed_shifted`), contiguous."""
    jacobians = cell.step_and_jacobian(shift_states(h), u, params)[1]
    return _reversed_shifted(jacobians).contiguous()


def _reversed_adjoint_torch(cell: RecurrentCell, h: torch.Tensor, u: torch.Tensor,
                            params: Sequence[torch.Tensor], grad_h: torch.Tensor,
                            transposed_scan: Callable = _transposed_linear_scan_torch) -> torch.Tensor:
    """lambda in reversed time by the torch scan, the adjoint maps computed in the same graph."""
    maps = _reversed_adjoint_jacobians(cell, h, u, params)
    return transposed_scan(maps, grad_h.flip(1), cell.structure)


def _vector_jacobian_product(cell: RecurrentCell, h: torch.Tensor, u: torch.Tensor,
                             params: Sequence[torch.Tensor], reversed_cotangent: torch.Tensor,
                             wants: tuple[bool, ...]) -> list[torch.Tensor | None]:
    """lambda^T df/d(u, params) at every t, for the inputs flagged in `wants`; lambda is given time-reversed.

    torch.func.vjp rather than autograd.grad: torch.compile fuses it into one pass over (h, u, lambda).
    """
    h_prev = shift_states(h)
    if hasattr(cell, "step_vjp"):
        # Hand-written derivatives (cheaper than tracing f's graph), param sums fused into the same pass.
        grad_u, per_step = cell.step_vjp(h_prev, u, params, reversed_cotangent.flip(1))
        grad_params = [_sum_over_steps(g, p.dim()) for g, p in zip(per_step, params)]
        return [g if w else None for g, w in zip([grad_u, *grad_params], wants)]
    inputs = [u, *params]
    wanted = [x for x, w in zip(inputs, wants) if w]

    def step_of_wanted(*values):
        it = iter(values)
        u_, *params_ = [next(it) if w else x for x, w in zip(inputs, wants)]
        return cell.step(h_prev, u_, params_)

    _, vjp = torch.func.vjp(step_of_wanted, *wanted)
    grads = iter(vjp(reversed_cotangent.flip(1)))
    return [next(grads) if w else None for w in wants]


def _sum_over_steps(x: torch.Tensor, param_dims: int) -> torch.Tensor:
    """x [B, T, *param_shape] summed over (B, T), as two short reductions.

    Inductor's CPU code for one reduction over a long outer dim is ~2.5x slower than for
    [chunks, n / chunks] reduced in two stages (measured at B T = 4096, 3 x 256 channels).
    """
    flat = x.flatten(0, x.dim() - param_dims - 1)
    chunks = math.gcd(flat.shape[0], 128)
    return flat.unflatten(0, (chunks, -1)).sum(1).sum(0)


@dataclass(frozen=True)
class _SolverOps:
    """The passes of a solve, eager or each fused by torch.compile into a few C++ loops."""

    initial_guess: Callable
    update: Callable
    final_update: Callable
    reversed_adjoint_jacobians: Callable
    vector_jacobian_product: Callable
    scan_torch: Callable
    # The fixed-iteration solve and the adjoint with the torch scan, each scan in its pass's graph.
    initial_guess_and_delta: Callable
    update_and_delta: Callable
    reversed_adjoint_torch: Callable


def _eager_ops() -> _SolverOps:
    return _SolverOps(_initial_guess, _update, _final_update, _reversed_adjoint_jacobians,
                      _vector_jacobian_product, linear_scan_torch,
                      _initial_guess_and_delta, _update_and_delta, _reversed_adjoint_torch)


@functools.cache
def _compiled_ops() -> _SolverOps:
    # Built once per process (torch.compile wrappers keep their own per-shape caches). Static shapes:
    # the scans' recursion depends on T, so each length gets its own unrolled graph. Each
    # pass is compiled on its own: one graph for a whole solve fuses worse (measured 2x slower).
    def fuse(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=False)

    # Compiled, the torch scans are the cache-blocked form (eagerly its many small ops are slower).
    # Its unrolled in-chunk networks make compiling slower: a cold LSTM solve at T = 4096 took 67 s
    # instead of 22 s (GRU unchanged, 22 s); inductor's on-disk cache serves later processes.
    blocked = dataclasses.replace(
        _eager_ops(),
        scan_torch=linear_scan_blocked,
        initial_guess_and_delta=functools.partial(_initial_guess_and_delta, scan=linear_scan_blocked),
        update_and_delta=functools.partial(_update_and_delta, scan=linear_scan_blocked),
        reversed_adjoint_torch=functools.partial(_reversed_adjoint_torch,
                                                 transposed_scan=_transposed_linear_scan_blocked))
    return _SolverOps(*(fuse(fn) for fn in dataclasses.astuple(blocked, tuple_factory=list)))


def _solver_ops(compiled: bool) -> _SolverOps:
    return _compiled_ops() if compiled else _eager_ops()


def _scan(ops: _SolverOps, plan: SolverPlan, jacobians: torch.Tensor, b: torch.Tensor,
          structure: str) -> torch.Tensor:
    """The plan's scan; the torch one as the solver ops run it (compiled: the blocked form)."""
    if plan.scan == "torch":
        return ops.scan_torch(jacobians, b, structure)
    return SCAN_IMPLS[plan.scan](jacobians, b, structure)


def plan_for_call(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor],
                  options: NewtonOptions = DEFAULT_NEWTON, kernels: KernelsConfig | None = None,
                  compiled: bool = False) -> SolverPlan:
    """The plan of a call that brings none (a layer brings its own): kernels.pararnn_plan's, for these
    inputs' device and dtype; inputs the fused kernel cannot read run the torch passes. Missing fast
    paths are reported here, as kernels.on_missing says."""
    return build_solver_plan(cell, u.device, u.dtype, options, kernels, compiled,
                             fused_inputs=fused_inputs_fit(cell, u, params))


def _check_fused_inputs(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """A plan that runs the fused C kernels was built for this cell's inputs; refuse any others."""
    if not fused_inputs_fit(cell, u, params):
        raise ValueError(f"ParaRNN: the plan runs the fused C kernels but they cannot read these inputs (u "
                         f"{tuple(u.shape)} {u.dtype}, params {[tuple(p.shape) for p in params]}); build the "
                         "plan for the cell and the inputs' device and dtype (kernels.pararnn_plan)")


def newton_solve(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor],
                 options: NewtonOptions = DEFAULT_NEWTON,
                 kernels: KernelsConfig | None = None,
                 compiled: bool = False,
                 plan: SolverPlan | None = None) -> tuple[torch.Tensor, NewtonReport]:
    """Solve h_t = f(h_{t-1}, u_t) for all t by Newton's method; no autograd graph is recorded.

    `plan` (kernels.pararnn_plan.SolverPlan) says what runs: the fused C solve, or the torch passes
    (eager or compiled) with the Triton or torch scan. Without one, `plan_for_call` builds it from
    `kernels` and `compiled` for this call. `compiled=True` asks to fuse the element-wise passes
    and the torch scan with torch.compile (needs a C++ compiler on CPU, see `compile_available`); the
    result is the same up to float rounding. Each (cell class, shape, dtype) compiles once, on first
    use; past torch's recompile limit (dynamo's recompile_limit, 8 by default) further shapes run
    eagerly with a torch warning. Warns with NewtonNotConvergedWarning when the final residual is
    above the tolerance.
    """
    if plan is None:
        plan = plan_for_call(cell, u, params, options, kernels, compiled)
    adaptive = options.tol is not None
    max_updates = options.max_iterations if adaptive else options.iterations
    tolerance = options.tol if adaptive else options.warn_residual
    ops = _solver_ops(plan.compiled)
    with torch.no_grad():
        if plan.forward == "fused_c":
            _check_fused_inputs(cell, u, params)
            h, max_residual = fused_newton_solve(cell, u, params, max_updates)
            updates = max_updates
        elif max_updates == 0:
            h = cell.step(cell.zero_state(u), u, params)
            updates, max_residual = 0, (cell.step(shift_states(h), u, params) - h).abs().max()
        elif plan.scan == "torch" and not adaptive and cell.structure in _SCAN_IN_PASS_GRAPH:
            h, delta = ops.initial_guess_and_delta(cell, u, params)
            for _ in range(max_updates - 1):
                h, delta = ops.update_and_delta(cell, h, delta, u, params)
            updates = max_updates
            h, max_residual = ops.final_update(cell, h, delta, u, params)
        else:
            h, residual, jacobians = ops.initial_guess(cell, u, params)
            updates = 0
            while True:
                # Fixed mode reads the residual only at the end (each read is a device sync on GPU).
                if adaptive:
                    max_residual = residual.abs().max()
                    if float(max_residual) <= tolerance:
                        break
                delta = _scan(ops, plan, jacobians, residual, cell.structure)
                updates += 1
                if updates == max_updates:
                    h, max_residual = ops.final_update(cell, h, delta, u, params)
                    break
                h, residual, jacobians = ops.update(cell, h, delta, u, params)
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
    """Identity on the solved states whose backward is the adjoint of the recurrence (as `plan` says)."""

    @staticmethod
    def forward(ctx, cell, plan, u, h, *params):
        ctx.cell, ctx.plan = cell, plan
        ctx.save_for_backward(u, h, *params)
        return h.view_as(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        cell: RecurrentCell = ctx.cell
        plan: SolverPlan = ctx.plan
        # Detached: the passes below record no graph, and compiled ones then see the same guards as forward's.
        u, h, *params = [x.detach() for x in ctx.saved_tensors]
        wants = (ctx.needs_input_grad[2], *ctx.needs_input_grad[4:])
        if not any(wants):
            return (None,) * (4 + len(params))
        if plan.backward == "fused_c":
            _check_fused_inputs(cell, u, params)
            grads = fused_adjoint(cell, u, params, h, grad_h)
            grad_u, *grad_params = [g if w else None for g, w in zip(grads, wants)]
            return (None, None, grad_u, None, *grad_params)
        ops = _solver_ops(plan.compiled)
        with torch.no_grad():
            # lambda_t = grad_t + A_{t+1}^T lambda_{t+1}, solved forward in reversed time.
            if plan.scan == "torch":
                reversed_lam = ops.reversed_adjoint_torch(cell, h, u, params, grad_h)
            else:
                maps = ops.reversed_adjoint_jacobians(cell, h, u, params)
                reversed_lam = SCAN_IMPLS[plan.scan](transpose_jacobian(maps, cell.structure).contiguous(),
                                                     grad_h.flip(1), cell.structure)
                del maps
            grad_u, *grad_params = ops.vector_jacobian_product(cell, h, u, params, reversed_lam, wants)
        return (None, None, grad_u, None, *grad_params)


def parallel_recurrence(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor],
                        options: NewtonOptions = DEFAULT_NEWTON,
                        kernels: KernelsConfig | None = None,
                        compiled: bool = False,
                        plan: SolverPlan | None = None) -> tuple[torch.Tensor, NewtonReport]:
    """States h [B, T, ...] of the recurrence, solved by Newton + scans; differentiable by the adjoint.

    Gradients flow to `u` and `params`; the backward saves only u and h (plus the parameters).
    `plan` says what runs forward and backward (a layer passes the one it built); without one,
    `plan_for_call` builds it once for both from `kernels` and `compiled`, as in `newton_solve`.
    """
    if plan is None:
        plan = plan_for_call(cell, u, params, options, kernels, compiled)
    h, report = newton_solve(cell, u.detach(), [p.detach() for p in params], options, plan=plan)
    return _AdjointRecurrence.apply(cell, plan, u, h, *params), report


def sequential_recurrence(cell: RecurrentCell, u: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference: h_t = f(h_{t-1}, u_t) one step at a time, differentiated by plain autograd."""
    h = cell.zero_state(u[:, 0])
    states = []
    # unbind, not u[:, t]: indexing's backward would write a full-size gradient per step (O(T^2)).
    for u_t in u.unbind(1):
        h = cell.step(h, u_t, params)
        states.append(h)
    return torch.stack(states, dim=1)

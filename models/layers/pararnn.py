"""ParaRNN token mixers: ParaGRU and ParaLSTM, nonlinear RNNs trained in parallel over the sequence.

Each layer computes the input projections of every step in one matmul (u = x W_in + b), solves the
recurrence h_t = f(h_{t-1}, u_t) with kernels.pararnn (Newton + parallel scan, or the plain loop in
``mode="sequential"``), and maps the states back with an output projection. The recurrent weights
act element-wise, so every channel of the state is independent of the others: a tensor-parallel
split of the state channels (W_in's dim 1, the recurrent weights' and biases' dim 1, W_out's input
dim) needs no communication inside the recurrence.

Cells (docs/pararnn.md, "Cells"):
- GRU, state h [.., N], diagonal Jacobian:
  z = sigmoid(a_z h + u_z); r = sigmoid(a_r h + u_r); c = tanh(a_c (r h) + u_c); h' = z c + (1 - z) h.
- LSTM with coupled input-forget gate and peepholes, state [c, h] [.., 2, N], 2x2-block Jacobian:
  f = sigmoid(a_f h + u_f + p_f c); c~ = tanh(a_c h + u_c); c' = f c + (1 - f) c~;
  o = sigmoid(a_o h + u_o + p_o c'); h' = o tanh(c').

Initialisation (docs/pararnn.md): recurrent and peephole weights ~ N(0, (2 / sqrt(5 N))^2); input weights
with Xavier variance 2 / (hidden + N) per gate (normal, since models.init has no uniform kind);
biases 0 except the first gate's, which starts at -linspace(0, 1, N). That offset is a fixed,
non-persistent buffer added to the learned bias (zeros-initialised): with biases exempt from weight
decay (the default) training is identical to initialising the bias at the offset.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import KernelsConfig
from kernels.pararnn import NewtonReport, parallel_recurrence, sequential_recurrence
from kernels.pararnn_plan import NewtonOptions, SolverPlan, build_solver_plan
from models.config import ModelConfig
from models.decode_cache import DecodeCache
from models.init import ParamInit, normal_init, zeros_init
from models.layers.tensor_parallel import TPContext, tp_region_input
from models.parallel_context import ParallelContext, resolve_context
from parallel_state.params import mark_shard

MODES = ("parallel", "sequential")


class GRUCell:
    """The ParaGRU recurrence. u [.., 3, N] holds (u_z, u_r, u_c); params = (a [3, N],).

    `step` is the reference f (the sequential loop runs it). The solver's passes (`solver_step`,
    `step_and_jacobian`, `step_vjp`) evaluate tanh as 2 sigmoid(2x) - 1: the same function to float
    rounding (~1e-7 absolute), and on CPU inductor's vectorised tanh costs about 3 sigmoids.
    """

    structure = "diagonal"
    # kernels/pararnn_cpu.c implements this f (solver_step's form) for the fused CPU solve.
    fused_cpu_cell = "gru"

    @staticmethod
    def fast_tanh(x: torch.Tensor) -> torch.Tensor:
        """tanh(x) as 2 sigmoid(2x) - 1 (absolute error ~1e-7 in fp32)."""
        return 2 * torch.sigmoid(2 * x) - 1

    def zero_state(self, u: torch.Tensor) -> torch.Tensor:
        return u.new_zeros(u.shape[:-2] + u.shape[-1:])

    def step(self, h_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor],
             tanh: Callable[[torch.Tensor], torch.Tensor] = torch.tanh) -> torch.Tensor:
        (a,) = params
        # unbind, not u[..., g, :]: its backward stacks once instead of a full-size zero tensor per gate.
        u_z, u_r, u_c = u.unbind(-2)
        z = torch.sigmoid(a[0] * h_prev + u_z)
        r = torch.sigmoid(a[1] * h_prev + u_r)
        c = tanh(a[2] * (r * h_prev) + u_c)
        return h_prev + z * (c - h_prev)

    def solver_step(self, h_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """f(h_prev, u) as the solver evaluates it (see the class docstring)."""
        return self.step(h_prev, u, params, tanh=self.fast_tanh)

    def step_and_jacobian(self, h_prev: torch.Tensor, u: torch.Tensor,
                          params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (a,) = params
        # unbind, not u[..., g, :]: its backward stacks once instead of a full-size zero tensor per gate.
        u_z, u_r, u_c = u.unbind(-2)
        z = torch.sigmoid(a[0] * h_prev + u_z)
        r = torch.sigmoid(a[1] * h_prev + u_r)
        c = self.fast_tanh(a[2] * (r * h_prev) + u_c)
        c_minus_h = c - h_prev
        dz = z * (1 - z) * a[0]
        dr = r * (1 - r) * a[1]
        dc = (1 - c * c) * a[2] * (r + h_prev * dr)
        jacobian = (1 - z) + z * dc + c_minus_h * dz
        return h_prev + z * c_minus_h, jacobian

    def step_vjp(self, h_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor],
                 cotangent: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(lambda^T df/du, [lambda^T df/da]) per step for cotangent lambda; the caller sums over steps."""
        (a,) = params
        u_z, u_r, u_c = u.unbind(-2)
        z = torch.sigmoid(a[0] * h_prev + u_z)
        r = torch.sigmoid(a[1] * h_prev + u_r)
        c = self.fast_tanh(a[2] * (r * h_prev) + u_c)
        grad_uc = cotangent * z * (1 - c * c)
        grad_uz = cotangent * (c - h_prev) * z * (1 - z)
        grad_ur = grad_uc * a[2] * h_prev * r * (1 - r)
        grad_u = torch.stack([grad_uz, grad_ur, grad_uc], dim=-2)
        # d/da_g: grad_u_g times what a_g multiplies (h, h, r h).
        return grad_u, [grad_u * torch.stack([h_prev, h_prev, r * h_prev], dim=-2)]

    def output(self, states: torch.Tensor) -> torch.Tensor:
        """The part of the state the layer reads out: all of it."""
        return states


class LSTMCell:
    """The ParaLSTM recurrence. u [.., 3, N] holds (u_f, u_c, u_o); params = (a [3, N], p [2, N]).

    The state is [c, h] stacked on dim -2.
    """

    structure = "block2"
    fused_cpu_cell = "lstm"  # as GRUCell's
    # The solver's passes use it as GRUCell's do (see GRUCell).
    fast_tanh = staticmethod(GRUCell.fast_tanh)

    def zero_state(self, u: torch.Tensor) -> torch.Tensor:
        return u.new_zeros(u.shape[:-2] + (2, u.shape[-1]))

    def step(self, s_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor],
             tanh: Callable[[torch.Tensor], torch.Tensor] = torch.tanh) -> torch.Tensor:
        a, p = params
        c, h = s_prev.unbind(-2)
        u_f, u_c, u_o = u.unbind(-2)
        f = torch.sigmoid(a[0] * h + u_f + p[0] * c)
        c_tilde = tanh(a[1] * h + u_c)
        c_next = c_tilde + f * (c - c_tilde)
        o = torch.sigmoid(a[2] * h + u_o + p[1] * c_next)
        return torch.stack([c_next, o * tanh(c_next)], dim=-2)

    def step_and_jacobian(self, s_prev: torch.Tensor, u: torch.Tensor,
                          params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        a, p = params
        c, h = s_prev.unbind(-2)
        u_f, u_c, u_o = u.unbind(-2)
        f = torch.sigmoid(a[0] * h + u_f + p[0] * c)
        c_tilde = self.fast_tanh(a[1] * h + u_c)
        c_minus_ct = c - c_tilde
        c_next = c_tilde + f * c_minus_ct
        o = torch.sigmoid(a[2] * h + u_o + p[1] * c_next)
        tanh_c = self.fast_tanh(c_next)
        df = f * (1 - f)
        dc_dc = f + c_minus_ct * df * p[0]
        dc_dh = c_minus_ct * df * a[0] + (1 - f) * (1 - c_tilde * c_tilde) * a[1]
        do = o * (1 - o)
        do_dc = do * p[1] * dc_dc
        do_dh = do * (a[2] + p[1] * dc_dh)
        o_dtanh = o * (1 - tanh_c * tanh_c)
        dh_dc = do_dc * tanh_c + o_dtanh * dc_dc
        dh_dh = do_dh * tanh_c + o_dtanh * dc_dh
        state = torch.stack([c_next, o * tanh_c], dim=-2)
        # One flat stack, then a view: nested stacks make torch.compile copy the blocks twice.
        jacobian = torch.stack([dc_dc, dc_dh, dh_dc, dh_dh], dim=-2).unflatten(-2, (2, 2))
        return state, jacobian

    def solver_step(self, s_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """f(s_prev, u) as the solver evaluates it (tanh as in GRUCell's solver passes)."""
        return self.step(s_prev, u, params, tanh=self.fast_tanh)

    def step_vjp(self, s_prev: torch.Tensor, u: torch.Tensor, params: Sequence[torch.Tensor],
                 cotangent: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(lambda^T df/du, [d/da, d/dp]) per step for cotangent lambda [.., 2, N]; the caller sums over steps."""
        a, p = params
        c, h = s_prev.unbind(-2)
        u_f, u_c, u_o = u.unbind(-2)
        lam_c, lam_h = cotangent.unbind(-2)
        f = torch.sigmoid(a[0] * h + u_f + p[0] * c)
        c_tilde = self.fast_tanh(a[1] * h + u_c)
        c_next = c_tilde + f * (c - c_tilde)
        o = torch.sigmoid(a[2] * h + u_o + p[1] * c_next)
        tanh_c = self.fast_tanh(c_next)
        grad_uo = lam_h * tanh_c * o * (1 - o)
        # Everything reaching c' (its own cotangent, via h' = o tanh(c'), via o's peephole).
        grad_c_next = lam_c + lam_h * o * (1 - tanh_c * tanh_c) + grad_uo * p[1]
        grad_uf = grad_c_next * (c - c_tilde) * f * (1 - f)
        grad_uc = grad_c_next * (1 - f) * (1 - c_tilde * c_tilde)
        grad_u = torch.stack([grad_uf, grad_uc, grad_uo], dim=-2)
        # a_g multiplies h in every gate; p_f multiplies c, p_o multiplies c'.
        return grad_u, [grad_u * h.unsqueeze(-2), torch.stack([grad_uf * c, grad_uo * c_next], dim=-2)]

    def output(self, states: torch.Tensor) -> torch.Tensor:
        """The part of the state the layer reads out: h."""
        return states[..., 1, :]


class _ParaRNN(nn.Module):
    """Shared body of ParaGRU and ParaLSTM: input projection, recurrence, output projection.

    Tensor parallel over `tp`: each rank holds a contiguous slice of the state channels (w_in, b_in
    and the recurrent vectors sliced on dim 1, w_out row-parallel), reads the full input (all-gathered
    along the sequence under SP) and runs the recurrence on its channels only. `state_size` is the
    full N (for init and FLOPs); `state_per_rank` this rank's share.

    Backends: the first parallel forward on a (device, compute dtype) builds the layer's
    kernels.pararnn_plan.SolverPlan (fused C kernels, compiled or eager torch passes, Triton or
    torch scan; missing fast paths warn or raise there, per kernels.on_missing) and keeps it in
    `solver_plans`; every solve, forward and backward, runs that plan.
    """

    def __init__(self, cell, hidden_size: int, num_gates: int, num_recurrent_vectors: dict[str, int],
                 state_size: int | None, newton: NewtonOptions | None, output_init_std: float,
                 kernels: KernelsConfig | None, mode: str, tp: TPContext | None = None, compiled: bool = False):
        super().__init__()
        tp = tp or TPContext()
        # torch.compile asked for (model.pararnn.compile); whether it runs is the plan's to say.
        self.compile_requested = compiled
        self.cell = cell
        self.hidden_size = hidden_size
        self.state_size = hidden_size if state_size is None else state_size
        self.num_gates = num_gates
        # The mode forward uses when it is not given one.
        self.mode = mode
        self.newton = newton if newton is not None else NewtonOptions()
        self.kernels = kernels
        self.output_init_std = output_init_std
        n = self.state_size
        self.state_per_rank = local = n // tp.size
        self.tp_rank, self.tp_size = tp.rank, tp.size
        # The input mapping's arguments, the group resolved once (no lookups per call).
        self.tp_group, self.sequence_parallel = tp.group, tp.sp

        def channel_shard(*shape: int) -> nn.Parameter:
            """A parameter holding this rank's slice of the state channels (dim 1)."""
            return mark_shard(nn.Parameter(torch.empty(*shape)), 1, tp.rank, tp.size)

        # Gate-major [G, N, hidden] so a TP shard of the state channels is a slice of dim 1.
        self.w_in = channel_shard(num_gates, local, hidden_size)
        self.b_in = channel_shard(num_gates, local)
        self.recurrent_names = tuple(num_recurrent_vectors)
        for name, count in num_recurrent_vectors.items():
            self.register_parameter(name, channel_shard(count, local))
        self.w_out = tp.row(n, hidden_size, normal_init(output_init_std))
        self.register_buffer("first_gate_bias_offset", torch.empty(local), persistent=False)
        self.reset_parameters()
        self.reset_buffers()
        # The most recent parallel solve (iterations, residual); None before the first one.
        self.last_newton_report: NewtonReport | None = None
        # (device, compute dtype) -> the plan its solves run, built on the first forward there.
        self.solver_plans: dict[tuple[torch.device, torch.dtype], SolverPlan] = {}

    def solver_plan(self, device: torch.device, dtype: torch.dtype) -> SolverPlan:
        """The plan of this layer's solves on (device, compute dtype): built once, then kept."""
        key = (torch.device(device), dtype)
        plan = self.solver_plans.get(key)
        if plan is None:
            plan = build_solver_plan(self.cell, key[0], dtype, self.newton, self.kernels, self.compile_requested)
            self.solver_plans[key] = plan
        return plan

    def reset_parameters(self) -> None:
        """Draw every parameter from its init spec with torch's global RNG (standalone use).

        A model built by models.build_model is re-initialised there from (seed, global name).
        """
        if self.w_in.is_meta:
            return
        with torch.no_grad():
            for name, init in self.init_specs().items():
                param = self.get_parameter(name)
                if init.kind == "normal":
                    param.normal_(0.0, init.std)
                else:
                    param.fill_(1.0 if init.kind == "ones" else 0.0)

    def reset_buffers(self) -> None:
        """Recompute the first gate's fixed bias offset -linspace(0, 1, N) (docs/pararnn.md,
        "Initialisation"), this rank's channels of it under TP."""
        if self.first_gate_bias_offset.is_meta:
            return
        offset = -torch.linspace(0.0, 1.0, self.state_size)
        with torch.no_grad():
            self.first_gate_bias_offset.copy_(offset.chunk(self.tp_size)[self.tp_rank])

    def init_specs(self) -> dict[str, ParamInit]:
        recurrent_std = 2.0 / math.sqrt(5 * self.state_size)
        specs = {
            "w_in": normal_init(math.sqrt(2.0 / (self.hidden_size + self.state_size))),
            "b_in": zeros_init(),
            "w_out.weight": normal_init(self.output_init_std),
        }
        specs.update({name: normal_init(recurrent_std) for name in self.recurrent_names})
        return specs

    def input_projections(self, x: torch.Tensor) -> torch.Tensor:
        """u [B, T, G, N/tp] for every step at once: one matmul plus the biases (x: the full input)."""
        batch, seq_len, _ = x.shape
        weight = self.w_in.reshape(self.num_gates * self.state_per_rank, self.hidden_size)
        u = F.linear(x, weight).view(batch, seq_len, self.num_gates, self.state_per_rank)
        bias = self.b_in + F.pad(self.first_gate_bias_offset.unsqueeze(0), (0, 0, 0, self.num_gates - 1))
        return u + bias

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                mode: str | None = None, cache: DecodeCache | None = None) -> torch.Tensor:
        """x [B, T, hidden] (under SP this rank's [B, T/tp, hidden]) -> same shape, in `mode`
        (default: the layer's).

        position_ids is unused: the recurrence follows token order. With `cache` (decoding,
        launch/generate.py) the recurrence steps on from the cached state and leaves its last state there.
        """
        del position_ids
        mode = self.mode if mode is None else mode
        if self.tp_size > 1:
            x = tp_region_input(x, self.tp_group, self.sequence_parallel)
        u = self.input_projections(x)
        # The recurrence runs in fp32 (or fp64) even under bf16 autocast: Newton needs the precision.
        compute_dtype = recurrence_dtype(u.dtype)
        u = u.to(compute_dtype)
        params = [getattr(self, name).to(compute_dtype) for name in self.recurrent_names]
        if cache is not None:
            states = self._continue_recurrence(u, params, cache)
        elif mode == "parallel":
            plan = self.solver_plan(u.device, compute_dtype)
            states, self.last_newton_report = parallel_recurrence(self.cell, u, params, self.newton, plan=plan)
        elif mode == "sequential":
            states = sequential_recurrence(self.cell, u, params)
        else:
            raise ValueError(f"mode={mode!r}: unknown ParaRNN mode. Fix: use one of {', '.join(MODES)}")
        return self.w_out(self.cell.output(states).to(x.dtype))

    def _continue_recurrence(self, u: torch.Tensor, params: Sequence[torch.Tensor],
                             cache: DecodeCache) -> torch.Tensor:
        """The reference step loop from the cached state (zeros at first); the last state is cached.

        Decoding feeds a token at a time, where a Newton solve has nothing to parallelise.
        """
        state = self.cell.zero_state(u[:, 0]) if cache.state is None else cache.state
        states = []
        for u_t in u.unbind(1):
            state = self.cell.step(state, u_t, params)
            states.append(state)
        cache.state = state
        return torch.stack(states, dim=1)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 3 x forward, forward = 2 x (input + output projection parameters),
        of the full layer whatever the TP split.

        The element-wise recurrence (and Newton's repeated evaluations of it) is not counted, as MFU
        counts model FLOPs, not the solver's.
        """
        del seq_len  # one state update per token, whatever the length
        return 3.0 * 2.0 * (self.num_gates + 1) * self.state_size * self.hidden_size


class ParaGRU(_ParaRNN):
    """GRU with diagonal recurrent weights, trained in parallel over the sequence (ParaRNN).

    Maps [B, T, hidden] to [B, T, hidden]; ``forward(x, mode="parallel" | "sequential")``.
    """

    def __init__(self, hidden_size: int, state_size: int | None = None, newton: NewtonOptions | None = None,
                 output_init_std: float = 0.02, kernels: KernelsConfig | None = None, mode: str = "parallel",
                 tp: TPContext | None = None, compiled: bool = False):
        super().__init__(GRUCell(), hidden_size, num_gates=3, num_recurrent_vectors={"recurrent": 3},
                         state_size=state_size, newton=newton, output_init_std=output_init_std,
                         kernels=kernels, mode=mode, tp=tp, compiled=compiled)


class ParaLSTM(_ParaRNN):
    """LSTM with coupled input-forget gate, peepholes and diagonal recurrence (ParaRNN).

    Maps [B, T, hidden] to [B, T, hidden]; ``forward(x, mode="parallel" | "sequential")``.
    """

    def __init__(self, hidden_size: int, state_size: int | None = None, newton: NewtonOptions | None = None,
                 output_init_std: float = 0.02, kernels: KernelsConfig | None = None, mode: str = "parallel",
                 tp: TPContext | None = None, compiled: bool = False):
        super().__init__(LSTMCell(), hidden_size, num_gates=3,
                         num_recurrent_vectors={"recurrent": 3, "peephole": 2}, state_size=state_size,
                         newton=newton, output_init_std=output_init_std, kernels=kernels, mode=mode, tp=tp,
                         compiled=compiled)


def newton_options(cfg: ModelConfig) -> NewtonOptions:
    """The Newton options of model.pararnn.*."""
    p = cfg.pararnn
    return NewtonOptions(iterations=p.newton_iterations, tol=p.newton_tol,
                         max_iterations=p.newton_max_iterations, warn_residual=p.newton_warn_residual)


def recurrence_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence runs in for inputs of `dtype`: fp32 (also under bf16 autocast), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _from_model_config(cfg: ModelConfig) -> dict:
    """Constructor arguments of a ParaRNN token mixer from model.* and model.pararnn.*."""
    p = cfg.pararnn
    output_std = cfg.output_init_std()
    return {"state_size": p.state_size, "newton": newton_options(cfg), "output_init_std": output_std,
            "mode": p.mode, "kernels": cfg.kernels, "compiled": p.compile}


class ParaGRUMixer(ParaGRU):
    """ParaGRU built from the model config: the "pararnn_gru" token mixer."""

    def __init__(self, cfg: ModelConfig, par: ParallelContext | None = None):
        super().__init__(cfg.hidden_size, **_from_model_config(cfg), tp=resolve_context(par).tp)


class ParaLSTMMixer(ParaLSTM):
    """ParaLSTM built from the model config: the "pararnn_lstm" token mixer."""

    def __init__(self, cfg: ModelConfig, par: ParallelContext | None = None):
        super().__init__(cfg.hidden_size, **_from_model_config(cfg), tp=resolve_context(par).tp)


# The cell of each ParaRNN token mixer (the kernel report plans a solve for it without a layer).
PARARNN_CELLS = {"pararnn_gru": GRUCell, "pararnn_lstm": LSTMCell}

"""Routed experts computed together (grouped GEMM), and the always-active shared experts.

Routed experts: expert e is the SwiGLU w2_e(silu(w1_e x) * w3_e x) (w1 gate, w3 up, w2 down, as in
models/layers/mlp.py) with full weights w1_e, w3_e [F, H] and w2_e [H, F]. One parameter per
expert, named by its GLOBAL id (`w1.5`), so an EP rank holding experts 4..7 has the same parameter
names as the one-process model and `models.init.materialize` generates the same full tensors from
(seed, name). Expert tensor parallelism (ETP) keeps a slice of each: w1/w3 rows (column parallel,
`shard = (0, etp_rank, etp)` in its metadata, parallel_state.params) and w2 columns (row parallel, `(1, etp_rank, etp)`); the ETP
ranks' outputs are partial sums the dispatcher reduce-scatters. Every routed-expert parameter has
`expert=True` in its metadata: its gradient is reduced over EDP, not with the dense parameters.

Grouped GEMM: with `torch._grouped_mm` the local experts' weights are stacked per forward and
each projection is one call; otherwise a loop over experts, the reference. grouped_gemm="auto"
takes it on CUDA in bf16 on compute capability >= 9.0 (no GPU timing of it is recorded); on CPU
it runs in fp32 (torch 2.13) but takes 1.1-1.2x the loop's time (bench/moe_dispatch.py), so
"auto" keeps the loop there and "grouped_mm" forces it (the tests use that).

Shared experts: one SwiGLU of width num_shared * shared_ffn applied to every token, sharded over
the attention-side TP group like a sequence-parallel MLP (the MoE layer hands it tokens split
over TP): all-gather tokens, column w1/w3, row w2, reduce-scatter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.context import InitSpec
from parallel_state.collectives import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from parallel_state.groups import AxisGroup
from parallel_state.params import mark_shard, set_param_meta

GROUPED_MM_ALIGN_BYTES = 16  # torch._grouped_mm needs row strides that are multiples of 16 bytes


def _mark(param: nn.Parameter, dim: int, index: int, count: int, expert: bool) -> nn.Parameter:
    mark_shard(param, dim, index, count)
    if expert:
        set_param_meta(param, expert=True)
    return param


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward
    rejects the stride-0 gradients that e.g. `.sum().backward()` produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether torch._grouped_mm handles these operands (static rules, no trial call; the CUDA rule
    is torch's documented one, not checked on a GPU here)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    elem = torch.empty((), dtype=dtype).element_size()
    if any((w * elem) % GROUPED_MM_ALIGN_BYTES for w in widths):
        return False
    if device.type == "cpu":
        return dtype == torch.float32
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


def grouped_mm_chosen(mode: str, device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether model.moe.grouped_gemm=`mode` takes the grouped-GEMM path: "grouped_mm" always (the
    experts refuse it where unsupported), "auto" where supported on CUDA (slower than the loop on CPU)."""
    if mode == "grouped_mm":
        return True
    return mode == "auto" and device.type == "cuda" and grouped_mm_supported(device, dtype, *widths)


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[g-1]:offsets[g] of x [R, K] times weights[g] [K, N] -> [R, N] (one grouped GEMM)."""
    return _ContiguousGrad.apply(torch._grouped_mm(x, weights, offs=offsets))


class GroupedExperts(nn.Module):
    """The routed experts of one EP rank, ETP-sharded (see module docstring).

    forward(x [R, H] in expert-major order, rows_per_expert [E_local]) -> [R, H]; with etp > 1 the
    result is this ETP rank's partial sum.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float,
                 output_init_std: float, ep_rank: int = 0, ep_size: int = 1, etp_rank: int = 0,
                 etp_size: int = 1, grouped_gemm: str = "auto"):
        super().__init__()
        self.num_local = num_experts // ep_size
        self.first_expert = ep_rank * self.num_local
        self.expert_ids = list(range(self.first_expert, self.first_expert + self.num_local))
        self.hidden_size, self.ffn_local = hidden_size, ffn_hidden_size // etp_size
        self.init_std, self.output_init_std = init_std, output_init_std
        self.grouped_gemm = grouped_gemm

        def make(shape, dim):
            return _mark(nn.Parameter(torch.empty(shape)), dim, etp_rank, etp_size, expert=True)

        self.w1 = nn.ParameterDict({str(e): make((self.ffn_local, hidden_size), 0) for e in self.expert_ids})
        self.w3 = nn.ParameterDict({str(e): make((self.ffn_local, hidden_size), 0) for e in self.expert_ids})
        self.w2 = nn.ParameterDict({str(e): make((hidden_size, self.ffn_local), 1) for e in self.expert_ids})

    def init_specs(self) -> dict[str, InitSpec]:
        specs = {}
        for e in self.expert_ids:
            specs[f"w1.{e}"] = InitSpec("normal", self.init_std)
            specs[f"w3.{e}"] = InitSpec("normal", self.init_std)
            specs[f"w2.{e}"] = InitSpec("normal", self.output_init_std)
        return specs

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the grouped-GEMM path (raises if forced and unsupported)."""
        chosen = grouped_mm_chosen(self.grouped_gemm, x.device, x.dtype, self.hidden_size, self.ffn_local)
        if chosen and not grouped_mm_supported(x.device, x.dtype, self.hidden_size, self.ffn_local):
            raise RuntimeError(f"model.moe.grouped_gemm=grouped_mm but torch._grouped_mm does not support "
                               f"{x.dtype} on {x.device} with widths hidden={self.hidden_size}, "
                               f"ffn/etp={self.ffn_local}; use grouped_gemm=auto or loop")
        return chosen

    def forward(self, x: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        if self.uses_grouped_mm(x):
            return self._grouped(x, rows_per_expert)
        return self._loop(x, rows_per_expert)

    def _loop(self, x: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        outs = []
        for e, rows in zip(self.expert_ids, x.split(rows_per_expert, dim=0)):
            key = str(e)
            h = F.silu(F.linear(rows, self.w1[key])) * F.linear(rows, self.w3[key])
            outs.append(F.linear(h, self.w2[key]))
        return torch.cat(outs, dim=0) if outs else x.new_zeros((0, self.hidden_size))

    def _grouped(self, x: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        offsets = torch.tensor(rows_per_expert, device=x.device).cumsum(0).to(torch.int32)

        def stacked(params: nn.ParameterDict) -> torch.Tensor:  # [E_local, in, out] as x @ W^T needs
            return torch.stack([params[str(e)] for e in self.expert_ids]).transpose(1, 2)

        gate = grouped_matmul(x, stacked(self.w1), offsets)
        up = grouped_matmul(x, stacked(self.w3), offsets)
        return grouped_matmul(F.silu(gate) * up, stacked(self.w2), offsets)


class SharedExperts(nn.Module):
    """Dense SwiGLU on every token, sharded over the attention TP group (tokens arrive split over TP).

    forward(x [N, H] this TP rank's tokens) -> [N, H].
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float, output_init_std: float,
                 tp: AxisGroup):
        super().__init__()
        tp_size, tp_rank = tp.size, tp.rank
        self.tp = tp
        self.init_std, self.output_init_std = init_std, output_init_std
        local = ffn_hidden_size // tp_size
        self.w1 = _mark(nn.Parameter(torch.empty(local, hidden_size)), 0, tp_rank, tp_size, expert=False)
        self.w3 = _mark(nn.Parameter(torch.empty(local, hidden_size)), 0, tp_rank, tp_size, expert=False)
        self.w2 = _mark(nn.Parameter(torch.empty(hidden_size, local)), 1, tp_rank, tp_size, expert=False)

    def init_specs(self) -> dict[str, InitSpec]:
        return {"w1": InitSpec("normal", self.init_std), "w3": InitSpec("normal", self.init_std),
                "w2": InitSpec("normal", self.output_init_std)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_from_sequence_parallel_region(x, self.tp, dim=0)
        y = F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)
        y = reduce_scatter_to_sequence_parallel_region(y, self.tp, dim=0)
        return y

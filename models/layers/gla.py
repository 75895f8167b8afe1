"""Gated linear attention layer (Yang et al. 2024), parameter names as in fla's GatedLinearAttention.

    q = x Wq, k = x Wk           (key width expand_k * hidden, split over heads)
    v = x Wv                     (value width expand_v * hidden)
    g = logsigmoid(x W1 W2 + b) / gate_logit_normalizer   (W1: hidden -> rank 16, per key channel)
    o = RMSNorm_head(GLA(q, k, v, g)) * swish(x Wr);  y = o Wo

Every parameter except W1 belongs to exactly one head (rows of Wq, Wk, Wv, W2, b, Wr, the per-head
norm gains; columns of Wo), and nothing mixes heads between the input and the output projections.
So tensor parallelism can split heads over ranks like attention (column-parallel Wq/Wk/Wv/W2/Wr,
row-parallel Wo, W1 replicated) with no communication inside the recurrence. The one difference
from fla: the output norm has a gain per head ([heads, head_v]) instead of one shared gain, so it
shards with its head (an fla checkpoint converts by broadcasting its gain over heads).

Under TP W1 stays replicated without a TP-region input mapping of its own: each rank back-propagates
only through its slice of W2, so W1's weight gradient is a partial sum (marked `tp_partial_grad`,
summed over TP after backward) and its input gradient joins the other projections' partial input
gradients in the one reduction of the layer's input mapping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gla import chunk_gla, fused_recurrent_gla
from models.config import ModelConfig
from models.decode_cache import DecodeCache
from models.init import ParamInit, normal_init, ones_init
from models.layers.tensor_parallel import ColumnParallelLinear
from models.parallel_context import ParallelContext, resolve_context
from models.recompute import recomputed
from parallel_state.groups import AxisGroup
from parallel_state.params import mark_shard, set_param_meta

GLA_MODES = {"chunk": chunk_gla, "fused_recurrent": fused_recurrent_gla}


def gla_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, key width, value width) of the GLA layer of `cfg`."""
    heads = cfg.gla.num_heads if cfg.gla.num_heads is not None else cfg.num_heads
    return heads, int(cfg.hidden_size * cfg.gla.expand_k), int(cfg.hidden_size * cfg.gla.expand_v)


class GatedLinearAttention(nn.Module):
    """GLA token mixer: projections, a data-dependent per-channel decay, chunkwise recurrence,
    per-head RMSNorm with a swish output gate, output projection.

    Has no positional encoding (order comes from the recurrence), so ``position_ids`` is ignored:
    tokens must arrive in sequence order.

    Tensor parallel: heads are split over `tp` (see the module docstring); the size attributes
    (num_heads, key_dim, value_dim) describe the full layer, `heads_per_rank` this rank's part.
    """

    def __init__(self, cfg: ModelConfig, par: ParallelContext | None = None):
        super().__init__()
        tp = resolve_context(par).tp
        gla = cfg.gla
        self.hidden_size = cfg.hidden_size
        self.num_heads, self.key_dim, self.value_dim = gla_dims(cfg)
        self.heads_per_rank = self.num_heads // tp.size
        self.head_k_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads
        self.gate_logit_normalizer = gla.gate_logit_normalizer
        self.mode = gla.mode
        self.kernels = cfg.kernels
        self.norm_eps = cfg.norm_eps
        self.recompute_core = cfg.recompute == "selective"
        std, output_std = normal_init(cfg.init_std), normal_init(cfg.output_init_std())
        self.q_proj = tp.column(self.hidden_size, self.key_dim, std)
        self.k_proj = tp.column(self.hidden_size, self.key_dim, std)
        self.v_proj = tp.column(self.hidden_size, self.value_dim, std)
        self.g_proj = tp.column(self.hidden_size, self.value_dim, std)  # W_r of the output gate
        self.gk_proj = nn.Sequential(
            ColumnParallelLinear(self.hidden_size, gla.gate_low_rank_dim, AxisGroup.single("tp"), init=std),  # replicated W1
            tp.column(gla.gate_low_rank_dim, self.key_dim, std, bias=True),
        )
        if tp.size > 1:
            set_param_meta(self.gk_proj[0].weight, tp_partial_grad=True)
        self.g_norm_weight = mark_shard(nn.Parameter(torch.empty(self.heads_per_rank, self.head_v_dim)),
                                        0, tp.rank, tp.size)
        self.o_proj = tp.row(self.value_dim, self.hidden_size, output_std)

    def init_specs(self) -> dict[str, ParamInit]:
        """Every parameter's init (the projections' own specs, named from here, and the norm gain)."""
        specs = {"g_norm_weight": ones_init()}
        for name in ("q_proj", "k_proj", "v_proj", "g_proj", "gk_proj.0", "gk_proj.1", "o_proj"):
            layer_specs = self.get_submodule(name).init_specs()
            specs.update({f"{name}.{key}": init for key, init in layer_specs.items()})
        return specs

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: DecodeCache | None = None) -> torch.Tensor:
        """x [B, T, hidden] (under SP this rank's [B, T/tp, hidden]) -> same shape.

        position_ids is unused (see the class docstring). With `cache` (decoding, launch/generate.py)
        the recurrence starts from the cached state and leaves its final state there.
        """
        x = self.q_proj.prepare_input(x)  # one input collective for every projection
        batch, seq_len, _ = x.shape
        heads = self.heads_per_rank
        q = self.q_proj(x, input_prepared=True).view(batch, seq_len, heads, self.head_k_dim)
        k = self.k_proj(x, input_prepared=True).view(batch, seq_len, heads, self.head_k_dim)
        v = self.v_proj(x, input_prepared=True).view(batch, seq_len, heads, self.head_v_dim)
        gate_logits = self.gk_proj[1](self.gk_proj[0](x, input_prepared=True), input_prepared=True)
        # The gate is a log-decay summed over up to 64 steps per chunk: keep it in fp32 under autocast.
        gate = F.logsigmoid(gate_logits.float()) / self.gate_logit_normalizer
        gate = gate.view(batch, seq_len, heads, self.head_k_dim)
        initial_state = None if cache is None else cache.state
        if self.recompute_core and cache is None:  # model.recompute=selective (models/recompute.py)
            o = recomputed(lambda *qkvg: GLA_MODES[self.mode](*qkvg, kernels=self.kernels)[0], q, k, v, gate)
        else:
            o, final_state = GLA_MODES[self.mode](q, k, v, gate, kernels=self.kernels, initial_state=initial_state,
                                                  output_final_state=cache is not None)
        if cache is not None:
            cache.state = final_state
        o32 = o.float()
        o32 = o32 * torch.rsqrt(o32.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)
        o32 = o32 * self.g_norm_weight.float()
        output_gate = self.g_proj(x, input_prepared=True).view(batch, seq_len, heads, self.head_v_dim)
        o = o32.to(output_gate.dtype) * F.silu(output_gate)
        return self.o_proj(o.reshape(batch, seq_len, heads * self.head_v_dim))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3 x forward) of the chunkwise form (chunk 64, full chunk counted),
        of the full layer whatever the TP split.

        Forward = 2 x projection parameters + per head: scores 2*C*K and their product with v 2*C*V
        inside the chunk, plus the state readout and update 2*K*V each.
        """
        gate_rank = self.gk_proj[0].out_features
        projections = (2 * self.hidden_size * self.key_dim + 3 * self.hidden_size * self.value_dim
                       + self.hidden_size * gate_rank + gate_rank * self.key_dim)
        chunk = min(64, seq_len)
        per_head = 2.0 * chunk * (self.head_k_dim + self.head_v_dim) + 4.0 * self.head_k_dim * self.head_v_dim
        return 3.0 * (2.0 * projections + self.num_heads * per_head)

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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gla import chunk_gla, fused_recurrent_gla
from models.config import ModelConfig
from models.init import ParamInit, normal_init, ones_init, zeros_init

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
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        gla = cfg.gla
        self.hidden_size = cfg.hidden_size
        self.num_heads, self.key_dim, self.value_dim = gla_dims(cfg)
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(
                f"model.gla: key width {self.key_dim} and value width {self.value_dim} must be divisible "
                f"by the {self.num_heads} GLA heads; change model.gla.num_heads or expand_k/expand_v")
        if gla.mode not in GLA_MODES:
            raise ValueError(f"model.gla.mode={gla.mode!r}: unknown; use one of {', '.join(GLA_MODES)}")
        self.head_k_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads
        self.gate_logit_normalizer = gla.gate_logit_normalizer
        self.mode = gla.mode
        self.kernels = cfg.kernels
        self.norm_eps = cfg.norm_eps
        self.init_std = cfg.init_std
        self.output_init_std = cfg.output_init_std()
        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)  # W_r of the output gate
        self.gk_proj = nn.Sequential(
            nn.Linear(self.hidden_size, gla.gate_low_rank_dim, bias=False),
            nn.Linear(gla.gate_low_rank_dim, self.key_dim, bias=True),
        )
        self.g_norm_weight = nn.Parameter(torch.empty(self.num_heads, self.head_v_dim))
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)

    def init_specs(self) -> dict[str, ParamInit]:
        return {
            "q_proj.weight": normal_init(self.init_std),
            "k_proj.weight": normal_init(self.init_std),
            "v_proj.weight": normal_init(self.init_std),
            "g_proj.weight": normal_init(self.init_std),
            "gk_proj.0.weight": normal_init(self.init_std),
            "gk_proj.1.weight": normal_init(self.init_std),
            "gk_proj.1.bias": zeros_init(),
            "g_norm_weight": ones_init(),
            "o_proj.weight": normal_init(self.output_init_std),
        }

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; position_ids is unused (see the class docstring)."""
        batch, seq_len, _ = x.shape
        heads = self.num_heads
        q = self.q_proj(x).view(batch, seq_len, heads, self.head_k_dim)
        k = self.k_proj(x).view(batch, seq_len, heads, self.head_k_dim)
        v = self.v_proj(x).view(batch, seq_len, heads, self.head_v_dim)
        # The gate is a log-decay summed over up to 64 steps per chunk: keep it in fp32 under autocast.
        gate = F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer
        gate = gate.view(batch, seq_len, heads, self.head_k_dim)
        o, _ = GLA_MODES[self.mode](q, k, v, gate, kernels=self.kernels)
        o32 = o.float()
        o32 = o32 * torch.rsqrt(o32.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)
        o32 = o32 * self.g_norm_weight.float()
        output_gate = self.g_proj(x).view(batch, seq_len, heads, self.head_v_dim)
        o = o32.to(output_gate.dtype) * F.silu(output_gate)
        return self.o_proj(o.reshape(batch, seq_len, self.value_dim))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3 x forward) of the chunkwise form (chunk 64, full chunk counted).

        Forward = 2 x projection parameters + per head: scores 2*C*K and their product with v 2*C*V
        inside the chunk, plus the state readout and update 2*K*V each.
        """
        gate_rank = self.gk_proj[0].out_features
        projections = (2 * self.hidden_size * self.key_dim + 3 * self.hidden_size * self.value_dim
                       + self.hidden_size * gate_rank + gate_rank * self.key_dim)
        chunk = min(64, seq_len)
        per_head = 2.0 * chunk * (self.head_k_dim + self.head_v_dim) + 4.0 * self.head_k_dim * self.head_v_dim
        return 3.0 * (2.0 * projections + self.num_heads * per_head)

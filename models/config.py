"""Typed configuration of the decoder model.

Kept to the field types an OmegaConf structured config accepts (int, float, str, bool, Optional,
list of str) so that Hydra can compose it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kernels.dispatch import KernelsConfig
from moe.config import MoEConfig


@dataclass
class GLAConfig:
    """Gated linear attention token mixer (Yang et al. 2024; fla's GatedLinearAttention defaults)."""

    # Number of GLA heads; None means model.num_heads. Heads are independent (TP splits them).
    num_heads: int | None = None
    # Key/query width as a fraction of hidden_size (the paper's 0.5 halves the state size).
    expand_k: float = 0.5
    # Value width as a fraction of hidden_size.
    expand_v: float = 1.0
    # Rank of the low-rank gate projection x W1 W2 (the paper uses 16).
    gate_low_rank_dim: int = 16
    # g = logsigmoid(x W1 W2 + b) / gate_logit_normalizer; larger keeps decays closer to 1.
    gate_logit_normalizer: float = 16.0
    # Training kernel: "chunk" (chunkwise parallel) or "fused_recurrent" (step loop, slow).
    mode: str = "chunk"


@dataclass
class ParaRNNConfig:
    """ParaRNN token mixers ("pararnn_gru", "pararnn_lstm"): Newton + parallel-scan RNN layers."""

    # Width N of the recurrent state; None means hidden_size. Channels are independent (TP splits them).
    state_size: int | None = None
    # Newton updates per solve in fixed mode (newton_tol null); the paper uses 3.
    newton_iterations: int = 3
    # Adaptive mode when set: stop once max |residual| <= newton_tol.
    newton_tol: float | None = None
    # Most Newton updates in adaptive mode.
    newton_max_iterations: int = 20
    # Fixed mode: warn when the final max |residual| of a solve is above this.
    newton_warn_residual: float = 1e-3
    # How the layers run in training: "parallel" (Newton + scan) or "sequential" (the reference loop).
    mode: str = "parallel"
    # Fuse the torch solver's element-wise passes and scan with torch.compile: on CUDA, and on CPU
    # where the fused C kernels do not run (adaptive mode, kernels.backend=torch), 3-4x faster there.
    # Needs a C++ compiler on CPU. Missing support follows model.kernels.on_missing.
    compile: bool = False


@dataclass
class MLAConfig:
    """Multi-head latent attention token mixer "mla" (DeepSeek-V2/V3; docs/mla.md)."""

    # Width of the query latent c_q = RMSNorm(x W_DQ); 0: queries are projected from x directly.
    q_lora_rank: int = 0
    # Width of the key/value latent c = RMSNorm(x W_DKV): with the RoPE key, what a decoder caches.
    kv_lora_rank: int = 64
    # Per-head query/key width without position (k_nope = c W_UK^h).
    qk_nope_head_dim: int = 32
    # Per-head RoPE width of the queries, and width of the one RoPE key all heads share; even.
    qk_rope_head_dim: int = 16
    # Per-head value width (v = c W_UV^h).
    v_head_dim: int = 32


@dataclass
class RopeScalingConfig:
    """RoPE context extension (used by the mla token mixer; docs/mla.md, "YaRN")."""

    # None: plain RoPE; "yarn": YaRN frequency interpolation with DeepSeek's attention scales.
    type: str | None = None
    # Extension factor s: the model is meant to run at s x original_max_position_embeddings.
    factor: float = 1.0
    # cos and sin are multiplied by m(s, mscale) / m(s, mscale_all_dim), m(s, a) = 0.1 a ln(s) + 1.
    mscale: float = 1.0
    # The softmax scale is multiplied by m(s, mscale_all_dim)^2 (0 leaves it unchanged).
    mscale_all_dim: float = 0.0
    # Context length of the pretraining YaRN extends; required with type=yarn.
    original_max_position_embeddings: int | None = None
    # Frequencies turning more than beta_fast times over the original length keep their value ...
    beta_fast: float = 32.0
    # ... those turning fewer than beta_slow times are divided by factor; a linear ramp in between.
    beta_slow: float = 1.0


@dataclass
class ModelConfig:
    """Shape and initialisation of a Llama-style decoder.

    Layer ``i`` uses ``token_mixers[i % len(token_mixers)]`` and
    ``channel_mixers[i % len(channel_mixers)]`` (see ``models.spec.layer_specs``).
    """

    # Vocabulary size; None means the trainer fills it from the tokenizer before the model is built.
    vocab_size: int | None = None
    # Width of the residual stream.
    hidden_size: int = 256
    # Number of decoder layers in the whole model (all pipeline stages together).
    num_layers: int = 4
    # Number of query heads.
    num_heads: int = 4
    # Number of key/value heads; None means num_heads (MHA), fewer means grouped-query attention.
    num_kv_heads: int | None = None
    # Inner width of the MLP; None means the Llama rule int(8*hidden/3) rounded up to ffn_multiple_of.
    ffn_hidden_size: int | None = None
    # Rounding granule of the Llama rule for ffn_hidden_size.
    ffn_multiple_of: int = 64
    # Largest position the model is meant to see; validation rejects a longer data.seq_len.
    max_position_embeddings: int = 4096
    # RoPE base: frequency i is rope_theta ** (-2i / head_dim).
    rope_theta: float = 10000.0
    # Epsilon inside every RMSNorm.
    norm_eps: float = 1e-5
    # Share one matrix between the token embedding and the LM head.
    tie_embeddings: bool = False
    # Standard deviation of the normal initialisation of every matrix.
    init_std: float = 0.02
    # Megatron: output projections (wo, w2) use init_std / sqrt(2 * num_layers).
    scaled_output_init: bool = True
    # Dropout probability on each mixer's output before it joins the residual stream.
    dropout: float = 0.0
    # Dropout probability on the attention probabilities.
    attention_dropout: float = 0.0
    # Token mixer names, cycled over layers (e.g. [gla, gla, gla, attention] for a 3:1 hybrid).
    token_mixers: list[str] = field(default_factory=lambda: ["attention"])
    # Channel mixer names, cycled over layers. "moe" layers follow model.moe's placement
    # (first_k_dense_layers, moe_layer_freq): a layer the placement skips keeps a dense "mlp".
    channel_mixers: list[str] = field(default_factory=lambda: ["mlp"])
    # Residual pattern: "standard" (s_j = s_{j-1} + f_j(s_{j-1})) or "ladder" (s_j = s_{j-1} +
    # f_j(s_{j-2}): each mixer's TP reduction overlaps the next mixer's compute; docs/ladder.md).
    residual: str = "standard"
    # With residual=ladder: how many of the LAST layers use it (the others stay standard); None = all.
    ladder_layers: int | None = None
    # Global layer indices where the ladder completes its pending outputs and starts afresh, as it
    # does at the start of the ladder part. A pipeline stage that begins inside the ladder part must
    # begin at one of them (the activation between stages is one tensor; docs/ladder.md, "Pipelines").
    ladder_restarts: list[int] = field(default_factory=list)
    # Settings of the "gla" token mixer (used only by layers whose token mixer is gla).
    gla: GLAConfig = field(default_factory=GLAConfig)
    # Settings of the ParaRNN token mixers (used only by pararnn_gru / pararnn_lstm layers).
    pararnn: ParaRNNConfig = field(default_factory=ParaRNNConfig)
    # Settings of the "mla" token mixer (used only by layers whose token mixer is mla).
    mla: MLAConfig = field(default_factory=MLAConfig)
    # RoPE context extension (YaRN) of the mla layers.
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Router, experts and dispatcher of the "moe" channel mixer.
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Which implementation fused ops (GLA chunk, ParaRNN scan) use: auto = Triton on CUDA, torch elsewhere.
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    # Activation recomputation (Megatron's --recompute-granularity; docs/recompute.md): "none" keeps
    # every activation; "selective" recomputes each token mixer's core (attention/MLA: softmax(QK^T)V;
    # GLA: the chunk recurrence) in backward; "full" recomputes whole layers from their saved input.
    recompute: str = "none"
    # With recompute=full, which layers (Megatron's --recompute-method): "uniform" checkpoints every
    # layer of a stage in consecutive groups of recompute_layers; "block" checkpoints only the first
    # recompute_layers layers of each (virtual) pipeline stage and keeps the others' activations.
    recompute_method: str = "uniform"
    # With recompute=full: the group size (uniform) or the number of recomputed layers per stage (block);
    # at most the layers of the smallest (virtual) pipeline stage.
    recompute_layers: int = 1

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads after resolving the None default."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def output_init_std(self) -> float:
        """Init std of the projections that write into the residual stream (attention wo, MLP w2, ...).

        Megatron's scaled init divides by sqrt(2 * num_layers), the GLOBAL layer count, so every
        pipeline stage initialises identically.
        """
        return self.init_std / math.sqrt(2 * self.num_layers) if self.scaled_output_init else self.init_std

    def resolved_ffn_hidden_size(self) -> int:
        """MLP inner width: the explicit value, or the Llama rule."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        llama_width = int(8 * self.hidden_size / 3)
        multiple = self.ffn_multiple_of
        return multiple * ((llama_width + multiple - 1) // multiple)


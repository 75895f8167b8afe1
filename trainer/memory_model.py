"""How many bytes a rank holds in training, from the config alone (pure functions; docs/memory.md).

Activations: the bytes one attention + SwiGLU-MLP decoder layer saves for backward, derived from
the ops that actually run (models/layers: RMSNorm, RoPE, F.scaled_dot_product_attention, SwiGLU)
in the spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", sbh(34 + 5as/h) for GPT-3's block). With s tokens per sequence, b sequences per
microbatch, h hidden, a heads (d = h/a), f MLP width, t tensor-parallel ranks, e bytes per
activation element (4 fp32, 2 bf16/fp16), and no dropout:

    per layer, recompute=none  = 16 sbh'  + 8 sb'          two RMSNorms, fp32 inside: input, x*rstd, rstd
                                                           (+ 8h: fp32 copies of the gains when e < 4)
                               + 2 e sbh                   the two norm outputs the projections read
                               + 4 e sbh/t                 q (rotated), K and V expanded to a/t heads, output
                               + 4 sba/t                   softmax log-sum-exp (fp32)
                               + 8 sd                      RoPE cos/sin tables (fp32, shared by q and k)
                               + 4 e sbf/t                 SwiGLU: w1 out, silu(w1 out), w3 out, their product

where h' = h/t and b' = b/t under sequence parallelism (the norms, residual and dropout see 1/t of
the tokens), else h' = h, b' = b. The projections keep the all-gathered input (2 e sbh), not the
shard: foldtron does not re-gather it in backward as Korthikanti's SP analysis assumes.

The fused attention kernels (CPU flash attention, FlashAttention and memory-efficient attention on
GPUs) keep only the log-sum-exp per query and head, not the s x s probabilities, so the
5as^2b term of the paper's unfused attention is absent. It returns with attention dropout on CPU
(the math kernel) or with explicit position ids (context parallelism), where an s x s mask is kept.

    recompute=selective        the attention core is recomputed: K/V are kept unexpanded
                               (kv_t = K/V heads per rank) and the log-sum-exp is gone:
                               attention = 2 e sbh/t + 2 e sb kv_t d + 8 sd
    recompute=full             each checkpoint keeps its input, e sbh' (uniform: one per group
                               of recompute_layers layers; block: the first recompute_layers layers
                               of a stage, the others as recompute=none)
"""
from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from models.recompute import full_recompute_groups
from trainer.pipeline.orders import FORWARD, interleaved_1f1b_order

FP32 = 4


@dataclass(frozen=True)
class LayerShape:
    """What one rank's activation memory of a layer depends on."""

    seq_len: int  # tokens per sequence this rank's layer sees (after context parallelism)
    micro_batch: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    tp: int = 1
    sequence_parallel: bool = False
    element_bytes: int = FP32  # bytes of one activation element (the model's compute dtype)

    @classmethod
    def of(cls, cfg: ModelConfig, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
           element_bytes: int = FP32) -> LayerShape:
        return cls(seq_len, micro_batch, cfg.hidden_size, cfg.num_heads, cfg.kv_heads,
                   cfg.resolved_ffn_hidden_size(), tp, sequence_parallel and tp > 1, element_bytes)


def layer_activation_bytes(shape: LayerShape, recompute: str) -> int:
    """Bytes one attention + MLP layer saves for backward (module docstring) under `recompute`
    (none | selective | full; full: the layer is its own checkpoint)."""
    s, b, h, a, f, t, e = (shape.seq_len, shape.micro_batch, shape.hidden, shape.heads, shape.ffn, shape.tp,
                           shape.element_bytes)
    d = h // a
    sp_tokens = s * b // t if shape.sequence_parallel else s * b  # tokens of the residual stream on this rank
    if recompute == "full":
        return e * sp_tokens * h
    norms = 2 * (2 * FP32 * sp_tokens * h + FP32 * sp_tokens)
    if e != FP32:  # each norm multiplies by an fp32 copy of its gain
        norms += 2 * FP32 * h
    projection_inputs = 2 * e * s * b * h
    rope = 2 * FP32 * s * d
    # K/V heads per rank; with fewer K/V heads than ranks every rank computes all of them (V is kept
    # as that projection's output) and rotates only the one its query heads read (K).
    split = shape.kv_heads % t == 0
    v_heads = shape.kv_heads // t if split else shape.kv_heads
    k_heads = v_heads if split else 1
    q_heads = a // t
    if recompute == "selective":
        attention = e * s * b * d * (2 * q_heads + k_heads + v_heads) + rope
    elif recompute == "none":
        # SDPA keeps K and V expanded to the query heads (no expansion when there is one K/V head per query head).
        v_kept = q_heads if q_heads > k_heads else v_heads
        attention = e * s * b * d * (3 * q_heads + v_kept) + FP32 * s * b * q_heads + rope
    else:
        raise ValueError(f"recompute={recompute!r}: one of none, selective, full")
    mlp = 4 * e * s * b * f // t
    return norms + projection_inputs + attention + mlp


def head_activation_bytes(shape: LayerShape, vocab: int) -> int:
    """Bytes the final RMSNorm, the LM head and the loss save for backward, with the token ids and
    labels (int64): the norm as in a layer, the head's (gathered) input, and fp32 logits of this
    rank's vocabulary slice (`vocab`: padded to a multiple of tp), which the loss upcasts and keeps."""
    s, b, h, t, e = shape.seq_len, shape.micro_batch, shape.hidden, shape.tp, shape.element_bytes
    sp_tokens = s * b // t if shape.sequence_parallel else s * b
    norm = 2 * FP32 * sp_tokens * h + FP32 * sp_tokens + (FP32 * h if e != FP32 else 0)
    return norm + e * s * b * h + FP32 * s * b * vocab // t + 2 * 8 * s * b


def stage_activation_bytes(shape: LayerShape, layers: int, recompute: str, method: str = "uniform",
                           recompute_layers: int = 1) -> int:
    """Bytes the `layers` layers of one (virtual) pipeline stage save for one microbatch."""
    if recompute != "full":
        return layers * layer_activation_bytes(shape, recompute)
    groups = full_recompute_groups(layers, method, recompute_layers)
    kept = layers - sum(len(g) for g in groups)
    return len(groups) * layer_activation_bytes(shape, "full") + kept * layer_activation_bytes(shape, "none")


def in_flight_microbatches(pp: int, pp_rank: int, vpp: int, num_microbatches: int) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak, in units of one stage's layers.

    Read off the order the rank runs (trainer/pipeline/orders.py): the most chunk-forwards whose
    backward has not run yet, over vpp (each chunk holds 1/vpp of the rank's layers). 1F1B gives
    min(pp - r, M); interleaving gives Megatron's warm-up (pp - r - 1) * 2 + (vpp - 1) * pp plus the
    first steady-state forward. Without pipelining: one microbatch.
    """
    if pp == 1:
        return 1.0
    held = peak = 0
    for kind, _, _ in interleaved_1f1b_order(pp, vpp, num_microbatches, pp_rank):
        held += 1 if kind == FORWARD else -1
        peak = max(peak, held)
    return peak / vpp


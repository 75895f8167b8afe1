"""Typed configuration of a mixture-of-experts channel mixer (the `model.moe.*` group).

Field types stay within what an OmegaConf structured config accepts (int, float, str, bool,
Optional) so that Hydra can compose it directly. `check` holds every `model.moe.*` rule; it runs
once before anything is built, and the MoE layers trust a checked config.
"""
from __future__ import annotations

from dataclasses import dataclass

from parallel_state.errors import ConfigError
from parallel_state.topology import Topology

SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
DISPATCHERS = ("alltoall", "allgather")
ROUTERS = ("topk", "blockffn")
GROUPED_GEMM_MODES = ("auto", "grouped_mm", "loop")
PREFIX = "model.moe"


@dataclass
class MoEConfig:
    """Router, dispatcher, experts and placement of the MoE layers of a decoder."""

    # Number of routed experts E (all layers alike). Must be divisible by parallel.ep.
    num_experts: int = 8
    # Experts chosen per token (k). Ignored by the BlockFFN router, which has no top-k.
    topk: int = 2
    # Router score function: "softmax" over all experts, or "sigmoid" per expert (chosen weights
    # renormalised to sum to 1 over the k choices).
    score_function: str = "softmax"
    # Softmax router only: choose the top-k logits first, then softmax over those k (Mixtral);
    # False: softmax over all experts, then top-k of the probabilities, used unnormalised.
    topk_then_softmax: bool = False
    # Group-limited routing (DeepSeek-V3): experts split into n_group contiguous groups; None: off.
    n_group: int | None = None
    # Groups kept per token when n_group is set (by the sum of each group's top-2 scores).
    topk_group: int | None = None
    # Switch-Transformer load-balancing loss coefficient: coeff * E * sum_e f_e * P_e per layer.
    aux_loss_coeff: float = 0.0
    # Sequence-level balancing loss coefficient: the same formula per sequence, then averaged.
    seq_aux_loss_coeff: float = 0.0
    # Router z-loss coefficient: coeff * mean(logsumexp(logits)^2).
    z_loss_coeff: float = 0.0
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert selection bias moved by
    # +-rate * sign(mean load - load) once per global batch. 0 turns it off. Sigmoid router only.
    aux_free_bias_rate: float = 0.0
    # Capacity factor: each rank keeps at most ceil(tokens * k / E * capacity_factor) token-slots
    # per expert and drops the rest. None: dropless (every slot computed).
    capacity_factor: float | None = None
    # Which over-capacity slots are dropped: "probs" (lowest routing weight) or "position"
    # (latest token in the rank's token order).
    drop_policy: str = "probs"
    # With a capacity factor: pad every expert's slots to exactly the capacity (static shapes).
    pad_to_capacity: bool = False
    # Token dispatcher: "alltoall" (variable-size all-to-all over EP) or "allgather" (gather every
    # token over ETP x EP, each rank computes its experts, reduce-scatter back).
    dispatcher: str = "alltoall"
    # Inner width of each routed expert's SwiGLU.
    ffn_hidden_size: int = 128
    # Shared experts (always active): 0 for none; their SwiGLU has num_shared * shared width.
    num_shared_experts: int = 0
    # Inner width of one shared expert; None means ffn_hidden_size.
    shared_ffn_hidden_size: int | None = None
    # Router kind: "topk" (scores + top-k) or "blockffn" (ReLU then RMSNorm, no top-k).
    router: str = "topk"
    # Expert GEMMs: "auto" (torch._grouped_mm on CUDA where dtype/shapes allow, else a loop),
    # "grouped_mm" (fail if unsupported; CPU fp32 works), "loop" (one matmul per expert, the reference).
    grouped_gemm: str = "auto"
    # MoE layer placement: layer i (global, 0-based) is MoE when i >= first_k_dense_layers and
    # (i - first_k_dense_layers) % moe_layer_freq == 0.
    moe_layer_freq: int = 1
    # Leading layers that keep a dense MLP (DeepSeek uses 1-3).
    first_k_dense_layers: int = 0

    def resolved_shared_ffn_hidden_size(self) -> int:
        """Total inner width of the shared-expert SwiGLU (0 when there are none)."""
        width = self.ffn_hidden_size if self.shared_ffn_hidden_size is None else self.shared_ffn_hidden_size
        return self.num_shared_experts * width

    def experts_per_token(self) -> int:
        """Slots per token the router may fill: k, or every expert for BlockFFN."""
        return self.num_experts if self.router == "blockffn" else self.topk

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether global layer `layer_index` uses the MoE channel mixer (placement rule above)."""
        offset = layer_index - self.first_k_dense_layers
        return offset >= 0 and offset % self.moe_layer_freq == 0


def check(cfg: MoEConfig, topology: Topology, sequence_parallel: bool = False,
          micro_batch_size: int | None = None, seq_len: int | None = None) -> None:
    """Raise ConfigError on the first bad `model.moe.*` value for this layout.

    With `micro_batch_size` and `seq_len` (data.*), a microbatch's tokens on one CP rank are checked
    against tp when they are TP-replicated (no sequence parallelism): each TP rank routes 1/tp of them.
    """
    ep, etp = topology.ep, topology.etp

    def fail(field: str, value, problem: str, fix: str) -> None:
        raise ConfigError(f"{PREFIX}.{field}", value, problem, fix)

    for name, allowed in (("score_function", SCORE_FUNCTIONS), ("drop_policy", DROP_POLICIES),
                          ("dispatcher", DISPATCHERS), ("router", ROUTERS),
                          ("grouped_gemm", GROUPED_GEMM_MODES)):
        if getattr(cfg, name) not in allowed:
            fail(name, getattr(cfg, name), "unknown option", f"use one of {', '.join(allowed)}")
    for name in ("num_experts", "topk", "ffn_hidden_size", "moe_layer_freq"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            fail(name, value, "must be a positive integer", f"set {PREFIX}.{name} >= 1")
    for name in ("num_shared_experts", "first_k_dense_layers"):
        if getattr(cfg, name) < 0:
            fail(name, getattr(cfg, name), "must be >= 0", f"set {PREFIX}.{name} >= 0")
    for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff", "aux_free_bias_rate"):
        if getattr(cfg, name) < 0:
            fail(name, getattr(cfg, name), "must be >= 0", f"set {PREFIX}.{name} >= 0 (0 turns it off)")
    if cfg.num_experts % ep:
        fail("num_experts", cfg.num_experts, f"not divisible by parallel.ep={ep}",
             f"use a multiple of {ep} experts or an ep that divides {cfg.num_experts}")
    if cfg.ffn_hidden_size % etp:
        fail("ffn_hidden_size", cfg.ffn_hidden_size, f"not divisible by parallel.etp={etp}",
             f"use a multiple of {etp}")
    if cfg.router == "topk" and cfg.topk > cfg.num_experts:
        fail("topk", cfg.topk, f"more than num_experts={cfg.num_experts}",
             f"choose topk <= {cfg.num_experts}")
    if cfg.topk_then_softmax and cfg.score_function != "softmax":
        fail("topk_then_softmax", True, f"only meaningful with score_function='softmax' (got "
             f"{cfg.score_function!r}; sigmoid weights are always renormalised)",
             "set topk_then_softmax=false")
    if (cfg.n_group is None) != (cfg.topk_group is None):
        fail("topk_group" if cfg.n_group is not None else "n_group",
             cfg.topk_group if cfg.n_group is not None else cfg.n_group,
             "n_group and topk_group must be set together", "set both or leave both null")
    if cfg.n_group is not None:
        if cfg.n_group < 1 or cfg.num_experts % cfg.n_group:
            fail("n_group", cfg.n_group, f"must be a positive divisor of num_experts={cfg.num_experts}",
                 f"use a divisor of {cfg.num_experts}")
        if not 1 <= cfg.topk_group <= cfg.n_group:
            fail("topk_group", cfg.topk_group, f"must be in [1, n_group={cfg.n_group}]",
                 f"choose topk_group <= {cfg.n_group}")
        if cfg.topk > cfg.topk_group * (cfg.num_experts // cfg.n_group):
            fail("topk", cfg.topk, f"more than the {cfg.topk_group} kept groups of "
                 f"{cfg.num_experts // cfg.n_group} experts hold",
                 "raise topk_group or lower topk")
    if cfg.aux_free_bias_rate > 0 and cfg.score_function != "sigmoid":
        fail("aux_free_bias_rate", cfg.aux_free_bias_rate, "aux-loss-free balancing needs "
             f"score_function='sigmoid' (got {cfg.score_function!r}): a selection bias on softmax "
             "probabilities is not the DeepSeek-V3 method", "set score_function=sigmoid or the rate to 0")
    if cfg.capacity_factor is not None and cfg.capacity_factor <= 0:
        fail("capacity_factor", cfg.capacity_factor, "must be positive", "use e.g. 1.25, or null for dropless")
    if cfg.pad_to_capacity and cfg.capacity_factor is None:
        fail("pad_to_capacity", True, "padding needs a capacity", "set capacity_factor or pad_to_capacity=false")
    if cfg.router == "blockffn":
        for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "aux_free_bias_rate"):
            if getattr(cfg, name) > 0:
                fail(name, getattr(cfg, name), "the BlockFFN router has no top-k to balance",
                     f"set {PREFIX}.{name}=0 (z_loss_coeff is allowed)")
        if cfg.n_group is not None:
            fail("n_group", cfg.n_group, "group-limited routing needs the top-k router",
                 "leave n_group null with router=blockffn")
    tp = topology.tp
    shared = cfg.resolved_shared_ffn_hidden_size()
    if tp > 1 and shared and shared % tp:
        field = "shared_ffn_hidden_size" if cfg.shared_ffn_hidden_size is not None else "ffn_hidden_size"
        fail(field, getattr(cfg, field), f"gives shared experts of width {cfg.num_shared_experts} x "
             f"{shared // cfg.num_shared_experts} = {shared}, not divisible by parallel.tp={tp} (the shared "
             "experts are split over TP like the dense MLP)", f"use a per-expert width whose total is a multiple of {tp}")
    if tp > 1 and not sequence_parallel and micro_batch_size is not None and seq_len is not None:
        tokens = micro_batch_size * seq_len // topology.cp
        if tokens % tp:
            raise ConfigError("data.micro_batch_size", micro_batch_size,
                              f"a microbatch's {tokens} tokens per CP rank do not split over parallel.tp={tp} "
                              "(without sequence parallelism each TP rank routes 1/tp of them)",
                              "use parallel.sequence_parallel=true, or a micro batch size whose tokens divide by tp")

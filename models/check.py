"""The `model.*` rules, checked once before anything is built (layers trust a checked config).

`check(model, parallel, topology)` covers the model's own shape rules, the mixer names and
settings, and what the layout asks of the model: widths that tensor parallelism splits, the token
mixers context parallelism supports, and the layer split over pipeline stages. Rules on
`model.moe` are moe's (`moe.check`); rules that involve the data (sequence length) are the data's.
"""
from __future__ import annotations

from kernels.dispatch import BACKENDS as KERNEL_BACKENDS
from kernels.dispatch import ON_MISSING as KERNEL_ON_MISSING
from models.config import ModelConfig
from models.layers.gla import GLA_MODES
from models.mixers import CHANNEL_MIXERS, TOKEN_MIXERS
from models.recompute import RECOMPUTE_METHODS, RECOMPUTE_MODES
from models.spec import RESIDUALS, first_ladder_layer, layer_specs
from parallel_state import ParallelConfig, Topology
from parallel_state.errors import require, require_choice, require_divisible, require_positive

PARARNN_MODES = ("parallel", "sequential")


def check(model: ModelConfig, parallel: ParallelConfig, topology: Topology) -> None:
    """Raise ConfigError on the first bad `model.*` value for this layout."""
    _check_shapes(model)
    _check_mixer_names(model)
    require_choice("model.kernels.backend", model.kernels.backend, KERNEL_BACKENDS)
    require_choice("model.kernels.on_missing", model.kernels.on_missing, KERNEL_ON_MISSING)
    if "gla" in model.token_mixers:
        _check_gla(model)
    if any(name.startswith("pararnn") for name in model.token_mixers):
        _check_pararnn(model)
    if "mla" in model.token_mixers:
        _check_mla(model)
    _check_rope_scaling(model)
    _check_recompute(model, parallel, topology)
    if topology.tp > 1:
        _check_tensor_parallel(model, topology.tp)
    if topology.cp > 1:
        _check_context_parallel(model, parallel, topology)
    if topology.pp > 1:
        _check_pipeline_split(model, parallel)
        _check_ladder_stages(model, parallel)


def _check_shapes(m: ModelConfig) -> None:
    for name in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings", "ffn_multiple_of"):
        require_positive(f"model.{name}", getattr(m, name))
    require(m.hidden_size % m.num_heads == 0, "model.hidden_size", m.hidden_size,
            f"not divisible by model.num_heads={m.num_heads}",
            f"choose a hidden size that is a multiple of {m.num_heads}, or change model.num_heads")
    kv = m.num_kv_heads if m.num_kv_heads is not None else m.num_heads
    require(0 < kv <= m.num_heads and m.num_heads % kv == 0, "model.num_kv_heads", m.num_kv_heads,
            f"model.num_heads={m.num_heads} must be a multiple of it (GQA groups)",
            f"use a divisor of {m.num_heads}, or null for multi-head attention")
    require(m.head_dim % 2 == 0, "model.num_heads", m.num_heads,
            f"gives an odd head dim {m.head_dim}, which RoPE cannot rotate in pairs",
            "pick num_heads so that hidden_size / num_heads is even")
    if m.vocab_size is not None:
        require_positive("model.vocab_size", m.vocab_size)
    if m.ffn_hidden_size is not None:
        require_positive("model.ffn_hidden_size", m.ffn_hidden_size)
    for name in ("dropout", "attention_dropout"):
        value = getattr(m, name)
        require(0.0 <= value < 1.0, f"model.{name}", value, "must lie in [0, 1)", "use e.g. 0.0 or 0.1")
    require_positive("model.init_std", m.init_std)


def _check_mixer_names(m: ModelConfig) -> None:
    for field, names, known in (("model.token_mixers", m.token_mixers, TOKEN_MIXERS),
                                ("model.channel_mixers", m.channel_mixers, CHANNEL_MIXERS)):
        require(len(names) > 0, field, names, "is empty", f"list at least one of {list(known)}")
        for name in names:
            require(name in known, field, names, f"'{name}' is not an available layer", f"use only {list(known)}")
    require_choice("model.residual", m.residual, RESIDUALS)
    _check_ladder(m)


def _check_ladder(m: ModelConfig) -> None:
    """model.ladder_layers counts layers of the model; restarts are layer indices (docs/ladder.md)."""
    if m.ladder_layers is not None:
        require(0 <= m.ladder_layers <= m.num_layers, "model.ladder_layers", m.ladder_layers,
                f"must lie in [0, model.num_layers={m.num_layers}] (how many of the last layers use the ladder residual)",
                f"use a count up to {m.num_layers}, or null for all layers")
        require(m.residual == "ladder" or m.ladder_layers == 0, "model.ladder_layers", m.ladder_layers,
                f"is set but model.residual={m.residual!r}", "set model.residual=ladder, or ladder_layers=null")
    bad = [i for i in m.ladder_restarts if not 0 <= i < m.num_layers]
    require(not bad, "model.ladder_restarts", list(m.ladder_restarts),
            f"{bad} are not layer indices of a {m.num_layers}-layer model", f"list indices in [0, {m.num_layers})")
    if m.residual == "ladder":
        require(m.dropout == 0.0, "model.dropout", m.dropout, "is not implemented with model.residual=ladder",
                "set model.dropout=0")


def gla_heads(m: ModelConfig) -> tuple[int, str]:
    """(number of GLA heads, the field that sets it)."""
    if m.gla.num_heads is not None:
        return m.gla.num_heads, "model.gla.num_heads"
    return m.num_heads, "model.num_heads (model.gla.num_heads=null)"


def _check_gla(m: ModelConfig) -> None:
    g = m.gla
    heads, _ = gla_heads(m)
    require_positive("model.gla.num_heads", heads)
    for name in ("expand_k", "expand_v", "gate_logit_normalizer", "gate_low_rank_dim"):
        require_positive(f"model.gla.{name}", getattr(g, name))
    for name in ("expand_k", "expand_v"):
        width = int(m.hidden_size * getattr(g, name))
        require(width % heads == 0, f"model.gla.{name}", getattr(g, name),
                f"gives a width of {width} (hidden_size {m.hidden_size} x {getattr(g, name)}), "
                f"not divisible by the {heads} GLA heads",
                "choose model.gla.num_heads dividing it, or another expand factor")
    require_choice("model.gla.mode", g.mode, tuple(GLA_MODES))


def pararnn_state(m: ModelConfig) -> tuple[int, str]:
    """(ParaRNN state width N, the field that sets it)."""
    if m.pararnn.state_size is not None:
        return m.pararnn.state_size, "model.pararnn.state_size"
    return m.hidden_size, "model.pararnn.state_size (null: model.hidden_size)"


def _check_pararnn(m: ModelConfig) -> None:
    p = m.pararnn
    if p.state_size is not None:
        require_positive("model.pararnn.state_size", p.state_size)
    require(p.newton_iterations >= 1, "model.pararnn.newton_iterations", p.newton_iterations,
            "must be at least 1 (0 leaves the initial guess, whose gradient is not the RNN's)",
            "use 3 (the paper's default)")
    if p.newton_tol is not None:
        require_positive("model.pararnn.newton_tol", p.newton_tol)
    require(p.newton_max_iterations >= 1, "model.pararnn.newton_max_iterations", p.newton_max_iterations,
            "must be at least 1", "use e.g. 20")
    require_positive("model.pararnn.newton_warn_residual", p.newton_warn_residual)
    require_choice("model.pararnn.mode", p.mode, PARARNN_MODES)


def _check_mla(m: ModelConfig) -> None:
    a = m.mla
    require(a.q_lora_rank >= 0, "model.mla.q_lora_rank", a.q_lora_rank, "must be >= 0",
            "use 0 to project queries from the hidden state directly, or a positive rank")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        require_positive(f"model.mla.{name}", getattr(a, name))
    require(a.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim", a.qk_rope_head_dim,
            "is odd: RoPE rotates channels in pairs", f"use an even width such as {a.qk_rope_head_dim + 1}")


def _check_rope_scaling(m: ModelConfig) -> None:
    """model.rope_scaling: plain RoPE (type null) or YaRN with its original length, on mla layers."""
    r = m.rope_scaling
    require_choice("model.rope_scaling.type", r.type, (None, "yarn"))
    if r.type is None:
        return
    require(r.original_max_position_embeddings is not None, "model.rope_scaling.original_max_position_embeddings",
            r.original_max_position_embeddings, "YaRN needs the context length of the pretraining it extends",
            "set it (e.g. 4096 for DeepSeek-V3), or model.rope_scaling.type=null")
    require_positive("model.rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings)
    require(r.factor >= 1.0, "model.rope_scaling.factor", r.factor, "must be >= 1 (an extension factor)",
            "use e.g. max_position_embeddings / original_max_position_embeddings")
    require(r.beta_fast > r.beta_slow > 0, "model.rope_scaling.beta_fast", r.beta_fast,
            f"must exceed model.rope_scaling.beta_slow={r.beta_slow} > 0", "use 32 and 1 (the YaRN defaults)")
    others = sorted(set(m.token_mixers) - {"mla"})
    require("attention" not in others, "model.rope_scaling.type", r.type,
            "is implemented for the mla token mixer; attention layers rotate with plain RoPE",
            "set model.rope_scaling.type=null, or use model.token_mixers=[mla]")


def _check_tensor_parallel(m: ModelConfig, tp: int) -> None:
    """Every width TP splits divides by tp (the vocabulary is padded instead, see vocab_parallel)."""
    require_divisible(m.hidden_size, tp, "model.hidden_size", "the hidden size", "parallel.tp",
                      f"choose a tp dividing {m.hidden_size}, or a hidden size that is a multiple of {tp}")
    require_divisible(m.num_heads, tp, "model.num_heads", "the number of attention heads (split over TP)",
                      "parallel.tp", f"choose a tp dividing {m.num_heads}")
    kv = m.kv_heads
    require(kv % tp == 0 or tp % kv == 0, "model.num_kv_heads", kv,
            f"neither divides nor is a multiple of parallel.tp={tp} (K/V heads are split over TP ranks, "
            "or replicated when there are fewer of them than ranks)",
            f"choose a tp dividing {kv} or a multiple of it")
    # Dense MLP layers, including those a MoE model keeps (first_k_dense_layers, moe_layer_freq).
    if any(spec.channel_mixer == "mlp" for spec in layer_specs(m)):
        what = "the MLP inner width" + ("" if "mlp" in m.channel_mixers else " (the dense layers of the MoE model)")
        require_divisible(m.resolved_ffn_hidden_size(), tp, "model.ffn_hidden_size", what, "parallel.tp",
                          f"set model.ffn_hidden_size to a multiple of {tp}")
    if "gla" in m.token_mixers:
        heads, field = gla_heads(m)
        require_divisible(heads, tp, field, "the number of GLA heads (split over TP)", "parallel.tp",
                          f"choose a number of GLA heads that is a multiple of {tp}, or a tp dividing {heads}")
    if any(name.startswith("pararnn") for name in m.token_mixers):
        state, field = pararnn_state(m)
        require_divisible(state, tp, field, "the ParaRNN state width (its channels are split over TP)",
                          "parallel.tp", f"choose a state_size that is a multiple of {tp}, or a tp dividing {state}")


def _check_context_parallel(m: ModelConfig, p: ParallelConfig, topology: Topology) -> None:
    """Softmax-attention token mixers only (attention, mla), and the head split of the all-to-all variant."""
    cp, tp = topology.cp, topology.tp
    others = sorted(set(m.token_mixers) - {"attention", "mla"})
    require(not others, "model.token_mixers", list(m.token_mixers),
            f"{', '.join(others)} with parallel.cp={cp}: context parallelism is implemented for attention only "
            "(the attention and mla mixers; a recurrence would need its state passed between CP ranks)",
            "set parallel.cp=1 for these mixers")
    require(m.attention_dropout == 0.0, "model.attention_dropout", m.attention_dropout,
            f"not supported with parallel.cp={cp} (the ring and all-to-all kernels have no dropout)",
            "set model.attention_dropout=0")
    if p.cp_comm == "a2a":
        heads, kv = m.num_heads // tp, max(m.kv_heads // tp, 1)
        require(heads % cp == 0, "model.num_heads", m.num_heads,
                f"{heads} query heads per TP rank do not split over parallel.cp={cp} (parallel.cp_comm=a2a)",
                "choose heads / tp divisible by cp, or parallel.cp_comm=ring")
        # MLA expands K/V per query head: the query-head rule covers it.
        require("attention" not in m.token_mixers or kv % cp == 0 or cp % kv == 0, "model.num_kv_heads",
                m.kv_heads, f"{kv} K/V heads per TP rank and parallel.cp={cp}: one must divide the other (a2a)",
                "change model.num_kv_heads, or parallel.cp_comm=ring")


def _check_pipeline_split(m: ModelConfig, p: ParallelConfig) -> None:
    """The layers split over the pp * vpp virtual stages, evenly or as parallel.pipeline_layers says."""
    stages = p.pp * p.vpp
    if p.pipeline_layers is None:
        require(m.num_layers % stages == 0, "model.num_layers", m.num_layers,
                f"does not split evenly over parallel.pp * parallel.vpp = {stages} virtual stages",
                f"use a multiple of {stages} layers, or list the layers of each virtual stage in "
                "parallel.pipeline_layers")
        return
    counts = list(p.pipeline_layers)
    require(len(counts) == stages and sum(counts) == m.num_layers and min(counts) >= 0,
            "parallel.pipeline_layers", counts,
            f"needs pp * vpp = {stages} non-negative counts summing to model.num_layers={m.num_layers}",
            f"list {stages} layer counts in virtual-stage order (stage c*pp + r is chunk c of pp rank r)")


def _check_ladder_stages(m: ModelConfig, p: ParallelConfig) -> None:
    """Every virtual stage that starts inside the ladder part starts at a ladder restart: the activation
    between stages is one complete tensor, which is where a ladder run ends (docs/ladder.md, "Pipelines")."""
    first = first_ladder_layer(m)
    stages = p.pp * p.vpp
    counts = list(p.pipeline_layers) if p.pipeline_layers is not None else [m.num_layers // stages] * stages
    starts = [sum(counts[:s]) for s in range(1, stages) if counts[s] > 0]
    inside = sorted({i for i in starts if first < i < m.num_layers} - set(m.ladder_restarts))
    require(not inside, "model.ladder_restarts", list(m.ladder_restarts),
            f"pipeline stages start at layers {inside} inside the ladder part (layers {first}..), where a ladder "
            "run cannot continue across a stage boundary", f"add {inside} to model.ladder_restarts")


def stage_layer_counts(m: ModelConfig, p: ParallelConfig) -> list[int]:
    """Layers of each (virtual) pipeline stage, in virtual-stage order (one entry without pipelining)."""
    stages = p.pp * p.vpp
    if p.pipeline_layers is not None:
        return list(p.pipeline_layers)
    return [m.num_layers // stages] * stages


def _check_recompute(m: ModelConfig, p: ParallelConfig, topology: Topology) -> None:
    """model.recompute* (docs/recompute.md): the mode and method names, and recompute_layers within a stage."""
    require_choice("model.recompute", m.recompute, RECOMPUTE_MODES)
    require_choice("model.recompute_method", m.recompute_method, RECOMPUTE_METHODS)
    require(m.recompute_layers >= 1, "model.recompute_layers", m.recompute_layers, "must be >= 1",
            "use 1 (uniform: every layer its own checkpoint) or the number of layers to recompute per stage")
    if m.recompute != "full":
        return
    require(m.residual != "ladder", "model.recompute", m.recompute,
            "full recompute of ladder-residual layers is not implemented (a ladder run spans several layers "
            "with reductions in flight between them)", "use model.recompute=selective, or model.residual=standard")
    counts = [c for c in stage_layer_counts(m, p) if c > 0] if topology.pp > 1 else [m.num_layers]
    smallest = min(counts)
    where = (f"the model's {smallest} layers" if topology.pp == 1 else
             f"the smallest of the {len(counts)} (virtual) pipeline stages, which holds {smallest} layers")
    require(m.recompute_layers <= smallest, "model.recompute_layers", m.recompute_layers,
            f"exceeds {where} (recompute_method={m.recompute_method} counts layers per stage)",
            f"use at most {smallest}, e.g. model.recompute_layers={smallest}")

"""Cross-field config rules, checked before any model, data or process group is built.

Every rule is a pure function of the typed config and the world size. A violation raises one
ConfigError that names the field, its value and a fix; rules run in a fixed order so the first
problem a user meets is always the same one.
"""
from __future__ import annotations

import os
from typing import Any

from kernels.dispatch import BACKENDS as KERNEL_BACKENDS
from kernels.dispatch import ON_MISSING as KERNEL_ON_MISSING
from models.layers.gla import GLA_MODES
from models.spec import CHANNEL_MIXERS, RESIDUALS, TOKEN_MIXERS
from moe.config import MoEConfigError
from optim.config import OPTIMIZER_NAMES, SCHEDULE_NAMES, WSD_DECAY_SHAPES
from parallel_state.topology import Topology, TopologyError
from trainer.checkpoint import list_checkpoints
from trainer.config import Config
from trainer.data.config import SOURCES as DATA_SOURCES
from trainer.data.corpus import resolve_paths
from trainer.schedules import check_interleaved

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("stop", "skip")
LOGGER_BACKENDS = ("none", "wandb", "tensorboard")
WANDB_MODES = ("online", "offline", "disabled")
CP_COMMS = ("ring", "a2a")


class ConfigError(ValueError):
    """A config value that cannot work, with the field, the value and how to fix it."""

    def __init__(self, field: str, value: Any, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")


def _require(ok: bool, field: str, value: Any, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(field, value, problem, fix)


def _choice(field: str, value: Any, choices: tuple) -> None:
    _require(value in choices, field, value, f"must be one of {list(choices)}",
             f"set {field} to one of {', '.join(map(str, choices))}")


def _positive(field: str, value: float) -> None:
    _require(value > 0, field, value, "must be positive", f"set {field} to a value > 0")


def topology(cfg: Config, world_size: int) -> Topology:
    """The rank layout of `parallel.*` on `world_size` ranks, its errors as ConfigErrors."""
    try:
        return Topology.from_config(cfg.parallel, world_size)
    except TopologyError as e:
        raise ConfigError(e.field, e.value, e.problem, e.fix) from e


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check every cross-field rule for a run on `world_size` ranks; raise ConfigError on the first."""
    _validate_model(cfg)
    _validate_parallel(cfg, world_size)
    _validate_data(cfg, world_size)
    _validate_trainer(cfg)
    _validate_optim(cfg)
    _validate_logger(cfg)


def _validate_model(cfg: Config) -> None:
    m = cfg.model
    for name in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
        _positive(f"model.{name}", getattr(m, name))
    _require(m.hidden_size % m.num_heads == 0, "model.hidden_size", m.hidden_size,
             f"not divisible by model.num_heads={m.num_heads}",
             f"choose a hidden size that is a multiple of {m.num_heads}, or change model.num_heads")
    kv = m.num_kv_heads if m.num_kv_heads is not None else m.num_heads
    _require(0 < kv <= m.num_heads and m.num_heads % kv == 0, "model.num_kv_heads", m.num_kv_heads,
             f"model.num_heads={m.num_heads} must be a multiple of it (GQA groups)",
             f"use a divisor of {m.num_heads}, or null for multi-head attention")
    head_dim = m.hidden_size // m.num_heads
    _require(head_dim % 2 == 0, "model.num_heads", m.num_heads,
             f"gives an odd head dim {head_dim}, which RoPE cannot rotate in pairs",
             "pick num_heads so that hidden_size / num_heads is even")
    if m.vocab_size is not None:
        _positive("model.vocab_size", m.vocab_size)
    if m.ffn_hidden_size is not None:
        _positive("model.ffn_hidden_size", m.ffn_hidden_size)
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must lie in [0, 1)", "use e.g. 0.0 or 0.1")
    _require(0.0 <= m.attention_dropout < 1.0, "model.attention_dropout", m.attention_dropout,
             "must lie in [0, 1)", "use e.g. 0.0 or 0.1")
    _positive("model.init_std", m.init_std)
    for field_name, names, known in (("model.token_mixers", m.token_mixers, TOKEN_MIXERS),
                                     ("model.channel_mixers", m.channel_mixers, CHANNEL_MIXERS)):
        _require(len(names) > 0, field_name, names, "is empty", f"list at least one of {list(known)}")
        for name in names:
            _require(name in known, field_name, names, f"'{name}' is not an available layer",
                     f"use only {list(known)}")
    _choice("model.residual", m.residual, RESIDUALS)
    _choice("model.kernels.backend", m.kernels.backend, KERNEL_BACKENDS)
    _choice("model.kernels.on_missing", m.kernels.on_missing, KERNEL_ON_MISSING)
    if any(name.startswith("pararnn") for name in m.token_mixers):
        _validate_pararnn(cfg)
    if "gla" in m.token_mixers:
        _validate_gla(cfg)


def _validate_gla(cfg: Config) -> None:
    m, g = cfg.model, cfg.model.gla
    heads = g.num_heads if g.num_heads is not None else m.num_heads
    _positive("model.gla.num_heads", heads)
    for name in ("expand_k", "expand_v", "gate_logit_normalizer", "gate_low_rank_dim"):
        _positive(f"model.gla.{name}", getattr(g, name))
    for name in ("expand_k", "expand_v"):
        width = int(m.hidden_size * getattr(g, name))
        _require(width % heads == 0, f"model.gla.{name}", getattr(g, name),
                 f"gives a width of {width} (hidden_size {m.hidden_size} x {getattr(g, name)}), "
                 f"not divisible by the {heads} GLA heads",
                 "choose model.gla.num_heads dividing it, or another expand factor")
    _choice("model.gla.mode", g.mode, tuple(GLA_MODES))


def _validate_pararnn(cfg: Config) -> None:
    p = cfg.model.pararnn
    if p.state_size is not None:
        _positive("model.pararnn.state_size", p.state_size)
    _require(p.newton_iterations >= 1, "model.pararnn.newton_iterations", p.newton_iterations,
             "must be at least 1 (0 leaves the initial guess, whose gradient is not the RNN's)",
             "use 3 (the paper's default)")
    if p.newton_tol is not None:
        _positive("model.pararnn.newton_tol", p.newton_tol)
    _require(p.newton_max_iterations >= 1, "model.pararnn.newton_max_iterations", p.newton_max_iterations,
             "must be at least 1", "use e.g. 20")
    _positive("model.pararnn.newton_warn_residual", p.newton_warn_residual)
    _choice("model.pararnn.mode", p.mode, ("parallel", "sequential"))


def _validate_parallel(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    _positive("parallel.vpp", p.vpp)
    _choice("parallel.cp_comm", p.cp_comm, CP_COMMS)
    _positive("parallel.timeout_s", p.timeout_s)
    topology(cfg, world_size)  # sizes tile the world on both grids; the order string is valid
    _require(p.vpp == 1 or p.pp > 1, "parallel.vpp", p.vpp, "virtual stages need pipeline parallelism",
             "set parallel.vpp=1 or parallel.pp>1")
    _require(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel", p.sequence_parallel,
             "sequence parallelism shards over tensor-parallel ranks", "set parallel.tp>1 or turn it off")
    if p.tp > 1:
        _validate_tensor_parallel(cfg)
    if p.cp > 1:
        _validate_context_parallel(cfg)
    if p.pp > 1:
        _validate_pipeline(cfg, world_size)
    if "moe" in cfg.model.channel_mixers:
        _validate_moe(cfg, world_size)


def _validate_moe(cfg: Config, world_size: int) -> None:
    """model.moe's own rules (with the expert grid's ep, etp) and the token split without SP."""
    topo = topology(cfg, world_size)
    try:
        cfg.model.moe.validate(ep=topo.ep, etp=topo.etp)
    except MoEConfigError as e:
        raise ConfigError(e.field, e.value, e.problem, e.fix) from e
    p, d = cfg.parallel, cfg.data
    if p.tp > 1 and not p.sequence_parallel:
        tokens = d.micro_batch_size * d.seq_len // p.cp
        _require(tokens % p.tp == 0, "data.micro_batch_size", d.micro_batch_size,
                 f"a microbatch's {tokens} tokens per CP rank do not split over parallel.tp={p.tp} (without "
                 "sequence parallelism each TP rank routes 1/tp of them)",
                 "use parallel.sequence_parallel=true, or a micro batch size whose tokens divide by tp")


def _divides(tp: int, field: str, value: int, what: str, fix: str) -> None:
    _require(value % tp == 0, field, value, f"{what} is not divisible by parallel.tp={tp}", fix)


def _validate_pipeline(cfg: Config, world_size: int) -> None:
    """The layer split over virtual stages and the microbatch rules of the interleaved schedule."""
    m, p = cfg.model, cfg.parallel
    stages = p.pp * p.vpp
    if p.pipeline_layers is None:
        _require(m.num_layers % stages == 0, "model.num_layers", m.num_layers,
                 f"does not split evenly over parallel.pp * parallel.vpp = {stages} virtual stages",
                 f"use a multiple of {stages} layers, or list the layers of each virtual stage in "
                 "parallel.pipeline_layers")
    else:
        counts = list(p.pipeline_layers)
        _require(len(counts) == stages and sum(counts) == m.num_layers and min(counts) >= 0,
                 "parallel.pipeline_layers", counts,
                 f"needs pp * vpp = {stages} non-negative counts summing to model.num_layers={m.num_layers}",
                 f"list {stages} layer counts in virtual-stage order (stage c*pp + r is chunk c of pp rank r)")
    if p.vpp > 1:
        dp = topology(cfg, world_size).dp
        microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
        try:
            check_interleaved(p.pp, p.vpp, microbatches)
        except ValueError as e:
            raise ConfigError("data.global_batch_size", cfg.data.global_batch_size,
                              f"gives {microbatches} microbatches per pipeline, which the interleaved schedule "
                              f"cannot run: {e}",
                              f"use a number of microbatches (global / (micro * dp)) that is a multiple of "
                              f"parallel.pp={p.pp}") from e


def _validate_context_parallel(cfg: Config) -> None:
    """Zigzag chunks, attention-only token mixers, and the head split of the all-to-all variant."""
    m, p, seq = cfg.model, cfg.parallel, cfg.data.seq_len
    chunks = 2 * p.cp
    _require(seq % chunks == 0, "data.seq_len", seq,
             f"not a multiple of 2 * parallel.cp = {chunks} (the zigzag split cuts each sequence into 2*cp chunks)",
             f"use a multiple of {chunks}")
    if p.sequence_parallel:
        _require((seq // p.cp) % p.tp == 0, "data.seq_len", seq,
                 f"each CP rank's {seq // p.cp} tokens do not split over parallel.tp={p.tp} (sequence parallelism)",
                 f"use a multiple of {2 * p.cp * p.tp}")
    others = sorted(set(m.token_mixers) - {"attention"})
    _require(not others, "model.token_mixers", list(m.token_mixers),
             f"{', '.join(others)} with parallel.cp={p.cp}: context parallelism is implemented for attention only "
             "(a recurrence would need its state passed between CP ranks)", "set parallel.cp=1 for these mixers")
    _require(m.attention_dropout == 0.0, "model.attention_dropout", m.attention_dropout,
             f"not supported with parallel.cp={p.cp} (the ring and all-to-all kernels have no dropout)",
             "set model.attention_dropout=0")
    if p.cp_comm == "a2a":
        heads, kv = m.num_heads // p.tp, max(m.kv_heads // p.tp, 1)
        _require(heads % p.cp == 0, "model.num_heads", m.num_heads,
                 f"{heads} query heads per TP rank do not split over parallel.cp={p.cp} (parallel.cp_comm=a2a)",
                 "choose heads / tp divisible by cp, or parallel.cp_comm=ring")
        _require(kv % p.cp == 0 or p.cp % kv == 0, "model.num_kv_heads", m.kv_heads,
                 f"{kv} K/V heads per TP rank and parallel.cp={p.cp}: one must divide the other (a2a)",
                 "change model.num_kv_heads, or parallel.cp_comm=ring")


def _validate_tensor_parallel(cfg: Config) -> None:
    """Every sharded width divides by tp (the vocabulary is padded instead, see vocab_parallel)."""
    m, tp = cfg.model, cfg.parallel.tp
    _divides(tp, "model.hidden_size", m.hidden_size, "the hidden size",
             f"choose a tp dividing {m.hidden_size}, or a hidden size that is a multiple of {tp}")
    _divides(tp, "model.num_heads", m.num_heads, "the number of attention heads (split over TP)",
             f"choose a tp dividing {m.num_heads}")
    kv = m.kv_heads
    _require(kv % tp == 0 or tp % kv == 0, "model.num_kv_heads", kv,
             f"neither divides nor is a multiple of parallel.tp={tp} (K/V heads are split over TP ranks, "
             "or replicated when there are fewer of them than ranks)",
             f"choose a tp dividing {kv} or a multiple of it")
    if "mlp" in m.channel_mixers:
        _divides(tp, "model.ffn_hidden_size", m.resolved_ffn_hidden_size(), "the MLP inner width",
                 f"set model.ffn_hidden_size to a multiple of {tp}")
    if "gla" in m.token_mixers:
        heads = m.gla.num_heads if m.gla.num_heads is not None else m.num_heads
        field = "model.gla.num_heads" if m.gla.num_heads is not None else "model.num_heads (model.gla.num_heads=null)"
        _divides(tp, field, heads, "the number of GLA heads (split over TP)",
                 f"choose a number of GLA heads that is a multiple of {tp}, or a tp dividing {heads}")
    if any(name.startswith("pararnn") for name in m.token_mixers):
        state = m.pararnn.state_size if m.pararnn.state_size is not None else m.hidden_size
        field = ("model.pararnn.state_size" if m.pararnn.state_size is not None
                 else "model.pararnn.state_size (null: model.hidden_size)")
        _divides(tp, field, state, "the ParaRNN state width (its channels are split over TP)",
                 f"choose a state_size that is a multiple of {tp}, or a tp dividing {state}")
    if cfg.parallel.sequence_parallel:
        _divides(tp, "data.seq_len", cfg.data.seq_len, "the sequence length (split over TP by sequence "
                 "parallelism)", f"use a multiple of {tp}, or parallel.sequence_parallel=false")


def _validate_data(cfg: Config, world_size: int) -> None:
    d, m = cfg.data, cfg.model
    _choice("data.source", d.source, DATA_SOURCES)
    for name in ("seq_len", "micro_batch_size", "global_batch_size"):
        _positive(f"data.{name}", getattr(d, name))
    _require(d.seq_len <= m.max_position_embeddings, "data.seq_len", d.seq_len,
             f"exceeds model.max_position_embeddings={m.max_position_embeddings}",
             "shorten data.seq_len or raise model.max_position_embeddings")
    dp = topology(cfg, world_size).dp
    per_step = d.micro_batch_size * dp
    _require(d.global_batch_size % per_step == 0, "data.global_batch_size", d.global_batch_size,
             f"not divisible by micro_batch_size * dp = {d.micro_batch_size} * {dp}",
             f"use a multiple of {per_step} (gradient accumulation steps = global / (micro * dp))")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must lie in (0, 1)",
             "hold out e.g. 0.05 of each document for validation")
    if d.source == "text_files":
        _require(len(d.paths) > 0, "data.paths", d.paths, "text_files needs input files",
                 "list .txt or .jsonl files in data.paths")
        try:
            resolve_paths(list(d.paths))
        except ValueError as e:
            raise ConfigError("data.paths", list(d.paths), str(e).split(";")[0],
                              "list existing .txt/.jsonl files or glob patterns that match some") from e
    if d.source == "hf":
        _require(bool(d.hf_path), "data.hf_path", d.hf_path, "the hf source needs a dataset",
                 "set data.hf_path to a local dataset dir or a builder such as json (with data.paths)")


def _validate_optim(cfg: Config) -> None:
    o, s, max_steps = cfg.optim, cfg.optim.schedule, cfg.trainer.max_steps
    _choice("optim.name", o.name, OPTIMIZER_NAMES)
    _positive("optim.lr", o.lr)
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0", "use e.g. 0.1")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        _require(0.0 <= value < 1.0, f"optim.{name}", value, "must lie in [0, 1)", "use e.g. 0.9 / 0.95")
    _require(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "must be >= 0", "use 1.0, or 0 to disable")
    _require(not (o.fused and o.foreach), "optim.fused", o.fused,
             "cannot be combined with optim.foreach=true (torch's AdamW takes one implementation)",
             "set optim.foreach=null (or false) to use the fused kernel, or optim.fused=false")
    _choice("optim.schedule.name", s.name, SCHEDULE_NAMES)
    _choice("optim.schedule.wsd_decay_shape", s.wsd_decay_shape, WSD_DECAY_SHAPES)
    _require(0 <= s.warmup_steps < max_steps, "optim.schedule.warmup_steps",
             s.warmup_steps, f"must be smaller than trainer.max_steps={max_steps}",
             f"use fewer warmup steps (e.g. {max(max_steps // 10, 0)}) or train longer")
    if s.decay_steps is not None:
        _positive("optim.schedule.decay_steps", s.decay_steps)
        _require(s.warmup_steps + s.decay_steps <= max_steps, "optim.schedule.decay_steps", s.decay_steps,
                 f"warmup {s.warmup_steps} + decay {s.decay_steps} exceeds trainer.max_steps={max_steps}",
                 "shorten decay_steps, or leave it null to decay over the remaining steps")
    _require(0.0 <= s.min_lr_ratio <= 1.0, "optim.schedule.min_lr_ratio", s.min_lr_ratio,
             "must lie in [0, 1]", "use e.g. 0.1")
    _require(0.0 < s.wsd_decay_fraction <= 1.0, "optim.schedule.wsd_decay_fraction", s.wsd_decay_fraction,
             "must lie in (0, 1]", "use e.g. 0.2 (decay over the last 20% of steps)")


def _validate_trainer(cfg: Config) -> None:
    t = cfg.trainer
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.log_interval", t.log_interval)
    _positive("trainer.eval_iters", t.eval_iters)
    for name in ("eval_interval", "save_interval", "keep_last"):
        value = getattr(t, name)
        _require(value >= 0, f"trainer.{name}", value, "must be >= 0", f"set trainer.{name}=0 to disable")
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.nan_policy", t.nan_policy, NAN_POLICIES)
    if t.peak_tflops is not None:
        _positive("trainer.peak_tflops", t.peak_tflops)
    if t.resume not in ("none", "auto"):
        _require(os.path.isdir(t.resume), "trainer.resume", t.resume, "checkpoint directory does not exist",
                 "point it at an existing checkpoints/step_XXXXXX directory, or use auto / none")
    if t.resume == "none" and t.run_dir is not None:
        existing = list_checkpoints(t.run_dir)
        _require(not existing, "trainer.resume", t.resume,
                 f"trainer.run_dir={t.run_dir} already holds checkpoints (newest: step {existing[-1][0] if existing else 0}); "
                 "a fresh run there would overwrite them and mix its metrics with the old ones",
                 "use trainer.resume=auto to continue that run, or choose a new trainer.run_dir")
    if t.resume == "auto":
        _require(t.run_dir is not None, "trainer.resume", t.resume,
                 "auto resumes from trainer.run_dir, which is null (a fresh timestamped directory)",
                 "set trainer.run_dir to the directory of the run to continue")


def _validate_logger(cfg: Config) -> None:
    lg = cfg.logger
    _choice("logger.backend", lg.backend, LOGGER_BACKENDS)
    if lg.wandb_mode is not None:
        _choice("logger.wandb_mode", lg.wandb_mode, WANDB_MODES)

"""Per-rank training memory of a config and layout, without launching it (launch/memory.py; docs/memory.md).

Model state comes from the real code on the `meta` device: in a `fake` process group of the
layout's world size, each pipeline rank's model chunks and its optimizer step (all-reduce or
distributed optimizer, with their buckets and shards) are built exactly as the Trainer builds them,
but hold no memory; their tensors are then counted as optim.memory.measured_state_bytes counts a
real step's (weights, fp32 main gradients, Adam moments, separate fp32 masters; bucket padding
apart). Activations come from the derived formula of trainer/memory_model.py times the microbatches
the pipeline schedule keeps in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.testing._internal.distributed.fake_pg

import parallel_state
from models.config import ModelConfig
from models.layers.tensor_parallel import TPContext
from models.model import DecoderModel
from models.parallel_context import CPContext, ParallelContext
from moe.context import MoEContext
from optim.factory import build_optimizer_step
from optim.memory import StateBytes, measured_state_bytes
from optim.step import StepInputs
from parallel_state import Topology
from parallel_state.params import set_param_meta
from trainer.config import Config
from trainer.memory_model import (
    LayerShape,
    head_activation_bytes,
    in_flight_microbatches,
    stage_activation_bytes,
)
from trainer.pipeline.orders import split_layers
from trainer.precision import precision_of
from trainer.trainer import resolve_vocab
from trainer.validation import validate

ACTIVATION_MIXERS = ({"attention"}, {"mlp"})  # the layers the activation formula is derived for


@dataclass
class RankMemory:
    """One pipeline rank's bytes (tp, cp, dp rank 0 of that stage)."""

    pp_rank: int
    layers: list[int]
    state: StateBytes
    activations_per_microbatch: int | None  # None: no formula for these mixers (docs/memory.md)
    in_flight: float  # microbatches whose activations are held at the peak (1F1B warm-up)

    @property
    def activations(self) -> int | None:
        if self.activations_per_microbatch is None:
            return None
        return int(self.activations_per_microbatch * self.in_flight)

    @property
    def total(self) -> int:
        s = self.state
        return s.weights + s.grads + s.optimizer + s.masters + s.padding + (self.activations or 0)


def estimate(cfg: Config, world_size: int) -> list[RankMemory]:
    """Each pipeline rank's memory for `cfg` on `world_size` ranks (validated first, like a run)."""
    if dist.is_initialized():
        raise RuntimeError("the memory estimate builds its own fake process group; call it outside a run")
    topology = validate(cfg, world_size)
    cfg = resolve_vocab(cfg)  # model.vocab_size null: the tokenizer's, as a run fills it
    return [_estimate_rank(cfg, topology, pp_rank) for pp_rank in range(topology.pp)]


def _estimate_rank(cfg: Config, topology: Topology, pp_rank: int) -> RankMemory:
    rank = topology.dense_rank(pp=pp_rank)
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=topology.world_size)
    try:
        ps = parallel_state.init(topology)
        p = cfg.parallel
        tp = TPContext(ps.tp, p.sequence_parallel)
        par = ParallelContext(tp=tp, cp=CPContext(ps.cp, p.cp_comm), moe=MoEContext.from_parallel_state(ps, tp.sp))
        vpp = p.vpp if topology.pp > 1 else 1
        stages = split_layers(cfg.model.num_layers, topology.pp, vpp, p.pipeline_layers)
        mine = [c * topology.pp + pp_rank for c in range(vpp)]
        last = topology.pp * vpp - 1
        dtype = precision_of(cfg.trainer.precision).param_dtype
        with torch.device("meta"):
            chunks = [DecoderModel(cfg.model, layer_ids=stages[s], has_embedding=s == 0, has_head=s == last, par=par)
                      for s in mine]
            for chunk in chunks:
                chunk.to(dtype)
        tied = _tied_weight(chunks, cfg.model, topology.pp)
        named = [(f"chunks.{i}.{n}", q) for i, chunk in enumerate(chunks) for n, q in chunk.named_parameters()]
        step = build_optimizer_step(StepInputs(named_params=named, cfg=cfg.optim, max_steps=cfg.trainer.max_steps,
                                               ps=ps, bucket_size_mb=p.dp_bucket_mb, tied_weight=tied,
                                               modules=chunks))
        state = measured_state_bytes(step, unstepped=True)
        layers = [i for s in mine for i in stages[s]]
        activations = _activations(cfg, topology, [stages[s] for s in mine], last in mine, dtype.itemsize)
        microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * topology.dp)
        in_flight = in_flight_microbatches(topology.pp, pp_rank, vpp, microbatches)
        return RankMemory(pp_rank, layers, state, activations, in_flight)
    finally:
        dist.destroy_process_group()


def _tied_weight(chunks: list[DecoderModel], model: ModelConfig, pp: int):
    """The embedding copy a pipeline rank keeps in sync with the other end (trainer/pipeline/stage_model.py)."""
    if not (model.tie_embeddings and pp > 1):
        return None
    for chunk in chunks:
        if chunk.embedding is not None:
            return chunk.embedding.weight
        if chunk.output is not None:
            set_param_meta(chunk.output.weight, tied_copy=True)
            return chunk.output.weight
    return None


def _activations(cfg: Config, topology: Topology, chunk_layers: list[list[int]], has_head: bool,
                 element_bytes: int) -> int | None:
    """Bytes one microbatch leaves saved on this rank (all its chunks), or None without a formula."""
    m = cfg.model
    if set(m.token_mixers) - ACTIVATION_MIXERS[0] or set(m.channel_mixers) - ACTIVATION_MIXERS[1]:
        return None
    if m.dropout > 0 or m.attention_dropout > 0 or topology.cp > 1:
        return None  # dropout masks, the s x s math kernel, ring attention: not in the formula
    shape = LayerShape.of(m, cfg.data.seq_len, cfg.data.micro_batch_size, topology.tp,
                          cfg.parallel.sequence_parallel, element_bytes)
    total = sum(stage_activation_bytes(shape, len(layers), m.recompute, m.recompute_method, m.recompute_layers)
                for layers in chunk_layers if layers)
    if has_head:
        vocab = -(-m.vocab_size // topology.tp) * topology.tp
        total += head_activation_bytes(shape, vocab)
    return total


def format_estimate(cfg: Config, ranks: list[RankMemory]) -> str:
    """The table launch/memory.py prints (GiB per rank and a total)."""
    gib = 2**30
    p = cfg.parallel
    lines = [(f"per-rank memory estimate: tp={p.tp} pp={p.pp} cp={p.cp} sp={p.sequence_parallel} "
              f"precision={cfg.trainer.precision} distributed_optimizer={cfg.optim.distributed} "
              f"recompute={cfg.model.recompute} seq={cfg.data.seq_len} micro_batch={cfg.data.micro_batch_size}"),
             (f"{'pp rank':>7} {'layers':>9} {'params':>14} {'weights':>9} {'grads':>9} {'optimizer':>9} "
              f"{'masters':>9} {'padding':>9} {'in flight':>9} {'activations':>11} {'total GiB':>9}"),
             "(GiB; tp, cp and dp rank 0 of each pipeline stage)"]
    for r in ranks:
        s = r.state
        span = f"{r.layers[0]}-{r.layers[-1]}" if r.layers else "-"
        act = "n/a" if r.activations is None else f"{r.activations / gib:.2f}"
        lines.append(f"{r.pp_rank:>7} {span:>9} {s.params:>14,} {s.weights / gib:>9.2f} {s.grads / gib:>9.2f} "
                     f"{s.optimizer / gib:>9.2f} {s.masters / gib:>9.2f} {s.padding / gib:>9.2f} "
                     f"{r.in_flight:>9.1f} {act:>11} {r.total / gib:>9.2f}")
    if any(r.activations is None for r in ranks):
        lines.append("activations n/a: the formula covers attention + MLP layers without dropout or context "
                     "parallelism (docs/memory.md); measure others with models/activation_probe.py")
    return "\n".join(lines)


__all__ = ["RankMemory", "estimate", "format_estimate"]

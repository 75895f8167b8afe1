"""The decoder-only language model and `build_model` (build on meta, materialise from the seed)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from models.block import DecoderBlock
from models.config import ModelConfig
from models.init import full_shape, materialize, normal_init
from models.ladder import run_ladder
from models.layers.norm import RMSNorm
from models.layers.vocab_parallel import (
    EMBEDDING_WEIGHT_NAME,
    IGNORE_INDEX,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    vocab_parallel_cross_entropy,
)
from models.parallel_context import ParallelContext, resolve_context
from models.recompute import full_recompute_groups, run_checkpointed_layers
from models.spec import first_ladder_layer, ladder_run_starts, layer_specs


class DecoderModel(nn.Module):
    """Llama-style decoder: embedding, decoder blocks, final RMSNorm, LM head.

    A pipeline stage holds only some of it: `layer_ids` (global indices, ascending; default all),
    the embedding if `has_embedding`, the final norm and head if `has_head`. Layers live in
    `self.layers` keyed by the global index, so parameter names (``layers.3.attention.wq.weight``)
    and therefore initial values (see models.init) are the same in every layout.

    With tied embeddings and both ends present the head shares the embedding's Parameter. A stage
    with the head but not the embedding holds its own copy, initialised from the embedding's
    name (keeping the copies equal during training is the trainer's job).

    Parallel layouts (`par`, a models.parallel_context.ParallelContext): under tensor parallelism every layer holds its TP shard (slices of the same full
    weights); the vocabulary is padded to a multiple of tp and split over ranks, and the loss is
    computed without gathering the logits. Under sequence parallelism the residual stream between
    the embedding and the head is this rank's chunk of the sequence [B, T/tp, hidden].

    Ladder residual (model.residual=ladder, docs/ladder.md): consecutive ladder layers run as one
    ladder run (models/ladder.py), which starts afresh at model.ladder_restarts and returns one
    complete tensor; a pipeline stage starting inside the ladder part must start at a restart.

    Construct through `build_model` (below); direct construction leaves torch's default init.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_ids: Sequence[int] | None = None,
        has_embedding: bool = True,
        has_head: bool = True,
        par: ParallelContext | None = None,
    ):
        super().__init__()
        par = resolve_context(par)
        tp = par.tp
        if cfg.vocab_size is None:  # the trainer fills it from the tokenizer before building
            raise ValueError("model.vocab_size is None: set it, or let the trainer fill it from the tokenizer")
        specs = layer_specs(cfg)
        layer_ids = list(range(cfg.num_layers)) if layer_ids is None else list(layer_ids)
        if any(not 0 <= i < cfg.num_layers for i in layer_ids):
            raise ValueError(f"layer_ids {layer_ids} must lie in [0, num_layers={cfg.num_layers})")
        if any(a >= b for a, b in itertools.pairwise(layer_ids)):
            raise ValueError(f"layer_ids {layer_ids} must be strictly increasing (forward order)")

        self.cfg = cfg
        self.has_embedding = has_embedding
        self.has_head = has_head
        self.tp = tp
        vocab_layer_args = {"sequence_parallel": tp.sequence_parallel}
        # Registered first so a tied weight is named after the embedding in named_parameters().
        self.embedding = None
        if has_embedding:
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp.group,
                                                    init=normal_init(cfg.init_std), **vocab_layer_args)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg, specs[i], par) for i in layer_ids})
        self._runs = _layer_runs(cfg, layer_ids)
        # model.recompute=full: the held layers (one pipeline stage or virtual stage) checkpointed together.
        self._recompute_groups = (full_recompute_groups(len(layer_ids), cfg.recompute_method, cfg.recompute_layers)
                                  if cfg.recompute == "full" else [])
        self._rng = tp.rng
        if self._recompute_groups and any(self.layers[str(i)].is_ladder for i in layer_ids):
            raise ValueError("model.recompute=full with ladder-residual layers is not implemented; "
                             "use model.recompute=selective or model.residual=standard")
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if has_head else None
        self.output = None
        if has_head:
            self.output = VocabParallelLMHead(
                cfg.vocab_size, cfg.hidden_size, tp.group,
                init=normal_init(cfg.init_std, seed_name=EMBEDDING_WEIGHT_NAME if cfg.tie_embeddings else None),
                **vocab_layer_args)
            if cfg.tie_embeddings and has_embedding:
                self.output.weight = self.embedding.weight
            tp.mark_sequence_parallel(self.norm.weight)

    @property
    def layer_ids(self) -> list[int]:
        """Global indices of the layers this instance holds, in forward order."""
        return [int(key) for key in self.layers]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                caches: dict | None = None) -> torch.Tensor:
        """input_ids [B, T] long -> logits [B, T, vocab] (under TP this rank's vocabulary slice
        [B, T, V_p / tp], V_p the vocabulary padded to a multiple of tp).

        `caches` (decoding, launch/generate.py): a models.decode_cache.DecodeCache per held layer
        (by global index) that the token mixers read and extend; position_ids are then required.

        Without the embedding, `input_ids` is the previous stage's hidden state [B, T, hidden]
        ([B, T/tp, hidden] under SP); without the head, the result is this stage's hidden state.
        """
        hidden = self.embedding(input_ids) if self.embedding is not None else input_ids
        hidden = self.run_layers(hidden, position_ids, caches)
        if self.output is None:
            return hidden
        return self.output(self.norm(hidden))

    def run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                   caches: dict | None = None) -> torch.Tensor:
        """The decoder layers on the residual stream: standard blocks one by one, each ladder run as
        one (its pending outputs completed at its end). `caches` (decoding, launch/generate.py):
        the token mixer's cache of each layer, by global index."""
        if self._recompute_groups and caches is None and torch.is_grad_enabled():
            return self._run_recomputed_layers(hidden, position_ids)
        for run_is_ladder, keys in self._runs:
            if run_is_ladder:
                modules = [m for key in keys for m in self.layers[key].ladder_modules()]
                run_caches = None if caches is None else [c for key in keys for c in (caches[int(key)], None)]
                hidden = run_ladder(modules, hidden, position_ids, run_caches)
                continue
            for key in keys:
                block = self.layers[key]
                if caches is None:
                    hidden = block(hidden, position_ids)
                else:
                    hidden = block.forward_cached(hidden, position_ids, caches[int(key)])
        return hidden

    def _run_recomputed_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """model.recompute=full (models/recompute.py): each group of layers runs as one checkpoint,
        the layers outside every group as usual (recompute_method=block)."""
        blocks = list(self.layers.values())
        grouped = {group.start: group for group in self._recompute_groups}
        position = 0
        while position < len(blocks):
            group = grouped.get(position)
            if group is None:
                hidden = blocks[position](hidden, position_ids)
                position += 1
                continue
            hidden = run_checkpointed_layers(blocks[group.start:group.stop], hidden, position_ids, self._rng)
            position = group.stop
        return hidden

    def token_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token cross entropy [B, T] in fp32, 0 where labels == -100; no reduction.

        The trainer reduces (sum over tokens / global loss-token count), see docs/loss_and_layout.md,
        "Loss normalisation". Logits are upcast because bf16 log-softmax over a large vocab is lossy.
        """
        if self.output is None:
            raise ValueError("token_losses needs the LM head; this model was built with has_head=False")
        return self.losses_from_logits(self(input_ids, position_ids), labels)

    def losses_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [B, T] of this model's logits (a last pipeline stage's output)."""
        return vocab_parallel_cross_entropy(logits, labels, self.tp.group, self.cfg.vocab_size,
                                            ignore_index=IGNORE_INDEX)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameter elements of the layers held, each tied tensor once, counted at their
        FULL (unsharded) size: the same number under every TP degree (vocabulary padding included).

        `exclude_embeddings` leaves out the vocabulary matrices (token embedding and LM head),
        the usual "non-embedding" count of scaling-law papers.
        """
        excluded = set()
        if exclude_embeddings:
            for module in (self.embedding, self.output):
                if module is not None:
                    excluded.add(id(module.weight))
        # parameters() already yields a shared tensor once.
        return sum(math.prod(full_shape(p)) for p in self.parameters() if id(p) not in excluded)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the parts held (3 x forward matmul FLOPs).

        Sum of each layer's mixers' `flops_per_token` plus the LM head's; attention counts the
        causal scores in full, as Megatron/PaLM MFU do. Embedding lookups and norms count 0.
        """
        total = sum(block.flops_per_token(seq_len) for block in self.layers.values())
        if self.output is not None:
            total += self.output.flops_per_token(seq_len)
        return total


def _layer_runs(cfg: ModelConfig, layer_ids: Sequence[int]) -> list[tuple[bool, tuple[str, ...]]]:
    """The held layers grouped into runs (is_ladder, keys): each standard layer alone, ladder layers
    together until a ladder restart. A holder whose first layer is inside the ladder part must start
    at a restart, or it would compute a different model than one process (docs/ladder.md, "Pipelines")."""
    first_ladder, starts = first_ladder_layer(cfg), set(ladder_run_starts(cfg))
    if layer_ids and first_ladder < layer_ids[0] and layer_ids[0] not in starts:
        raise ValueError(f"layers {layer_ids[0]}.. start inside the ladder part (layers {first_ladder}..) at a layer "
                         f"that is not in model.ladder_restarts={list(cfg.ladder_restarts)}; add {layer_ids[0]} to it")
    runs: list[tuple[bool, tuple[str, ...]]] = []
    for i in layer_ids:
        if i < first_ladder:
            runs.append((False, (str(i),)))
        elif runs and runs[-1][0] and i not in starts and str(i - 1) in runs[-1][1]:
            runs[-1] = (True, (*runs[-1][1], str(i)))
        else:
            runs.append((True, (str(i),)))
    return runs


def build_model(
    cfg: ModelConfig,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    layer_ids: Sequence[int] | None = None,
    has_embedding: bool = True,
    has_head: bool = True,
    par: ParallelContext | None = None,
) -> DecoderModel:
    """Construct (the requested part of) the decoder on meta and materialise it from `seed`.

    With `par` (a models.parallel_context.ParallelContext) this rank's shard of the layout is built:
    every parameter is its slice of the same full tensor the one-process model gets.
    """
    if cfg.vocab_size is None:
        raise ValueError(
            "model.vocab_size is None: the trainer must fill it from the tokenizer before build_model"
        )
    with torch.device("meta"):
        model = DecoderModel(cfg, layer_ids=layer_ids, has_embedding=has_embedding, has_head=has_head, par=par)
    return materialize(model, seed, device=device, dtype=dtype)

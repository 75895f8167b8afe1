"""This rank's pipeline chunks of the decoder and what the pipeline executor calls on them.

Virtual stage s = c*P + r (chunk c of pp rank r) holds the layers `split_layers` gives it; stage 0
also the embedding, stage P*V-1 the final norm and LM head. Every chunk is a DecoderModel built from
the same seed rule, so its weights are exactly the one-process model's.

Tied embeddings over several stages: the last stage holds its own copy of the embedding matrix as
the head weight, initialised from the embedding's name (so equal at step 0). The two copies get the
sum of both gradients (the optimizer step sums `tied_weight()` over ParallelState.embedding) and therefore the
same updates; the copy is marked `tied_copy` (parallel_state.params) so the global grad norm counts the matrix once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from models import build_model
from models.config import ModelConfig
from models.model import DecoderModel
from models.parallel_context import ParallelContext
from parallel_state.groups import ParallelState
from parallel_state.params import set_param_meta
from trainer.pipeline.orders import split_layers


class PipelineChunks(nn.Module):
    """This pp rank's vpp model chunks (index c = virtual stage c*P + r), as one module."""

    def __init__(self, cfg: ModelConfig, seed: int, device: torch.device, par: ParallelContext, ps: ParallelState,
                 vpp: int, explicit_split: Sequence[int] | None = None):
        super().__init__()
        P, r = ps.pp.size, ps.pp.rank
        self.pp_size, self.vpp, self.last_stage = P, vpp, P * vpp - 1
        self.stages = [c * P + r for c in range(vpp)]
        layers = split_layers(cfg.num_layers, P, vpp, explicit_split)
        self.chunks = nn.ModuleList([
            build_model(cfg, seed=seed, device=device, layer_ids=layers[s], has_embedding=s == 0,
                        has_head=s == self.last_stage, par=par)
            for s in self.stages])
        self.has_tied_embedding = cfg.tie_embeddings and P > 1
        for chunk in self.chunks:
            if self.has_tied_embedding and chunk.output is not None and chunk.embedding is None:
                set_param_meta(chunk.output.weight, tied_copy=True)

    def stage_fns(self) -> list[Callable[[object, dict], torch.Tensor]]:
        """chunk(input, microbatch) for the executor: stage 0 reads the token ids, later stages the
        received activation; every stage takes the microbatch's position ids (context parallelism)."""
        def make(chunk: DecoderModel, first: bool):
            def run(x, mb: dict) -> torch.Tensor:
                return chunk(mb["input_ids"] if first else x, mb.get("position_ids"))
            return run
        return [make(chunk, s == 0) for chunk, s in zip(self.chunks, self.stages)]

    @property
    def head_chunk(self) -> DecoderModel | None:
        """The chunk holding the LM head (last virtual stage), if this rank has it."""
        return self.chunks[-1] if self.stages[-1] == self.last_stage else None

    def tied_weight(self) -> nn.Parameter | None:
        """This rank's copy of the embedding tied over the first and last stage (the embedding on the
        first, its head copy on the last), or None; the optimizer step sums its gradient over both."""
        if not self.has_tied_embedding:
            return None
        # With P > 1 a rank holds the embedding (first stage) or its head copy (last stage), not both.
        chunk = self.chunks[0] if self.stages[0] == 0 else self.chunks[-1]
        if chunk.embedding is not None:
            return chunk.embedding.weight
        return chunk.output.weight if chunk.output is not None else None

"""The "moe" channel mixer: moe.MoELayer built from the model config and the parallel context."""
from __future__ import annotations

from models.config import ModelConfig
from models.parallel_context import ParallelContext, resolve_context
from moe.layer import MoELayer


class MoEMixer(MoELayer):
    """MoE channel mixer (router, dispatcher, grouped experts) configured by model.moe.

    Its MoEContext comes from the ParallelContext (`par.moe`); the one-process context without it.
    """

    def __init__(self, cfg: ModelConfig, par: ParallelContext | None = None):
        super().__init__(cfg.moe, cfg.hidden_size, cfg.init_std, cfg.output_init_std(), resolve_context(par).moe)

"""What is computed: the decoder model, its layers, its per-layer specs and its initialisation."""

from models.config import ModelConfig
from models.init import materialize, stable_param_seed
from models.mixers import CHANNEL_MIXERS, TOKEN_MIXERS
from models.model import DecoderModel, build_model
from models.spec import RESIDUALS, LayerSpec, layer_specs

__all__ = [
    "CHANNEL_MIXERS",
    "RESIDUALS",
    "TOKEN_MIXERS",
    "DecoderModel",
    "LayerSpec",
    "ModelConfig",
    "build_model",
    "layer_specs",
    "materialize",
    "stable_param_seed",
]

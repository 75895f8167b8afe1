"""Validation of a decode request before any weight is touched (docs/tpla.md, "Errors").

Each rule raises one ValueError naming the option, the value and a fix.
"""
from __future__ import annotations

from models.config import ModelConfig
from models.inference.config import LATENT_NORMS, LATENT_TRANSFORMS, DecodeConfig
from models.spec import layer_specs


def check_decode(model: ModelConfig, cfg: DecodeConfig, prompt_length: int, tp: int = 1) -> None:
    """Refuse what the decoder cannot run: sampling settings, positions, TPLA on this model and layout."""
    sampling = cfg.sampling
    if sampling.temperature < 0:
        raise ValueError(f"--temperature={sampling.temperature}: must be >= 0 (0 is greedy decoding)")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"--top-p={sampling.top_p}: must lie in (0, 1]; 1.0 keeps the whole distribution")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={cfg.max_new_tokens}: must be >= 1")
    if prompt_length < 1:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    positions = model.max_position_embeddings
    if prompt_length > positions:
        raise ValueError(f"the prompt is {prompt_length} tokens, longer than the model's positions "
                         f"(model.max_position_embeddings={positions}); shorten the prompt")
    if prompt_length + cfg.max_new_tokens > positions:
        raise ValueError(f"prompt ({prompt_length} tokens) + --max-new-tokens={cfg.max_new_tokens} exceeds the model's "
                         f"positions (model.max_position_embeddings={positions}); use --max-new-tokens "
                         f"<= {positions - prompt_length}")
    if cfg.tpla.enabled:
        check_tpla(model, cfg, tp)


def check_tpla(model: ModelConfig, cfg: DecodeConfig, tp: int = 1) -> int:
    """The rules of --tpla; returns g, the number of latent slices."""
    tpla = cfg.tpla
    mixers = sorted({spec.token_mixer for spec in layer_specs(model)})
    if "mla" not in mixers:
        raise ValueError(f"--tpla needs a model with MLA layers (model.token_mixers contains 'mla'); this model's "
                         f"token mixers are {mixers}. Drop --tpla")
    if any(spec.token_mixer == "mla" and spec.residual == "ladder" for spec in layer_specs(model)):
        raise ValueError("--tpla with model.residual=ladder is not supported (the ladder defers the output "
                         "reduction of the head-parallel projection TPLA replaces); drop --tpla")
    g = tpla.degree if tpla.degree is not None else tp
    if g < 1:
        raise ValueError(f"--tpla-degree={g}: must be >= 1")
    if tp > 1 and g != tp:
        raise ValueError(f"--tpla-degree={g} under tp={tp}: each TP rank holds one latent slice, so g must equal "
                         f"the number of ranks ({tp}); drop --tpla-degree")
    r = model.mla.kv_lora_rank
    if r % g:
        raise ValueError(f"model.mla.kv_lora_rank={r} (the latent) is not divisible by g={g} TPLA slices; "
                         f"use a g that divides {r}")
    if model.num_heads % g:
        raise ValueError(f"model.num_heads={model.num_heads} is not divisible by g={g}: the exact MLA prefill "
                         f"splits the heads over the ranks; use a g that divides {model.num_heads}")
    if tpla.transform not in LATENT_TRANSFORMS:
        raise ValueError(f"--tpla-transform={tpla.transform!r}: available {', '.join(LATENT_TRANSFORMS)}")
    if tpla.transform == "hadamard" and r & (r - 1):
        raise ValueError(f"--tpla-transform=hadamard needs a power-of-two latent, model.mla.kv_lora_rank={r}; "
                         f"use --tpla-transform=pca")
    if tpla.latent_norm not in LATENT_NORMS:
        raise ValueError(f"--tpla-latent-norm={tpla.latent_norm!r}: available {', '.join(LATENT_NORMS)}")
    if tpla.transform == "pca" and tpla.calibration_tokens < 1:
        raise ValueError(f"--tpla-calibration-tokens={tpla.calibration_tokens}: must be >= 1")
    return g

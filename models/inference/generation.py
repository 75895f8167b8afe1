"""The decoding loop over a DecoderModel: prefill the prompt into per-layer caches, then one call per
new token (launch/generate.py; docs/tpla.md).

MLA layers decode from a `LatentDecodeAttention` (preallocated latent cache; exact MLA or TPLA) when a
`LatentDecoder` provides the caches, every other token mixer from a models.decode_cache.DecodeCache.
Under TP every rank gathers the full-vocabulary logits and draws with the same seeded generator, so
all ranks choose the same token without another collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.decode_cache import DecodeCache
from models.inference.config import SamplingConfig, TPLAConfig
from models.inference.reparam import reparameterize
from models.inference.sampling import next_token, sampling_generator
from models.inference.tpla import LatentDecodeAttention, TPLAWeights, mla_layers
from parallel_state.collectives import gather_from_tp_region


@dataclass
class Generation:
    """A decode's result: prompt + new tokens [B, P + N], and the full-vocabulary logits [B, vocab]
    from which each new token was chosen (N of them)."""

    tokens: torch.Tensor
    step_logits: list[torch.Tensor]


def full_vocab_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary slice -> the whole vocabulary (padding dropped), on every TP rank."""
    return gather_from_tp_region(logits, model.tp.group)[..., :model.cfg.vocab_size]


class LatentDecoder:
    """How the MLA layers of `model` decode: exact MLA, or TPLA with g slices (TPLAConfig).

    With TPLA the latent transform is folded into the model's weights here (in place; the model's
    outputs do not change), with `calibration` tokens [B, T] for PCA, and each MLA layer's TPLA
    weights are sliced (under TP: all-gathered once, then sliced).
    """

    def __init__(self, model, tpla: TPLAConfig | None = None, calibration: torch.Tensor | None = None):
        self.model = model
        self.tpla = tpla if tpla is not None else TPLAConfig()
        self.layers = mla_layers(model)
        self.weights: dict[int, TPLAWeights] = {}
        if self.tpla.enabled:
            tp = model.tp.size
            degree = self.tpla.degree if self.tpla.degree is not None else tp
            with torch.no_grad():
                reparameterize(model, self.layers, self.tpla.transform, degree, calibration)
                self.weights = {i: TPLAWeights.from_layer(layer, degree, latent_norm=self.tpla.latent_norm)
                                for i, layer in self.layers.items()}

    def caches(self, capacity: int = 0) -> dict:
        """Fresh per-layer caches for one decode of up to `capacity` tokens."""
        return {i: (LatentDecodeAttention(self.weights.get(i), capacity) if i in self.layers else DecodeCache())
                for i in self.model.layer_ids}

    def cache_bytes(self, caches: dict) -> int:
        """This rank's bytes of cached latents and RoPE keys over the MLA layers."""
        return sum(caches[i].cache.nbytes() for i in self.layers)


@torch.inference_mode()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None,
             caches: dict | None = None) -> Generation:
    """Decode `max_new_tokens` after `prompt` [B, P]: greedy, or sampled (temperature, top-p), reusing
    every layer's cache (default: a DecodeCache per layer)."""
    sampling = sampling if sampling is not None else SamplingConfig()
    caches = caches if caches is not None else {i: DecodeCache() for i in model.layer_ids}
    generator = sampling_generator(sampling, prompt.device)
    batch, length = prompt.shape
    positions = torch.arange(length, device=prompt.device).expand(batch, length)
    logits = model(prompt, positions, caches=caches)[:, -1]
    tokens, step_logits = [prompt], []
    for step in range(max_new_tokens):
        full = full_vocab_logits(model, logits)
        step_logits.append(full)
        token = next_token(full, sampling, generator)
        tokens.append(token)
        if step + 1 < max_new_tokens:
            position = torch.full_like(token, length + step)
            logits = model(token, position, caches=caches)[:, -1]
    return Generation(torch.cat(tokens, dim=1), step_logits)


@torch.inference_mode()
def generate_uncached(model, prompt: torch.Tensor, max_new_tokens: int,
                      sampling: SamplingConfig | None = None) -> Generation:
    """The reference: the whole sequence through the model again for every new token."""
    sampling = sampling if sampling is not None else SamplingConfig()
    generator = sampling_generator(sampling, prompt.device)
    tokens, step_logits = prompt, []
    for _ in range(max_new_tokens):
        full = full_vocab_logits(model, model(tokens)[:, -1])
        step_logits.append(full)
        tokens = torch.cat([tokens, next_token(full, sampling, generator)], dim=1)
    return Generation(tokens, step_logits)


@torch.inference_mode()
def teacher_forced_logits(model, tokens: torch.Tensor, prefix: int, caches: dict) -> torch.Tensor:
    """Full-vocabulary logits [B, T - prefix, vocab] for positions prefix..T-1 of tokens [B, T]: the
    prefix is prefilled, then the rest is one decode call (each token attends to the cache and the
    tokens before it: what decoding them one by one computes)."""
    batch, length = tokens.shape
    positions = torch.arange(length, device=tokens.device).expand(batch, length)
    model(tokens[:, :prefix], positions[:, :prefix], caches=caches)
    return full_vocab_logits(model, model(tokens[:, prefix:], positions[:, prefix:], caches=caches))

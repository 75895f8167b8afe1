"""Choosing the next token from full-vocabulary logits: greedy, temperature, top-p (nucleus)."""
from __future__ import annotations

import torch

from models.inference.config import SamplingConfig


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [B, V] with every token outside the nucleus set to -inf: the smallest set of most
    likely tokens whose probabilities sum to at least top_p (the most likely token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # A token is dropped when the tokens ranked before it already reach top_p.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B, 1]. Greedy at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus, with `generator`."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    filtered = top_p_filter(logits.float() / cfg.temperature, cfg.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def sampling_generator(cfg: SamplingConfig, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator of a sampled decode (None for greedy); the same seed on every TP rank."""
    if cfg.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)

"""Sampling (models/inference/sampling.py) and decoding MLA models through the latent cache
(models/inference/generation.py): against sorted-by-hand nuclei, empirical frequencies, and the
uncached full forward."""
from __future__ import annotations

import pytest
import torch

from launch.generate import greedy_generate_uncached
from models import ModelConfig, build_model
from models.config import MLAConfig
from models.inference.config import SamplingConfig, TPLAConfig
from models.inference.generation import LatentDecoder, generate, generate_uncached
from models.inference.sampling import next_token, sampling_generator, top_p_filter

VOCAB = 61


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.25], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    # Sorted: 0.5, 0.25, 0.2, 0.05. top_p 0.6 -> {0.5, 0.25}; 0.75 -> {0.5, 0.25} (reached exactly); 0.76 -> 3 tokens.
    for top_p, kept in ((0.6, [1, 3]), (0.75, [1, 3]), (0.76, [1, 2, 3]), (0.1, [1]), (1.0, [0, 1, 2, 3])):
        got = top_p_filter(logits, top_p)[0]
        assert torch.isfinite(got).nonzero().flatten().tolist() == kept, top_p
    assert torch.isfinite(top_p_filter(logits, 0.5)[1]).sum() == 2  # ties: the first two in sort order


def test_sampling_draws_from_the_tempered_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    cfg = SamplingConfig(temperature=0.5, top_p=0.9, seed=3)
    draws = next_token(logits, cfg, sampling_generator(cfg)).flatten()
    tempered = torch.softmax(logits[0] / 0.5, 0)  # 0.865, 0.117, 0.016, 0.002 -> nucleus {0, 1}
    want = torch.tensor([tempered[0], tempered[1], 0, 0]) / (tempered[0] + tempered[1])
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    greedy = SamplingConfig()
    assert sampling_generator(greedy) is None
    assert next_token(logits[:2], greedy, None).flatten().tolist() == [0, 0]


def mla_model(**overrides):
    fields = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 48,
              "max_position_embeddings": 64, "token_mixers": ["mla", "attention"],
              "mla": MLAConfig(q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6)}
    fields.update(overrides)
    return build_model(ModelConfig(**fields), seed=7).eval()


PROMPT = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_p=0.8, seed=5)],
                         ids=["greedy", "top-p"])
def test_latent_cache_decoding_matches_recomputing_the_full_forward(sampling):
    model = mla_model()
    decoder = LatentDecoder(model)
    cached = generate(model, PROMPT, 6, sampling, decoder.caches(11))
    full = generate_uncached(model, PROMPT, 6, sampling)
    assert torch.equal(cached.tokens, full.tokens)
    for a, b in zip(cached.step_logits, full.step_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    per_token = 2 * (8 + 4) * 4  # batch 2, (latent + RoPE key) fp32, one MLA layer
    assert decoder.cache_bytes(decoder.caches(11)) == 0
    caches = decoder.caches(1)  # grows past its capacity
    generate(model, PROMPT, 6, sampling, caches)
    assert decoder.cache_bytes(caches) == 10 * per_token  # the last new token is never fed back


def test_tpla_with_one_slice_decodes_like_mla_and_more_slices_hold_less():
    model = mla_model()
    exact = generate(model, PROMPT, 6, caches=LatentDecoder(model).caches())
    one = generate(model, PROMPT, 6, caches=LatentDecoder(model, TPLAConfig(enabled=True, degree=1)).caches())
    assert torch.equal(one.tokens, exact.tokens)
    for a, b in zip(one.step_logits, exact.step_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(greedy_generate_uncached(model, PROMPT, 6).tokens, exact.tokens)


def test_simulated_tpla_with_a_transform_runs_and_stays_close():
    model = mla_model()
    exact = generate(model, PROMPT, 4, caches=LatentDecoder(model).caches())
    decoder = LatentDecoder(model, TPLAConfig(enabled=True, degree=2, transform="hadamard"))
    got = generate(model, PROMPT, 4, caches=decoder.caches())
    torch.testing.assert_close(got.step_logits[0], exact.step_logits[0], rtol=1e-4, atol=1e-5)  # prefill: exact
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(got.step_logits[1:], exact.step_logits[1:]))
    assert 0 < rel < 0.5
